"""The options the data store and the event broker share: where, how to retry, keys."""

from __future__ import annotations

from logging import Logger

import attrs
from apscheduler import RetrySettings
from attrs.validators import instance_of

from ._client import client_or_uri_validator
from ._names import database_validator
from ._signing import Signer


@attrs.define(slots=False, eq=False, repr=False)
class ConnectionOptions:
    """
    The client (or URI), the database and the retry settings, validated once.

    A base of :class:`MongoDBDataStore` and :class:`MongoDBEventBroker`; it comes
    first among their bases, so its validated ``retry_settings`` replaces the
    unvalidated one of APScheduler's ``RetryMixin``. It has no slots because a class
    may not have two bases with slots of their own.
    """

    client_or_uri: object = attrs.field(validator=client_or_uri_validator)
    database: str = attrs.field(
        default="apscheduler", kw_only=True, validator=database_validator
    )
    retry_settings: RetrySettings = attrs.field(
        factory=RetrySettings, kw_only=True, validator=instance_of(RetrySettings)
    )


def to_signer(value: object) -> Signer | None:
    """Return the signer of one key or several (or ``None`` for no key)."""
    if value is None or isinstance(value, Signer):
        return value

    return Signer(value)


@attrs.define(slots=False, eq=False, repr=False)
class SigningOptions:
    """
    The signing key(s), and whether unsigned documents are accepted meanwhile.

    A base of :class:`MongoDBDataStore` and :class:`MongoDBEventBroker` (see
    :mod:`._signing`). The keys become a :class:`Signer`, whose repr hides them.
    """

    signing_key: Signer | None = attrs.field(
        default=None, kw_only=True, converter=to_signer
    )
    accept_unsigned: bool = attrs.field(
        default=False, kw_only=True, validator=instance_of(bool)
    )

    def _warn_if_unsigned_accepted(self, logger: Logger, what: str) -> None:
        """Say at start that the trust boundary is open while unsigned is accepted."""
        if self.signing_key is not None and self.accept_unsigned:
            logger.warning(
                "%s accepts unsigned documents (accept_unsigned=True): anyone who "
                "can write the database can still run code here. Sign the stored "
                "documents (apscheduler-mongo sign) and turn this off",
                what,
            )
