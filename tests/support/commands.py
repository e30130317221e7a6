"""What a client sends: the commands, recorded by a pymongo command listener."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pymongo import monitoring

Command = tuple[str, dict[str, Any]]


class CommandLog(monitoring.CommandListener):
    """Record each command a client sends: its name and its body."""

    def __init__(self) -> None:
        self.commands: list[Command] = []
        #: Each succeeded command's name and the documents its reply returned (the
        #: cursor's batch; 0 for a command that returns no cursor)
        self.replies: list[tuple[str, int]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.commands.append((event.command_name, dict(event.command)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        cursor = event.reply.get("cursor") or {}
        batch = cursor.get("firstBatch", cursor.get("nextBatch", ()))
        self.replies.append((event.command_name, len(batch)))

    def returned(self, since: int = 0) -> int:
        """Return how many documents the replies since the ``since``-th returned."""
        return sum(count for _, count in self.replies[since:])

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    @contextmanager
    def recording(self) -> Iterator[list[str]]:
        """
        Yield a list that holds, once the block ends, what it sent: each command's
        name and the collection it names (``"find jobs"``).
        """
        start = len(self.commands)
        names: list[str] = []
        try:
            yield names
        finally:
            names.extend(
                f"{name} {command.get(name)}" for name, command in self.commands[start:]
            )
