"""Command line: ``python -m apscheduler_mongo`` (or ``apscheduler-mongo``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import anyio


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apscheduler-mongo",
        description="Tools for the MongoDB backends of APScheduler 4.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run a scheduler on the MongoDB store for a few seconds",
        description=(
            "Start an AsyncScheduler on MongoDBDataStore, run two interval schedules "
            "for a few seconds and print what ran and when. Uses --uri or "
            "MONGODB_URI; without either, an in-process mongomock-motor database. "
            "The demo database is emptied first."
        ),
    )
    demo.add_argument(
        "--uri",
        default=os.environ.get("MONGODB_URI"),
        help="MongoDB URI (default: the MONGODB_URI environment variable)",
    )
    demo.add_argument(
        "--database",
        default="apscheduler_demo",
        help="database to use; it is emptied first (default: %(default)s)",
    )
    demo.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="how long to run the schedules (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    from ._demo import run_demo

    try:
        ran = anyio.run(run_demo, args.uri, args.database, args.seconds)
    except (TypeError, ValueError, RuntimeError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2

    return 0 if ran > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
