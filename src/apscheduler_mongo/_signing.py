"""
The trust boundary at the database: signed stored data, and the callables allowed.

Whoever can write the database must not be able to run code on the hosts that read
it. Everything a process would deserialize or import (triggers, arguments, results,
event payloads, a task's callable and executor) is signed when written and checked
when read, before it is touched: an HMAC-SHA256 with the store's key over the
collection, the document's ``_id``, the name of the signed part and the values of its
fields (see ``_layout.SIGNED_PARTS``), so a signature moved to another document or
part does not match. Signatures are kept beside the data, in the document's ``mac``
field (one entry per part). :doc:`security` describes the threat model.

:class:`Codec` is what the marshalling code (the one place that turns documents into
APScheduler's structures) uses to write and read: the serializer, the signer (if a
key is set) and the allowed callables.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import attrs
from apscheduler import DeserializationError
from apscheduler.abc import Serializer
from bson import Binary, encode
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from bson.errors import InvalidDocument

from ._layout import MAC_FIELD, SIGNED_PARTS, Document, signature_of

#: Where the command line and the dashboard read the signing key(s) from
KEY_VARIABLE = "APSCHEDULER_MONGO_SIGNING_KEY"
#: The shortest key accepted (bytes): a key is a secret, not a password
MIN_KEY_BYTES = 16
#: Separates the keys of a rotation in the environment variable or a key file
_KEY_SEPARATOR = re.compile(r"[,\s]+")
#: How a message is encoded: UUIDs (at any depth, however a client decodes them)
#: as BSON's standard binary subtype 4
_MESSAGE_CODEC: CodecOptions[Any] = CodecOptions(
    uuid_representation=UuidRepresentation.STANDARD
)
#: Tells this scheme's messages from any other use of the same key
_DOMAIN = b"apscheduler-mongo/mac/1\x00"


class UnverifiedDataError(DeserializationError):
    """Raised when stored data carries no valid signature by a known key."""


class DisallowedCallableError(PermissionError):
    """Raised when a task's callable is outside the store's ``allowed_callables``."""


def to_keys(value: object) -> tuple[bytes, ...]:
    """
    Return the signing keys given as one key or a sequence (the first one signs).

    :raises TypeError: if a key is neither ``bytes`` nor ``str``
    :raises ValueError: if there is no key, or a key is shorter than 16 bytes
    """
    given: Sequence[object] = (
        [value] if isinstance(value, (bytes, str)) else list(value)  # type: ignore[call-overload]
    )
    keys: list[bytes] = []
    for key in given:
        if isinstance(key, str):
            key = key.encode()
        elif not isinstance(key, bytes):
            raise TypeError(f"a signing key must be bytes or str, not {type(key)}")

        if len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"a signing key must be at least {MIN_KEY_BYTES} bytes long "
                f"(make one with: python -c 'import secrets; "
                f"print(secrets.token_urlsafe(32))')"
            )
        keys.append(key)

    if not keys:
        raise ValueError("no signing key given")

    return tuple(keys)


def split_keys(text: str) -> list[str]:
    """Split the text of the key variable or a key file into its keys."""
    return [key for key in _KEY_SEPARATOR.split(text.strip()) if key]


def keys_from_environment(
    key_file: str | os.PathLike[str] | None = None,
) -> tuple[bytes, ...] | None:
    """
    Return the keys in ``key_file``, else in :data:`KEY_VARIABLE`, else ``None``.

    Keys are separated by commas or white space; the first one signs.
    """
    if key_file is not None:
        text = Path(key_file).read_text()
    elif (text := os.environ.get(KEY_VARIABLE, "")).strip() == "":
        return None

    return to_keys(split_keys(text))


@attrs.frozen(repr=False)
class Signer:
    """
    Sign and check stored values with HMAC-SHA256; the first key signs, all check.

    The keys never appear in a repr, a log line or an error message.
    """

    keys: tuple[bytes, ...] = attrs.field(converter=to_keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<{len(self.keys)} key(s)>)"

    def sign(
        self, collection: str, document_id: object, part: str, values: list[Any]
    ) -> bytes:
        """Return the signature of one part of one document."""
        message = _message(collection, document_id, part, values)
        return hmac.new(self.keys[0], message, hashlib.sha256).digest()

    def verify(
        self,
        collection: str,
        document_id: object,
        part: str,
        values: list[Any],
        signature: bytes,
    ) -> bool:
        """Tell whether ``signature`` is that of the part by any of the keys."""
        return self.signer_of(collection, document_id, part, values, signature) >= 0

    def signer_of(
        self,
        collection: str,
        document_id: object,
        part: str,
        values: list[Any],
        signature: bytes,
    ) -> int:
        """Return the index of the key that made ``signature``; -1 if none did."""
        message = _message(collection, document_id, part, values)
        for index, key in enumerate(self.keys):
            expected = hmac.new(key, message, hashlib.sha256).digest()
            if hmac.compare_digest(expected, signature):
                return index

        return -1


def _canonical(value: object) -> object:
    """Return a value as BSON encodes it the same way however it was read back."""
    if isinstance(value, UUID):
        return Binary.from_uuid(value)

    if isinstance(value, Binary) and value.subtype == 0:
        return bytes(value)

    return value


def _message(
    collection: str, document_id: object, part: str, values: list[Any]
) -> bytes:
    """Return what a part's signature covers: where it is, and what it holds."""
    body = {
        "c": collection,
        "i": _canonical(document_id),
        "p": part,
        "v": [_canonical(value) for value in values],
    }
    return _DOMAIN + encode(body, codec_options=_MESSAGE_CODEC)


