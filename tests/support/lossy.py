"""
Store collections that lose replies in process: the write is applied, the reply lost.

Each wrapper stands in for one of a started store's collections (``store._jobs``,
``store._schedules``) and passes every call through, but for the one it was told to
lose. :meth:`~CollectionWrapper.as_collection` gives it the collection's type, so that
a test can put it in place::

    lossy = LostReply(store._jobs, "update_each")
    store._jobs = lossy.as_collection()
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, cast

from pymongo.errors import AutoReconnect

from apscheduler_mongo._adapters import Collection


class CollectionWrapper:
    """Stands in for ``collection``; a subclass says what its attributes do."""

    def __init__(self, collection: Collection, name: str) -> None:
        self._collection = collection
        #: The method whose call loses its reply
        self._name = name

    def as_collection(self) -> Collection:
        """Return this wrapper, typed as the collection it stands in for."""
        return cast(Collection, self)


class LostReply(CollectionWrapper):
    """
    A collection whose method ``name`` applies its first call, then loses the reply.

    ``meanwhile`` runs between the applied write and the error, standing for what
    other schedulers do before the retry.
    """

    def __init__(
        self,
        collection: Collection,
        name: str,
        meanwhile: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(collection, name)
        self._meanwhile = meanwhile
        #: How many replies were lost (one at most)
        self.lost = 0

    def __getattr__(self, attribute: str) -> Any:
        target = getattr(self._collection, attribute)
        if attribute != self._name or self.lost:
            return target

        async def apply_then_lose(*args: Any, **kwargs: Any) -> Any:
            await target(*args, **kwargs)
            self.lost += 1
            if self._meanwhile is not None:
                await self._meanwhile()

            raise AutoReconnect("connection closed (simulated lost reply)")

        return apply_then_lose


def _refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise AutoReconnect("connection refused (simulated outage)")


class Outage(CollectionWrapper):
    """
    A collection whose method ``name`` applies its first call, then loses the reply,
    and whose every call fails from then on until :meth:`end` (the retries run out).
    """

    def __init__(self, collection: Collection, name: str) -> None:
        super().__init__(collection, name)
        self.down = False

    def end(self) -> Collection:
        """End the outage; return the collection to put back in place."""
        self.down = False
        return self._collection

    def __getattr__(self, attribute: str) -> Any:
        target = getattr(self._collection, attribute)
        if not callable(target):
            return target

        if self.down:
            return _refuse

        if attribute != self._name:
            return target

        async def apply_then_go_down(*args: Any, **kwargs: Any) -> Any:
            await target(*args, **kwargs)
            self.down = True
            _refuse()

        return apply_then_go_down
