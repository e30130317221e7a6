"""The public surface: ``__all__`` lists exactly what the package exports."""

from __future__ import annotations
import __future__

import importlib
import inspect
import types

import apscheduler_mongo

#: Dunder names that are part of the public surface
PUBLIC_DUNDERS = {"__version__"}
#: Type of the names that ``from __future__ import ...`` binds in a module
_FEATURE = type(__future__.annotations)


def _public_names() -> set[str]:
    """Return the names the package namespace makes public (submodules excluded)."""
    return {
        name
        for name, value in vars(apscheduler_mongo).items()
        if (not name.startswith("_") or name in PUBLIC_DUNDERS)
        and not isinstance(value, types.ModuleType)
        and not isinstance(value, _FEATURE)
    }


class TestExportedMembers:
    """``__all__`` matches the exported names, and every export can be imported."""

    def test_all_has_no_duplicates(self) -> None:
        assert len(apscheduler_mongo.__all__) == len(set(apscheduler_mongo.__all__))

    def test_all_matches_public_names(self) -> None:
        assert set(apscheduler_mongo.__all__) == _public_names()

    def test_dir_has_no_unlisted_public_names(self) -> None:
        listed = set(apscheduler_mongo.__all__)
        unlisted = {
            name
            for name in dir(apscheduler_mongo)
            if not name.startswith("_")
            and name not in listed
            and not isinstance(getattr(apscheduler_mongo, name), types.ModuleType)
            and not isinstance(getattr(apscheduler_mongo, name), _FEATURE)
        }
        assert unlisted == set()

    def test_every_listed_name_exists(self) -> None:
        missing = [
            name
            for name in apscheduler_mongo.__all__
            if not hasattr(apscheduler_mongo, name)
        ]
        assert missing == []

    def test_star_import(self) -> None:
        namespace: dict[str, object] = {}
        exec("from apscheduler_mongo import *", namespace)
        namespace.pop("__builtins__")
        assert set(namespace) == set(apscheduler_mongo.__all__)

    def test_documented_names_are_exported(self) -> None:
        assert "MongoDBDataStore" in apscheduler_mongo.__all__

    def test_version(self) -> None:
        from apscheduler_mongo._version import __version__

        assert isinstance(apscheduler_mongo.__version__, str)
        assert apscheduler_mongo.__version__ == __version__

    def test_exported_objects_are_importable_from_their_module(self) -> None:
        for name in apscheduler_mongo.__all__:
            value = getattr(apscheduler_mongo, name)
            if not (inspect.isclass(value) or inspect.isfunction(value)):
                continue

            module = importlib.import_module(value.__module__)
            assert module.__name__.startswith("apscheduler_mongo"), name
            assert getattr(module, value.__qualname__) is value, name
            assert value.__doc__, f"{name} has no docstring"
