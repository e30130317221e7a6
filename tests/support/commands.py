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

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.commands.append((event.command_name, dict(event.command)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

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
