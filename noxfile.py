"""Development sessions: ``nox -l`` lists them, plain ``nox`` runs the default ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["tests", "lint", "typing", "docs", "package"]
nox.options.reuse_existing_virtualenvs = True

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
LATEST = PYTHONS[-1]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite under coverage (set MONGODB_URI for a real server)."""
    session.install("-e", ".[test]")
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    if any(Path.cwd().glob(".coverage.*")):
        session.run("coverage", "combine")
    session.run("coverage", "report")


@nox.session(python=LATEST)
def lint(session: nox.Session) -> None:
    """Check the code with ruff's linter and formatter."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=LATEST)
def typing(session: nox.Session) -> None:
    """Type-check the package and the tests with mypy in strict mode."""
    session.install("-e", ".[test]", "mypy")
    session.run("mypy", *session.posargs)


@nox.session(python=LATEST)
def docs(session: nox.Session) -> None:
    """Build the HTML documentation, treating warnings as errors."""
    session.install("-e", ".[doc]")
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