def value_at(document: Mapping[str, Any], path: str) -> Any:
    """Return the value at a dotted ``path`` of a document (``None`` if absent)."""
    value: Any = document
    for name in path.split("."):
        if not isinstance(value, Mapping):
            return None

        value = value.get(name)

    return value


#: What a pattern of ``allowed_callables`` looks like: ``module:qualname`` or
#: ``module:*``
_PATTERN = re.compile(
    r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:(\*|[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)"
)


@attrs.frozen
class AllowedCallables:
    """
    The task callables a store hands to schedulers: ``module:qualname`` patterns.

    ``"myapp.tasks:send_report"`` allows that one callable, ``"myapp.tasks:*"``
    every callable the module ``myapp.tasks`` defines at its top level (not those
    of its submodules, nor ``Class.method``: name those). A reference is compared
    as text, before anything is imported.
    """

    patterns: tuple[str, ...]

    @classmethod
    def of(cls, value: Iterable[str]) -> AllowedCallables:
        """
        Return the allowed callables given as patterns.

        :raises TypeError: if ``value`` is a string or a pattern is no string
        :raises ValueError: if a pattern is not of the form ``module:qualname`` or
            ``module:*``
        """
        if isinstance(value, (str, bytes)):
            raise TypeError("allowed_callables must be a sequence of patterns")

        patterns = tuple(value)
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"an allowed callable must be a str, not {pattern!r}")

            if not _PATTERN.fullmatch(pattern):
                raise ValueError(
                    f"{pattern!r} is no allowed-callable pattern: use "
                    f"'module:qualname' or 'module:*'"
                )

        return cls(patterns)

    def allows(self, ref: object) -> bool:
        """Tell whether a task's ``func`` (a ``module:qualname`` string) is allowed."""
        if ref is None:
            return True  # no callable to import: the scheduler's own registry

        if not isinstance(ref, str) or ref.count(":") != 1:
            return False

        module, _, name = ref.partition(":")
        for pattern in self.patterns:
            allowed_module, _, allowed_name = pattern.partition(":")
            if module != allowed_module:
                continue

            # "*" is one name defined in the module: a dotted one would reach
            # through an attribute (a module it imported, say) to elsewhere
            if allowed_name == name or (allowed_name == "*" and "." not in name):
                return True

        return False


@attrs.frozen
class Codec:
    """
    How a store writes and reads what it must not trust blindly.

    :param serializer: turns triggers, arguments and results into bytes and back
    :param signer: signs what is written and checks what is read (no key: neither)
    :param accept_unsigned: while rolling signing out, accept documents that carry
        no signature at all (a wrong signature is never accepted)
    :param allowed: the task callables this store hands out (``None``: any)
    :param scope: the database whose documents these are: a signature made for one
        database does not verify in another (stores that share a key)
    """

    serializer: Serializer
    signer: Signer | None = None
    accept_unsigned: bool = False
    allowed: AllowedCallables | None = None
    scope: str = ""

    def sign(self, collection: str, document: Document, *parts: str) -> None:
        """Put the signatures of ``parts`` (all of the kind's, if none) in place."""
        if self.signer is None:
            return

        macs = document.setdefault(MAC_FIELD, {})
        for part in parts or SIGNED_PARTS[collection]:
            values = _values(collection, part, document)
            macs[part] = self.signer.sign(
                namespace(self.scope, collection), document["_id"], part, values
            )

    def signed_changes(
        self, collection: str, document_id: object, part: str, changes: Document
    ) -> Document:
        """
        Return the ``$set`` fields that sign ``part`` as ``changes`` (a ``$set``
        that writes every field of the part) leave it.
        """
        if self.signer is None:
            return {}

        values = _values(collection, part, changes)
        signature = self.signer.sign(
            namespace(self.scope, collection), document_id, part, values
        )
        return {f"{MAC_FIELD}.{part}": signature}

    def check(self, collection: str, document: Mapping[str, Any], part: str) -> None:
        """
        Check the signature of one part of a document read, before it is used.

        :raises UnverifiedDataError: if a key is set and the part carries no
            signature (unless unsigned documents are accepted) or a wrong one
        """
        if self.signer is None:
            return

        signature = signature_of(document, part)
        if signature is None:
            if self.accept_unsigned:
                return

            raise UnverifiedDataError(f"its {part!r} part carries no signature")

        values = _values(collection, part, document)
        try:
            valid = isinstance(signature, bytes) and self.signer.verify(
                namespace(self.scope, collection),
                document.get("_id"),
                part,
                values,
                signature,
            )
        except (InvalidDocument, TypeError, ValueError, OverflowError) as exc:
            # A value the message cannot hold: no one signed that
            raise UnverifiedDataError(f"its {part!r} part cannot be checked") from exc

        if not valid:
            raise UnverifiedDataError(
                f"the signature of its {part!r} part does not match (changed by "
                f"someone without the key, or signed with a key this store lacks)"
            )

    def check_callable(self, ref: object) -> None:
        """
        Check that a task's callable may be handed out, before anything imports it.

        :raises DisallowedCallableError: if it is outside ``allowed_callables``
        """
        if self.allowed is not None and not self.allowed.allows(ref):
            raise DisallowedCallableError(
                f"the callable {ref!r} is not among this store's allowed_callables"
            )


def namespace(scope: str, kind: str) -> str:
    """Return where a kind of document lives, as a signature binds it."""
    return f"{scope}.{kind}"


def _values(collection: str, part: str, document: Mapping[str, Any]) -> list[Any]:
    """Return the values of a part's fields, in the order they are signed."""
    return [value_at(document, path) for path in SIGNED_PARTS[collection][part]]
