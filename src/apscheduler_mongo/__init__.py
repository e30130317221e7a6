"""MongoDB backends for APScheduler 4."""

from __future__ import annotations

from ._datastore import MongoDBDataStore as MongoDBDataStore
from ._eventbroker import MongoDBEventBroker as MongoDBEventBroker
from ._signing import DisallowedCallableError as DisallowedCallableError
from ._signing import UnverifiedDataError as UnverifiedDataError
from ._sync import StoreNotRunningError as StoreNotRunningError
from ._sync import SyncMongoDBDataStore as SyncMongoDBDataStore
from ._version import __version__ as __version__

__all__ = [
    "DisallowedCallableError",
    "MongoDBDataStore",
    "MongoDBEventBroker",
    "StoreNotRunningError",
    "SyncMongoDBDataStore",
    "UnverifiedDataError",
    "__version__",
]
