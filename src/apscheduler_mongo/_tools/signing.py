"""
What ``apscheduler-mongo sign`` does: sign the documents a store already holds.

For re-signing with the first key after a rotation and, with ``adopt_unsigned``,
for rolling signing out on a store that has run without a key. Nothing stored is
deserialized or imported: a part is signed over its stored bytes, as they are.
Adopting unsigned parts vouches for what the database holds now, so it is for a
database the operator trusts as it stands; a part whose signature is wrong (changed
by someone without the key) is left alone and reported, never signed again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from tenacity import AsyncRetrying

from .. import _layout as layout
from .._adapters import Collection, Update
from .._layout import Document
from .._signing import AllowedCallables, Signer, namespace, value_at

#: How many documents are read (and written) at a time
BATCH = 500


@attrs.define
class SignReport:
    """What signing a store did, part by part."""

    #: Parts that carried no signature and were signed (``adopt_unsigned``)
    signed: int = 0
    #: Parts that carry no signature, left so: (kind, document id, part)
    unsigned: list[tuple[str, str, str]] = attrs.field(factory=list)
    #: Parts signed with an older key, signed again with the first
    re_signed: int = 0
    #: Parts already signed with the first key
    already: int = 0
    #: Parts changed while this ran (left for another run)
    changed: int = 0
    #: What was left unsigned, and why: (kind, document id, part, reason)
    refused: list[tuple[str, str, str, str]] = attrs.field(factory=list)


@attrs.define
class StoreSigner:
    """Sign the tasks, schedules and jobs of one database with ``signer``."""

    collections: Mapping[str, Collection]
    signer: Signer
    #: The database's name (signatures bind it)
    scope: str
    #: Makes the loop that retries temporary failures
    retry: Callable[[], AsyncRetrying]
    allowed: AllowedCallables | None = None
    dry_run: bool = False
    #: Sign the parts that carry no signature too (rolling signing out). Without
    #: it, only parts that a key verifies are signed again: on a signed store, an
    #: unsigned part is someone's write without the key (one a paused schedule
    #: keeps from being quarantined, say), which signing would vouch for
    adopt_unsigned: bool = False
    report: SignReport = attrs.field(factory=SignReport)

    async def run(self) -> SignReport:
        for kind in (layout.TASKS, layout.SCHEDULES, layout.JOBS):
            await self._sign_collection(kind, self.collections[kind])

        return self.report

    async def _sign_collection(self, kind: str, collection: Collection) -> None:
        parts = layout.SIGNED_PARTS[kind]
        fields = {path for paths in parts.values() for path in paths}
        projection = {**dict.fromkeys(fields, 1), layout.MAC_FIELD: 1}
        after: Any = None
        while True:
            query = {} if after is None else layout.after_id(after)
            async for attempt in self.retry():
                with attempt:
                    batch = await collection.find(
                        query, projection, sort=layout.BY_ID, limit=BATCH
                    )

            if not batch:
                return

            updates = [
                update
                for document in batch
                for part in parts
                if (update := self._update(kind, document, part)) is not None
            ]
            if updates and not self.dry_run:
                # Each update sets a signature over the values it re-checks: a
                # retry applies it once
                async for attempt in self.retry():
                    with attempt:
                        matched = await collection.update_each(updates)

                self.report.changed += len(updates) - matched

            after = batch[-1]["_id"]

    def _update(self, kind: str, document: Document, part: str) -> Update | None:
        """Return the write that signs one part, or ``None`` (and count why)."""
        paths = layout.SIGNED_PARTS[kind][part]
        values = [value_at(document, path) for path in paths]
        if values[0] is None:
            return None  # the document holds no such part (a job without a result)

        document_id = document["_id"]
        where = namespace(self.scope, kind)
        signature = layout.signature_of(document, part)
        if signature is not None:
            index = (
                self.signer.signer_of(where, document_id, part, values, signature)
                if isinstance(signature, bytes)
                else -1
            )
            if index == 0:
                self.report.already += 1
                return None

            if index < 0:
                reason = "its signature is wrong: changed without the key?"
                self.report.refused.append((kind, repr(document_id), part, reason))
                return None

            self.report.re_signed += 1
        elif not self.adopt_unsigned:
            self.report.unsigned.append((kind, repr(document_id), part))
            return None
        elif kind == layout.TASKS and self.allowed is not None:
            if not self.allowed.allows(document.get("func")):
                reason = f"its callable {document.get('func')!r} is not allowed"
                self.report.refused.append((kind, repr(document_id), part, reason))
                return None

        if signature is None:
            self.report.signed += 1

        new = self.signer.sign(where, document_id, part, values)
        unchanged = layout.unchanged_fields(
            document_id, dict(zip(paths, values, strict=True))
        )
        return Update(unchanged, layout.signature_update(part, new))
