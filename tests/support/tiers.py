"""
The tiers a test runs on, and the one way to keep a test to the wire tier.

The ``tier`` fixture (in ``conftest.py``) runs each test that uses a ``client`` once
per tier: mongomock-motor in this process, and pymongo and Motor over real sockets.
"""

from __future__ import annotations

from typing import TypeVar, cast

import pytest

T = TypeVar("T")

#: The ``tier`` fixture's parameters: the wire ones are marked ``wire``
TIERS = [
    pytest.param("mongomock", id="mongomock"),
    pytest.param("wire", id="wire", marks=pytest.mark.wire),
    pytest.param("motor", id="motor", marks=pytest.mark.wire),
]


class Marks(list[pytest.MarkDecorator]):
    """Marks that go together: in a ``pytestmark`` list, or as one decorator."""

    def __call__(self, test: T) -> T:
        """Apply every mark to a test function or class."""
        for mark in self:
            test = cast(T, mark(test))

        return test


#: Keeps a test to the wire tier, marked ``wire``: for tests that need a server
#: reached over real sockets (from other processes, or through the proxy). Decorate a
#: test function or class with it, or put it in a module's ``pytestmark``
#: (``[*WIRE_ONLY, ...]``). Each test gets the ``tier`` fixture, whether it uses it or
#: not, so that it can be parametrized.
WIRE_ONLY = Marks(
    [
        pytest.mark.usefixtures("tier"),
        pytest.mark.parametrize(
            "tier", [pytest.param("wire", marks=pytest.mark.wire)], indirect=True
        ),
    ]
)
#: Keeps a test to the in-process tier (mongomock-motor): for volumes the wire
#: stand-in takes minutes to insert (it scans its whole collection on each insert)
IN_PROCESS_ONLY = Marks(
    [
        pytest.mark.usefixtures("tier"),
        pytest.mark.parametrize("tier", [pytest.param("mongomock")], indirect=True),
    ]
)
#: Marks a module whose tests run workers in other processes: slow, and on the wire
#: tier only (separate processes need a server they can all reach)
MULTI_PROCESS = Marks([*WIRE_ONLY, pytest.mark.slow])
