"""
Run a mongoeco wire-protocol server that requires authentication.

Usage: ``python mongoeco_auth_server.py USER PASSWORD [PORT]`` (0 or no port picks a
free one). The server accepts exactly one user, ``USER`` with ``PASSWORD`` in the
``admin`` database, and refuses every command on an unauthenticated connection. It
prints ``READY <port>`` on one line once it accepts connections and stops cleanly on
SIGTERM or SIGINT, like ``mongoeco_server.py``.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from mongoeco.engines import MemoryEngine
from mongoeco.wire import AsyncMongoEcoProxyServer, WireAuthUser


async def serve(username: str, password: str, port: int) -> None:
    server = AsyncMongoEcoProxyServer(
        engine=MemoryEngine(),
        host="127.0.0.1",
        port=port,
        auth_users=(
            WireAuthUser(
                username=username,
                password=password,
                roles=({"role": "root", "db": "admin"},),
            ),
        ),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    address = await server.start()
    sys.stdout.write(f"READY {address.port}\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await server.close()


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: mongoeco_auth_server.py USER PASSWORD [PORT]")

    asyncio.run(
        serve(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 0)
    )
