"""
What the APScheduler 3 jobs in ``documents.json`` name: their functions, a class
their arguments hold, and a trigger class of the user's own (which cannot be
converted). Importable by the fixture script (APScheduler 3) and by the tests.
"""

from __future__ import annotations


def tick(*args: object, **kwargs: object) -> None:
    """Do nothing: a job's function."""


def tock(*args: object, **kwargs: object) -> None:
    """Do nothing: another job's function."""


class Point:
    """A class of the user's own, in a job's arguments."""

    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    def __hash__(self) -> int:
        return hash((self.x, self.y))

    def __repr__(self) -> str:
        return f"Point({self.x}, {self.y})"


try:  # only where APScheduler 3 is installed (the fixture script)
    from apscheduler.triggers.base import BaseTrigger
except ImportError:  # pragma: no cover - APScheduler 4 has no such module
    pass
else:

    class EveryOtherDay(BaseTrigger):  # type: ignore[misc]
        """A trigger of the user's own, which the importer cannot convert."""

        def get_next_fire_time(self, previous_fire_time, now):  # type: ignore[no-untyped-def]
            from datetime import timedelta

            return (previous_fire_time or now) + timedelta(days=2)

        def __getstate__(self):  # type: ignore[no-untyped-def]
            return {"version": 1}

        def __setstate__(self, state):  # type: ignore[no-untyped-def]
            pass

        def __str__(self) -> str:
            return "every_other_day"
