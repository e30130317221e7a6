"""
A single-node MongoDB replica set in a Docker container, for ``nox -s real_server``.

``python -m tests.support.replica_set IMAGE COMMAND...``, run from the checkout,
starts the mongod of ``IMAGE`` (an official ``mongo`` image) as replica set ``rs0``,
with test commands on (the fail point tests need them), published on a free port of
127.0.0.1 only; it runs ``COMMAND`` with ``MONGODB_URI`` pointing at it, removes the
container however the command ends, and exits with the command's status. It needs
testcontainers and a Docker engine; the tests never import it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pymongo import MongoClient
from testcontainers.core.container import DockerContainer

#: The port mongod listens on inside the container
MONGOD_PORT = 27017
#: Seconds the member may take to elect itself primary once initiated
PRIMARY_TIMEOUT = 60


def _initiate(uri: str) -> None:
    """Initiate the replica set at ``uri`` and wait until its member is primary."""
    client: MongoClient[dict[str, Any]] = MongoClient(
        uri, serverSelectionTimeoutMS=60_000
    )
    with client:
        # No configuration: the member names itself by the container's host name
        client.admin.command("replSetInitiate")
        deadline = time.monotonic() + PRIMARY_TIMEOUT
        while not client.admin.command("hello").get("isWritablePrimary"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no primary after {PRIMARY_TIMEOUT} s")

            time.sleep(0.2)


@contextmanager
def replica_set(image: str) -> Iterator[str]:
    """Start a single-node replica set from ``image``; yield its URI."""
    options = ["--replSet", "rs0", "--setParameter", "enableTestCommands=1"]
    container = DockerContainer(image).with_command(options)
    # docker-py's (address, None): loopback only, any free port (with_bind_ports
    # takes no address)
    ports: dict[str, Any] = container.ports
    ports[f"{MONGOD_PORT}/tcp"] = ("127.0.0.1", None)
    with container:
        port = container.get_exposed_port(MONGOD_PORT)
        # The member advertises the container's host name, which this host cannot
        # resolve: clients connect to the published port and never discover others
        uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
        _initiate(uri)
        yield f"{uri}&replicaSet=rs0"


def main(image: str, *command: str) -> int:
    """Run ``command`` against a fresh replica set of ``image``; return its status."""
    with replica_set(image) as uri:
        sys.stderr.write(f"{image}: a single-node replica set at {uri}\n")
        env = {**os.environ, "MONGODB_URI": uri}
        return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m tests.support.replica_set IMAGE COMMAND...")

    sys.exit(main(*sys.argv[1:]))
