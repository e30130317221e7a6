"""
Every Python code block of the documentation compiles, and the marked ones run.

The conventions this checks, for ``docs/*.rst`` and ``README.md``:

- Python blocks are ``.. code-block:: python`` directives (or ``.. code::`` and
  ``.. sourcecode::``) and ``::`` literal blocks, which Sphinx highlights as Python.
  Write any other literal block with its language: ``.. code-block:: bash``,
  ``.. code-block:: text``. In README.md they are the blocks fenced with
  ```` ```python ````.
- Each Python block compiles on its own (``compile()`` in ``exec`` mode). It may use
  names that an earlier block of its page defines, but no top-level ``await`` and no
  placeholder that is not Python.
- A ``.. code-block:: python`` directly preceded by the comment
  ``.. This block is run by tests/test_docs.py`` is also run, on the wire tier. It is
  executed as a module named ``docs_example`` (so its ``if __name__ == "__main__":``
  part, which a reader runs, is skipped) and must define
  ``main(uri, database="<name>")``, a function or a coroutine function, which the test
  calls with the wire tier's URI and a fresh database, within a time limit. The
  marked blocks of a page run in order, as a reader following the page would run
  them: blocks whose ``database`` defaults to the same name get the same fresh
  database, so one block can read what an earlier one wrote. :data:`EXPECTED_OUTPUT`
  may name lines that a page's blocks must print.

Code shown with ``.. literalinclude::`` comes from ``examples/``, which
``tests/test_examples.py`` runs.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from pymongo import MongoClient

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PACKAGE = ROOT / "src" / "apscheduler_mongo"
README = ROOT / "README.md"
RUN_MARKER = ".. This block is run by tests/test_docs.py"
CODE_DIRECTIVE = re.compile(
    r"^(?P<indent> *)\.\. (?:code-block|code|sourcecode)::\s*(?P<language>\S*)\s*$"
)
PYTHON = {"python", "python3", "py", "py3"}
MARKDOWN_PYTHON = re.compile(r"^```python\n(?P<code>.*?)^```", re.M | re.S)
#: Seconds a page's marked blocks may take, together
RUN_TIMEOUT = 90
#: Lines that the marked blocks of a page print (among others)
EXPECTED_OUTPUT = {
    "gettingstarted.rst": ["1 + 2 = 3", "tick", "report", "paused report"],
}
#: Log levels whose messages the troubleshooting page must explain
EXPLAINED_LEVELS = {"warning", "error", "exception", "critical"}
#: ``::`` blocks known not to be Python (by page and first line): each should say its
#: language instead (``.. code-block:: text``), then leave this list
NOT_PYTHON: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Block:
    """A Python code block of a documentation page."""

    path: Path
    #: Line of the page where the code starts (1-based)
    line: int
    code: str
    #: Whether the block is marked to be run
    run: bool = False

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.line}"

    def compile(self) -> types.CodeType:
        """Compile the code, so that errors name the page's own line numbers."""
        source = "\n" * (self.line - 1) + self.code
        return compile(source, str(self.path), "exec", dont_inherit=True)


