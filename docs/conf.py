"""Sphinx configuration for the apscheduler-mongo documentation.

The build must pass offline with ``sphinx-build -W -n`` (CI has no internet access), so
intersphinx is enabled only when ``DOCS_ONLINE=1`` is set. References into the packages
below are then resolved into links where their inventories allow; offline (and for the
private names that no inventory lists) they render as plain text without a warning.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

_version_file = Path(__file__).parents[1] / "src" / "apscheduler_mongo" / "_version.py"
_version_match = re.search(
    r'^__version__ = "([^"]+)"$', _version_file.read_text(encoding="utf-8"), re.M
)
if _version_match is None:
    raise RuntimeError(f"no __version__ found in {_version_file}")

# -- Project information ------------------------------------------------------------

project = "apscheduler-mongo"
author = "the apscheduler-mongo developers"
copyright = f"2026, {author}"
release = _version_match.group(1)
version = ".".join(release.split(".")[:2])

# -- General configuration ----------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
]
exclude_patterns = ["_build"]
nitpicky = True

autodoc_member_order = "bysource"

# sphinx-autodoc-typehints warns when it cannot evaluate an annotation (a name imported
# only under TYPE_CHECKING, or one from an inherited attrs field); it then shows the
# annotation as written, and the bare names are handled by nitpick_ignore_regex below.
suppress_warnings = [
    "sphinx_autodoc_typehints.forward_reference",
    "sphinx_autodoc_typehints.guarded_import",
]

# References into other projects' documentation. Fetching their inventories needs the
# network, and an unreachable inventory is a warning (an error under -W), so this is
# opt-in: DOCS_ONLINE=1 sphinx-build -W -n -b html docs build/docs
DOCS_ONLINE = os.environ.get("DOCS_ONLINE") == "1"
if DOCS_ONLINE:
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3/", None),
        "apscheduler": ("https://apscheduler.readthedocs.io/en/master/", None),
        "pymongo": ("https://pymongo.readthedocs.io/en/stable/", None),
        "anyio": ("https://anyio.readthedocs.io/en/stable/", None),
    }

# With -n, every unresolved cross-reference is a warning. References into the
# standard library and these third-party packages cannot be resolved offline, and some
# (private modules, names missing from a project's inventory) not even online, so they
# never warn. References to apscheduler_mongo itself are still checked.
_external_modules = sorted(
    sys.stdlib_module_names
    | {
        "anyio",
        "apscheduler",
        "attr",
        "attrs",
        "bson",
        "cbor2",
        "mongomock",
        "mongomock_motor",
        "motor",
        "opentelemetry",
        "prometheus_client",
        "starlette",
        "pymongo",
        "tenacity",
        "typing_extensions",
    }
)

# Annotations that autodoc cannot evaluate stay bare names: notably those of the
# __init__ that attrs generates (the fields of MongoDBDataStore and of the APScheduler
# base class it extends), and names imported under TYPE_CHECKING. Ignore a bare name
# only when one of these modules exports it, so that a typo in our own names still
# warns. The docs session does not install the optional clients, so their names are
# listed too.
_bare_name_sources = (
    "anyio",
    "anyio.abc",
    "apscheduler",
    "apscheduler.abc",
    "apscheduler.datastores.base",
    "apscheduler.eventbrokers.base",
    "attrs",
    "bson",
    "collections.abc",
    "contextlib",
    "datetime",
    "logging",
    "mongomock_motor",
    "motor.motor_asyncio",
    "pymongo",
    "pymongo.asynchronous.collection",
    "pymongo.asynchronous.database",
    "pymongo.errors",
    "tenacity",
    "typing",
    "typing_extensions",
    "uuid",
)
_bare_names = {
    "AsyncIOMotorClient",
    "AsyncIOMotorCollection",
    "AsyncIOMotorDatabase",
    "AsyncMongoMockClient",
    # The "..." of a tuple[str, ...] annotation
    "Ellipsis",
}
for _module_name in _bare_name_sources:
    try:
        _module = importlib.import_module(_module_name)
    except ImportError:  # optional dependencies (motor, mongomock_motor)
        continue
    _bare_names.update(name for name in dir(_module) if not name.startswith("_"))

nitpick_ignore_regex = [
    (r"py:.*", rf"^({'|'.join(_external_modules)})\..+"),
    (r"py:mod", rf"^({'|'.join(_external_modules)})$"),
    (r"py:.*", rf"^({'|'.join(map(re.escape, sorted(_bare_names)))})$"),
]

# -- Options for HTML output --------------------------------------------------------

html_theme = "alabaster"
html_static_path: list[str] = []
