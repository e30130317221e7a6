"""
Cross-site request forgery protection of the dashboard's actions: a signed double
submit, and the browser's own word on where a request comes from.

The page sets a random nonce in a cookie that scripts cannot read and other sites
never send (``HttpOnly``, ``SameSite=Strict``), and puts ``HMAC(secret, nonce)`` in
its forms. An action is done only if its form carries the signature of the nonce in
its cookie, and if the browser, where it says (``Sec-Fetch-Site``, ``Origin``), says
that the request comes from this site. A site that wants to forge a request can
neither read the page (same-origin policy) nor set the cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

COOKIE = "apscheduler_dashboard_csrf"
FIELD = "csrf_token"
#: ``Sec-Fetch-Site`` values of requests made by the page itself
_SAME_SITE = frozenset({"same-origin", "none"})


def new_nonce() -> str:
    return secrets.token_urlsafe(32)


def token_for(secret: bytes, nonce: str) -> str:
    """Return the token that the forms of a page with this cookie nonce carry."""
    return hmac.new(secret, nonce.encode(), hashlib.sha256).hexdigest()


def refusal(
    secret: bytes,
    nonce: str | None,
    token: str | None,
    headers: Mapping[str, str],
    origin: str,
) -> str | None:
    """
    Return why an action must be refused, or ``None`` if it may be done.

    :param origin: this site's origin as the request reached it (scheme://host[:port])
    """
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in _SAME_SITE:
        return f"the request came from another site (Sec-Fetch-Site: {fetch_site})"

    sent_origin = headers.get("origin")
    if sent_origin is not None and sent_origin != origin:
        return "the request came from another origin"

    if not nonce or not token:
        return "the form carries no CSRF token (reload the page)"

    if not hmac.compare_digest(token_for(secret, nonce), token):
        return "the form's CSRF token does not match (reload the page)"

    return None


def said_signature(secret: bytes, message: str) -> str:
    """Return the signature of a message the dashboard says after a plain form's
    action, carried in the redirect (so that a link cannot make the page say
    anything it did not)."""
    return token_for(secret, f"said\0{message}")


def said_by_us(secret: bytes, message: str, signature: str) -> bool:
    """Tell whether the dashboard said ``message`` (see :func:`said_signature`)."""
    return hmac.compare_digest(said_signature(secret, message), signature)
