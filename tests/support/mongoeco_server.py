"""
Run a mongoeco wire-protocol server on a loopback port until told to stop.

Usage: ``python mongoeco_server.py [PORT [USER PASSWORD]]`` (port 0 or none picks a
free one). With USER and PASSWORD the server requires authentication and accepts
exactly that user (in ``admin``). Prints ``READY <port>`` on one line once it accepts
connections, and stops cleanly on SIGTERM or SIGINT. mongoeco has no command line of
its own; the test session starts this script as a separate process so that its
clients talk to it over real sockets.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from mongoeco.engines import MemoryEngine
from mongoeco.wire import AsyncMongoEcoProxyServer, WireAuthUser


async def serve(
    port: int, user: str | None = None, password: str | None = None
) -> None:
    users: tuple[WireAuthUser, ...] = ()
    if user is not None and password is not None:
        root = {"role": "root", "db": "admin"}
        users = (WireAuthUser(username=user, password=password, roles=(root,)),)

    server = AsyncMongoEcoProxyServer(
        engine=MemoryEngine(), host="127.0.0.1", port=port, auth_users=users
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
    if len(sys.argv) not in (1, 2, 4):
        sys.exit("usage: mongoeco_server.py [PORT [USER PASSWORD]]")

    asyncio.run(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0, *sys.argv[2:4]))
