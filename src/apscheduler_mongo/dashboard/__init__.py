"""
A live web dashboard of a MongoDB store: an ASGI application (Starlette).

It needs the ``dashboard`` extra: ``pip install "apscheduler-mongo[dashboard]"``.
"""

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover (the extra is installed in tests)
    raise ImportError(
        "the dashboard needs the 'dashboard' extra: "
        'pip install "apscheduler-mongo[dashboard]"'
    ) from exc

from ._app import Dashboard

__all__ = ["Dashboard"]
