"""MongoDB backends for APScheduler 4."""

from __future__ import annotations

from ._datastore import MongoDBDataStore as MongoDBDataStore
from ._eventbroker import MongoDBEventBroker as MongoDBEventBroker
from ._version import __version__ as __version__

__all__ = ["MongoDBDataStore", "MongoDBEventBroker", "__version__"]
