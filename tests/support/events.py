"""Recording what a broker delivers, and knowing when all of it has arrived."""

from __future__ import annotations

from typing import Any

import anyio
from apscheduler import Event, TaskRemoved
from apscheduler.abc import EventBroker

#: The task id of the marker event that ends a recording
MARKER = "--marker--"


class Recorder:
    """Records the events of some types that a broker delivers to its subscribers."""

    def __init__(
        self, broker: EventBroker, *event_types: type[Event], timeout: float
    ) -> None:
        """
        :param timeout: how long :meth:`settled` waits for its marker, at most
        """
        self.events: list[Any] = []
        self._broker = broker
        self._event_types = event_types
        self._timeout = timeout
        self._marker_seen = anyio.Event()
        broker.subscribe(self._record, {*event_types, TaskRemoved})

    def _record(self, event: Event) -> None:
        if isinstance(event, TaskRemoved) and event.task_id == MARKER:
            self._marker_seen.set()
        elif isinstance(event, self._event_types):
            self.events.append(event)

    async def settled(self, publisher: EventBroker | None = None) -> list[Any]:
        """
        Return the events once a marker sent after them has arrived.

        :param publisher: the broker that sends the marker (by default, the one
            recorded); delivery keeps each publisher's order, so once its marker is
            in, so is everything it published before
        """
        await (publisher or self._broker).publish(TaskRemoved(task_id=MARKER))
        with anyio.fail_after(self._timeout):
            await self._marker_seen.wait()

        return self.events
