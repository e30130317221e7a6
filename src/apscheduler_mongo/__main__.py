"""Command line: ``python -m apscheduler_mongo`` (or ``apscheduler-mongo``)."""

from __future__ import annotations

import sys

from ._tools.cli import main as main

if __name__ == "__main__":
    sys.exit(main())
