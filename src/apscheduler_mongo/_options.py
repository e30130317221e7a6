"""The options the data store and the event broker share: where, and how to retry."""

from __future__ import annotations

import attrs
from apscheduler import RetrySettings
from attrs.validators import instance_of

from ._client import client_or_uri_validator
from ._names import database_validator


@attrs.define(slots=False, eq=False, repr=False)
class ConnectionOptions:
    """
    The client (or URI), the database and the retry settings, validated once.

    A base of :class:`MongoDBDataStore` and :class:`MongoDBEventBroker`; it comes
    first among their bases, so its validated ``retry_settings`` replaces the
    unvalidated one of APScheduler's ``RetryMixin``. It has no slots because a class
    may not have two bases with slots of their own.
    """

    client_or_uri: object = attrs.field(validator=client_or_uri_validator)
    database: str = attrs.field(
        default="apscheduler", kw_only=True, validator=database_validator
    )
    retry_settings: RetrySettings = attrs.field(
        factory=RetrySettings, kw_only=True, validator=instance_of(RetrySettings)
    )
