"""Development sessions: ``nox -l`` lists them, plain ``nox`` runs the default ones."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["tests", "lint", "typing", "docs", "package"]
nox.options.reuse_existing_virtualenvs = True

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
LATEST = PYTHONS[-1]


#: The wire tier's stand-in server needs this Python or a later one
WIRE_SERVER_PYTHON = (3, 13)
#: Where the wire server's own environment lives, for sessions on older Pythons
WIRE_SERVER_VENV = Path(".nox", "_wire-server")
#: Read by tests/support/servers.py: the Python that runs the wire server
WIRE_PYTHON_VARIABLE = "APSCHEDULER_MONGO_WIRE_PYTHON"


def _version_of(python: str) -> tuple[int, int] | None:
    """Return the version of the Python at ``python``, or None if it does not run."""
    try:
        output = subprocess.run(
            [python, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None

    return (int(output[0]), int(output[1])) if len(output) == 2 else None


def _newer_python() -> str | None:
    """Find a Python >= 3.13: on PATH (pyenv's shims included), or under pyenv."""
    names = [f"python3.{minor}" for minor in range(WIRE_SERVER_PYTHON[1], 20)]
    candidates = [path for name in names if (path := shutil.which(name))]
    if pyenv := shutil.which("pyenv"):
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True)
        versions = Path(root.stdout.strip(), "versions")
        candidates += sorted(map(str, versions.glob("3.*/bin/python3")), reverse=True)

    for python in candidates:
        version = _version_of(python)
        if version is not None and version >= WIRE_SERVER_PYTHON:
            return python

    return None


def _wire_server_requirement() -> str:
    """Return the test extra's requirement on mongoeco, without its marker."""
    extras = nox.project.load_toml("pyproject.toml")["project"]["optional-dependencies"]
    [requirement] = [r for r in extras["test"] if r.startswith("mongoeco")]
    return str(requirement).partition(";")[0].strip()


def _provide_wire_server(session: nox.Session) -> None:
    """
    Give a session on Python < 3.13 a Python that runs the wire tier's server.

    The mongoeco server needs Python 3.13 and runs in a process of its own, so any
    session can test against it: this finds a Python >= 3.13, installs mongoeco in an
    environment of its own (kept between runs) and tells the tests where it is.
    """
    if WIRE_PYTHON_VARIABLE in os.environ or os.environ.get("MONGODB_URI"):
        return  # chosen by whoever runs nox

    version = _version_of(str(Path(session.bin, "python")))
    if version is not None and version >= WIRE_SERVER_PYTHON:
        return  # the session's own Python runs it

    python = _newer_python()
    if python is None:
        session.warn("no Python >= 3.13 found: the wire tier will be skipped")
        return

    server_python = str(Path(WIRE_SERVER_VENV, "bin", "python").absolute())
    if _version_of(server_python) is None:
        session.run(python, "-m", "venv", str(WIRE_SERVER_VENV), external=True)

    session.run(
        server_python,
        "-m",
        "pip",
        "install",
        "--quiet",
        _wire_server_requirement(),
        external=True,
    )
    session.env[WIRE_PYTHON_VARIABLE] = server_python


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite under coverage (set MONGODB_URI for a real server)."""
    session.install("-e", ".[test]")
    _provide_wire_server(session)
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    if any(Path.cwd().glob(".coverage.*")):
        session.run("coverage", "combine")
    session.run("coverage", "report")


#: The MongoDB image ``nox -s real_server`` starts, unless this variable names another
MONGODB_IMAGE_VARIABLE = "MONGODB_IMAGE"
DEFAULT_MONGODB_IMAGE = "mongo:8.0"
#: Answers with status 0 only where a Docker engine answers testcontainers' client
_PING_DOCKER = "import docker; docker.from_env().ping()"


@nox.session(python=LATEST)
def real_server(session: nox.Session) -> None:
    """
    Run the wire and real-server tiers against MongoDB in Docker (not run by default).

    Starts a single-node replica set from the image that ``MONGODB_IMAGE`` names
    (``mongo:8.0`` by default) with testcontainers, on a free port of 127.0.0.1, and
    runs the tests that ``MONGODB_URI`` enables against it; arguments after ``--``
    go to pytest. Fails, saying so, where no Docker engine answers.
    """
    image = os.environ.get(MONGODB_IMAGE_VARIABLE) or DEFAULT_MONGODB_IMAGE
    session.install("testcontainers >= 4, < 5")
    python = str(Path(session.bin, "python"))
    ping = subprocess.run([python, "-c", _PING_DOCKER], capture_output=True, text=True)
    if ping.returncode:
        why = (ping.stderr.strip().splitlines() or ["no reply"])[-1]
        session.error(
            f"this session needs a Docker engine, and none answers ({why}); start "
            "one, or run 'nox -s tests' with MONGODB_URI set to a replica set"
        )

    session.install("-e", ".[test]")
    pytest = ["python", "-m", "pytest", "-m", "wire or real_server"]
    helper = ["python", "-m", "tests.support.replica_set", image]
    session.run(*helper, *pytest, *session.posargs)


@nox.session(python=LATEST)
def quick(session: nox.Session) -> None:
    """Run the tests without the slow multi-process ones: the inner loop."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "not slow", *session.posargs)


@nox.session(python=LATEST)
def lint(session: nox.Session) -> None:
    """Check the code with ruff's linter and formatter, and the GitHub workflows."""
    session.install("ruff", "check-jsonschema")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # Against GitHub's workflow schema, which check-jsonschema bundles (no download)
    workflows = sorted(map(str, Path(".github", "workflows").glob("*.y*ml")))
    schema = ["--builtin-schema", "vendor.github-workflows"]
    session.run("check-jsonschema", *schema, *workflows)


@nox.session(python=LATEST)
def typing(session: nox.Session) -> None:
    """Type-check the package and the tests with mypy in strict mode."""
    session.install("-e", ".[test]", "mypy")
    session.run("mypy", *session.posargs)


@nox.session(python=LATEST)
def docs(session: nox.Session) -> None:
    """Build the HTML documentation, treating warnings as errors."""
    session.install("-e", ".[doc,dashboard,metrics]")  # the API page documents them
    session.run("sphinx-build", "-W", "-n", "-b", "html", "docs", "build/docs")


@nox.session(python=LATEST)
def package(session: nox.Session) -> None:
    """Build the sdist and wheel, check them, and type-check a user's file on them."""
    session.install("build", "twine", "mypy")
    dist = Path(session.create_tmp(), "dist")
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist))
    session.run("twine", "check", "--strict", *map(str, dist.iterdir()))
    [wheel] = dist.glob("*.whl")
    session.install(str(wheel))
    # A user's settings: strict, and none of this project's (mypy would find them)
    config = Path(session.create_tmp(), "mypy.ini")
    config.write_text("[mypy]\nstrict = True\n")
    consumer = Path("tests", "typing", "consumer.py")
    session.run("mypy", "--config-file", str(config), "--no-incremental", str(consumer))


@nox.session(python=LATEST)
def bench(session: nox.Session) -> None:
    """Compare our store with APScheduler's built-in one (see docs/performance.rst)."""
    script = Path("benchmarks", "bench.py")
    session.install("-e", ".[test]", "matplotlib")
    session.run("python", str(script), *session.posargs)
