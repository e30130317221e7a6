"""
Count the server commands the store sends per job and per schedule firing.

Usage: ``python benchmarks/count_commands.py [URI]`` (default: ``MONGODB_URI``, or a
mongoeco wire server started for the run on Python >= 3.13). Counts come from
pymongo's command monitoring, so they are exact, whatever the machine's speed.
``bench.py`` prints the same counts next to those of APScheduler's built-in store.
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import ExitStack

from _common import server_uri
from _counts import count_commands, ours_only_lines


def main() -> None:
    uri = sys.argv[1] if len(sys.argv) > 1 else None
    with ExitStack() as stack:
        if uri is None:
            uri = stack.enter_context(server_uri())

        result = asyncio.run(count_commands("ours", uri))
        sys.stdout.write("\n".join(ours_only_lines(result)) + "\n")


if __name__ == "__main__":
    main()
