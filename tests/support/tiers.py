"""
The tiers a test runs on, and the one way to keep a test to the wire tier.

The ``tier`` fixture (in ``conftest.py``) runs each test that uses a ``client`` once
per tier: mongomock-motor in this process, and pymongo and Motor over real sockets.
"""

from __future__ import annotations

import pytest

#: The ``tier`` fixture's parameters: the wire ones are marked ``wire``
TIERS = [
    pytest.param("mongomock", id="mongomock"),
    pytest.param("wire", id="wire", marks=pytest.mark.wire),
    pytest.param("motor", id="motor", marks=pytest.mark.wire),
]

#: Keeps a test module (``pytestmark = [*WIRE_ONLY, ...]``) or class (the same in its
#: body) to the wire tier, marked ``wire``: for tests that need a server over real
#: sockets (separate processes, the proxy). Each test gets the ``tier``, used or not.
WIRE_ONLY = [
    pytest.mark.usefixtures("tier"),
    pytest.mark.parametrize(
        "tier", [pytest.param("wire", marks=pytest.mark.wire)], indirect=True
    ),
]
