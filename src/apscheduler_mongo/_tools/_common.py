"""What the commands of the command line share: exit statuses, messages, settings."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from apscheduler import RetrySettings
from apscheduler.abc import Serializer
from tenacity import stop_after_delay, wait_exponential

from .._client import redact
from .._signing import Signer, keys_from_environment

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_SERVER = 3
EXIT_UNHEALTHY = 4
EXIT_REFUSED = 5
EXIT_INTERRUPTED = 130


def key_options(options: argparse.ArgumentParser) -> None:
    """Add ``--key-file`` to ``options`` (the keys never come on the command line)."""
    options.add_argument(
        "--key-file",
        metavar="PATH",
        help="a file holding the store's signing key(s), separated by commas or "
        "lines, the first one signing (default: the APSCHEDULER_MONGO_SIGNING_KEY "
        "environment variable; never give a key itself on the command line)",
    )


def signed_store_options(options: argparse.ArgumentParser) -> None:
    """Add ``--key-file`` and ``--accept-unsigned``: how to read a signed store."""
    key_options(options)
    options.add_argument(
        "--accept-unsigned",
        action="store_true",
        help="as the store's accept_unsigned: while signing is being rolled out, "
        "also read documents that carry no signature",
    )


def fail(status: int, message: str) -> int:
    """Write one line, without credentials, to stderr; return ``status``."""
    line = " ".join(redact(message).split())
    sys.stderr.write(f"error: {line}\n")
    return status


def warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def say(line: str) -> None:
    sys.stdout.write(f"{line}\n")


def not_a_retry(record: logging.LogRecord) -> bool:
    """Tell whether a record is not one of the retries' "attempt N failed" warnings."""
    # The command's own error says why the last attempt failed, in one line
    return not str(record.msg).startswith("Temporary MongoDB error")


def stderr_logger() -> logging.Logger:
    """Return a logger, private to this run, that writes warnings to stderr."""
    logger = logging.Logger("apscheduler_mongo.cli", logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.addFilter(not_a_retry)
    logger.addHandler(handler)
    return logger


def serializer_of(name: str) -> Serializer:
    if name == "cbor":
        from apscheduler.serializers.cbor import CBORSerializer

        return CBORSerializer()

    if name == "json":
        from apscheduler.serializers.json import JSONSerializer

        return JSONSerializer()

    from apscheduler.serializers.pickle import PickleSerializer

    return PickleSerializer()


def has_password(uri: str) -> bool:
    """Tell whether a MongoDB URI carries a password (``user:password@``)."""
    authority = uri.partition("://")[2].partition("/")[0].partition("?")[0]
    userinfo = authority.rpartition("@")[0]
    return bool(userinfo.partition(":")[2])


def uri_from(given: str | None, option: str, variable: str) -> str | None:
    """
    Return the URI given with ``option``, else the environment ``variable``'s.

    A password given on the command line is visible to other users of this host
    (``ps``): that is warned about, without showing the password.
    """
    if given is None:
        return os.environ.get(variable) or None

    if has_password(given):
        warn(
            f"the URI given with {option} carries a password, which other users of "
            f"this host can read in the process list; set the {variable} "
            f"environment variable instead"
        )

    return str(given)


def signer_of(args: argparse.Namespace) -> Signer | None:
    """
    Return the signer of the keys in ``--key-file`` or the environment, if any.

    :raises OSError: if the key file cannot be read
    :raises ValueError: if a key is too short
    """
    keys = keys_from_environment(args.key_file)
    return None if keys is None else Signer(keys)


def retry_settings(args: argparse.Namespace) -> RetrySettings:
    """Return the retries of a command: temporary failures, until ``--timeout``."""
    return RetrySettings(
        stop=stop_after_delay(args.timeout),
        wait=wait_exponential(multiplier=0.25, max=2),
    )


def timed_out(
    hosts: Sequence[str], errors: Sequence[str], args: argparse.Namespace, outcome: str
) -> int:
    """Say that the server did not answer in time (``errors``: what it met)."""
    met = f" ({'; '.join(errors)})" if errors else ""  # each names its server
    return fail(
        EXIT_SERVER,
        f"no answer from MongoDB at {', '.join(hosts)} within {args.timeout:g} s"
        f"{met}{outcome}",
    )