def indentation(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def indented_block(lines: list[str], start: int, indent: int) -> tuple[int, str, int]:
    """
    Return the block of lines indented deeper than ``indent`` from ``start`` on.

    :return: the index of its first non-blank line, its dedented text and the index
        of the first line after it
    """
    end = start
    first: int | None = None
    while end < len(lines):
        line = lines[end]
        if line.strip():
            if indentation(line) <= indent:
                break

            if first is None:
                first = end

        end += 1

    if first is None:
        return start, "", end

    text = textwrap.dedent("\n".join(lines[first:end])).rstrip() + "\n"
    return first, text, end


def is_marked(lines: list[str], index: int) -> bool:
    """Tell whether the line before ``index`` (blank lines aside) is the run marker."""
    for line in reversed(lines[:index]):
        if line.strip():
            return line.strip().rstrip(".") == RUN_MARKER

    return False


def rst_blocks(path: Path) -> list[Block]:
    """Return the Python blocks of a reStructuredText page."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if match := CODE_DIRECTIVE.match(line):
            indent = len(match["indent"])
            body = index + 1
            while body < len(lines) and lines[body].strip().startswith(":"):
                body += 1  # the directive's options

            first, code, end = indented_block(lines, body, indent)
            if match["language"] in PYTHON and code:
                blocks.append(Block(path, first + 1, code, is_marked(lines, index)))

            index = end
            continue

        stripped = line.strip()
        is_underline = len(stripped) > 2 and set(stripped) == {":"}
        if (
            stripped.endswith("::")
            and not stripped.startswith("..")
            and not is_underline
        ):
            first, code, end = indented_block(lines, index + 1, indentation(line))
            if code:
                blocks.append(Block(path, first + 1, code))

            index = end
            continue

        index += 1

    return blocks


def markdown_blocks(path: Path) -> list[Block]:
    """Return the ```` ```python ```` blocks of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [
        Block(path, text.count("\n", 0, match.start("code")) + 1, match["code"])
        for match in MARKDOWN_PYTHON.finditer(text)
    ]


def all_blocks() -> list[Block]:
    blocks = [
        block for page in sorted(DOCS.glob("*.rst")) for block in rst_blocks(page)
    ]
    return blocks + markdown_blocks(README)


def pages_with_runnable_blocks() -> list[Path]:
    return sorted({block.path for block in all_blocks() if block.run})


def compile_params() -> list[object]:
    params: list[object] = []
    for block in all_blocks():
        first_line = block.code.splitlines()[0].strip()
        marks = []
        if (block.path.name, first_line) in NOT_PYTHON:
            marks.append(
                pytest.mark.xfail(
                    raises=SyntaxError,
                    strict=True,
                    reason="a text block written as '::': it should be "
                    "'.. code-block:: text'",
                )
            )

        params.append(pytest.param(block, id=block.name, marks=marks))

    return params


class TestCollection:
    """The blocks the other tests check are found where the pages have them."""

    def test_pages_have_blocks(self) -> None:
        by_page: dict[str, list[Block]] = {}
        for block in all_blocks():
            by_page.setdefault(block.path.name, []).append(block)

        assert len(by_page["userguide.rst"]) >= 5
        assert len(by_page["README.md"]) >= 2
        assert any(
            "async def run_forever" in block.code for block in by_page["deployment.rst"]
        )
        assert len([block for block in by_page["gettingstarted.rst"] if block.run]) == 3

    @pytest.mark.parametrize("page", sorted(DOCS.glob("*.rst")), ids=lambda p: p.name)
    def test_markers_mark_python_blocks(self, page: Path) -> None:
        """Every run marker stands right before a Python block, which it marks."""
        markers = page.read_text(encoding="utf-8").count(RUN_MARKER)
        assert markers == len([block for block in rst_blocks(page) if block.run])

    def test_parser(self, tmp_path: Path) -> None:
        page = tmp_path / "page.rst"
        page.write_text(
            textwrap.dedent(
                """\
                Title
                =====

                A literal block::

                    x = 1

                .. code-block:: bash

                   echo not python

                .. This block is run by tests/test_docs.py

                .. code-block:: python
                   :caption: with an option

                   def main(uri, database):
                       pass

                   y = 2

                - a list item whose literal block is indented::

                      z = 3

                After.
                """
            )
        )
        blocks = rst_blocks(page)
        assert [(block.line, block.code, block.run) for block in blocks] == [
            (6, "x = 1\n", False),
            (17, "def main(uri, database):\n    pass\n\ny = 2\n", True),
            (24, "z = 3\n", False),
        ]


@pytest.mark.parametrize("block", compile_params())
def test_compiles(block: Block) -> None:
    block.compile()


@pytest.fixture
def fresh_databases(wire_uri: str) -> Iterator[dict[str, str]]:
    """Fresh databases for a page's blocks, by their default name; dropped after."""
    databases: dict[str, str] = {}
    yield databases
    client: MongoClient[dict[str, object]] = MongoClient(
        wire_uri, serverSelectionTimeoutMS=5000
    )
    with client:
        for database in databases.values():
            client.drop_database(database)


@pytest.mark.wire
@pytest.mark.anyio
@pytest.mark.parametrize(
    "page", pages_with_runnable_blocks(), ids=lambda page: page.name
)
async def test_runs(
    page: Path,
    wire_uri: str,
    fresh_databases: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The page's marked blocks run, in order, against the wire tier's server."""
    with anyio.fail_after(RUN_TIMEOUT):
        for block in rst_blocks(page):
            if not block.run:
                continue

            module = types.ModuleType("docs_example")
            module.__file__ = str(block.path)
            sys.modules["docs_example"] = module
            try:
                exec(block.compile(), module.__dict__)
                main = module.__dict__.get("main")
                assert callable(main), f"{block.name} defines no main()"
                default = inspect.signature(main).parameters["database"].default
                assert isinstance(default, str), f"{block.name}: no default database"
                database = fresh_databases.setdefault(
                    default, f"apscheduler_mongo_test_{uuid.uuid4().hex[:12]}"
                )
                if inspect.iscoroutinefunction(main):
                    await main(wire_uri, database)
                else:
                    await anyio.to_thread.run_sync(
                        main, wire_uri, database, abandon_on_cancel=True
                    )
            finally:
                del sys.modules["docs_example"]

    printed = capsys.readouterr().out.splitlines()
    for line in EXPECTED_OUTPUT.get(page.name, []):
        assert line in printed, f"{page.name} did not print {line!r}"


def is_logged_message(node: ast.AST) -> bool:
    """Tell whether ``node`` logs a literal message at a level to explain."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in EXPLAINED_LEVELS
        and "logger" in ast.unparse(node.func.value).lower()
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    )


def logged_messages() -> list[tuple[str, int, str]]:
    """Return the package's warning and error log messages: (module, line, text)."""
    messages: list[tuple[str, int, str]] = []
    for module in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        messages.extend(
            (module.name, node.lineno, node.args[0].value)  # type: ignore[attr-defined]
            for node in ast.walk(tree)
            if is_logged_message(node)
        )

    return messages


def test_troubleshooting_explains_every_warning() -> None:
    """
    Each warning or error the package logs is quoted on the troubleshooting page.

    Every fixed part of the message (between its ``%`` placeholders) must appear there.
    """
    page = " ".join((DOCS / "troubleshooting.rst").read_text(encoding="utf-8").split())
    messages = logged_messages()
    assert len(messages) >= 20  # the search finds them
    missing = [
        f"{module}:{line}: {text!r}"
        for module, line, text in messages
        if not all(
            part in page
            for part in map(
                str.strip, re.split(r"%[-#0 +]*\d*(?:\.\d+)?[sdrfig]", text)
            )
            if len(part) > 2
        )
    ]
    assert not missing, "not in docs/troubleshooting.rst:\n" + "\n".join(missing)
