"""
Showing stored values as text without running anything they name.

The database is untrusted input: whoever can write it can store a pickle whose
loading calls ``os.system``, or a JSON or CBOR document naming a module that
APScheduler's serializers would import. The status command and the dashboard show
triggers, arguments and errors through here, so that looking at a store never runs
code from it, whatever it holds and with or without a signing key.

Stored bytes are decoded by format (pickle, APScheduler's JSON or CBOR, told apart
by their first bytes), never by a serializer: a pickle is loaded by an unpickler
whose ``find_class`` imports nothing and returns a placeholder class that records
how the data uses it (the arguments it is called with, the state it is given); the
JSON and CBOR forms of APScheduler's marshalled objects are kept as their reference
and state. Placeholders are then shown as the calls they stand for
(``posix.system('touch x')``). Every function here returns text and never raises:
what cannot be decoded or shown says so in the text.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import io
import json
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

#: How long a shown value may be, by default (characters)
LIMIT = 200
#: How deep nested values are shown; deeper ones are shown as ``...``
MAX_DEPTH = 12
#: APScheduler's JSONSerializer marks a marshalled object with this key
JSON_MAGIC_KEY = "_apscheduler_json"
#: APScheduler's CBORSerializer tags a marshalled object with this number
CBOR_OBJECT_TAG = 4664
#: How a JSON document can start (after white space)
_JSON_START = frozenset(b'[{"-0123456789tfn')
#: A name that can be shown as it is (anything else is shown as a string literal)
_PLAIN_NAME = re.compile(r"[A-Za-z_][\w.:]*\Z")


def shorten(text: str, limit: int = LIMIT) -> str:
    """Return ``text``, cut to ``limit`` characters (ending in ``...`` if cut)."""
    return text if len(text) <= limit else f"{text[: max(limit - 3, 0)]}..."


def _error_text(exc: BaseException) -> str:
    """Describe an error without trusting its ``__str__``."""
    name = type(exc).__name__
    try:
        message = str(exc)
    except Exception:
        return name

    return f"{name}: {message}" if message else name


def shown(value: object, limit: int = LIMIT) -> str:
    """
    Return ``repr(value)``, cut to ``limit`` characters.

    A ``repr`` that raises (a hostile or broken ``__repr__``, an integer too long to
    convert) gives ``(cannot be shown: ...)`` instead.
    """
    try:
        text = repr(value)
        if not isinstance(text, str):  # pragma: no cover (repr() checks it)
            raise TypeError("__repr__ returned no string")
    except Exception as exc:
        return shorten(f"(cannot be shown: {_error_text(exc)})", limit)

    return shorten(text, limit)


def stored_text(value: object, limit: int = LIMIT) -> str | None:
    """
    Return a stored field (an id, a name) as text: a string as it is, ``None`` as
    ``None``, anything else as :func:`shown` gives it.
    """
    if value is None:
        return None

    if isinstance(value, str):
        return shorten(value, limit)

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return shown(value, limit)

    try:
        return shorten(str(value), limit)
    except Exception:
        return shown(value, limit)


# Placeholders


class _Stored:
    """
    Something a pickle names: never imported, only recorded.

    Each name gets a subclass (made by :meth:`_Unpickler.find_class`) whose
    ``_name`` is the ``module.qualname`` the data gave. Calling it (``REDUCE``,
    ``NEWOBJ``) makes an instance that records the arguments; ``BUILD`` records the
    state; ``APPENDS``, ``ADDITEMS`` and ``SETITEMS`` record items and entries.
    """

    _name: ClassVar[str] = "?"
    _args: tuple[Any, ...]
    _kwargs: dict[str, Any]
    _state: list[Any]
    _items: list[Any]
    _entries: list[tuple[Any, Any]]
    #: What was called to make this (when an instance was called, not a class)
    _callee: _Stored | None

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stored:
        instance = super().__new__(cls)
        instance._args = args
        instance._kwargs = kwargs
        instance._state = []
        instance._items = []
        instance._entries = []
        instance._callee = None
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Recorded by ``__new__`` already."""

    def __call__(self, *args: Any, **kwargs: Any) -> _Stored:
        call = _Stored(*args, **kwargs)
        call._callee = self
        return call

    def __setstate__(self, state: Any) -> None:
        self._state.append(state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._entries.append((key, value))

    def append(self, item: Any) -> None:
        self._items.append(item)

    def extend(self, items: Any) -> None:
        self._items.extend(items)

    def add(self, item: Any) -> None:
        self._items.append(item)


class _Marshalled:
    """An object that APScheduler's JSON or CBOR serializer marshalled: its class
    reference (``module:qualname``) and its state, the class never imported."""

    def __init__(self, ref: object, state: object) -> None:
        self.ref = ref
        self.state = state


class _Unpickler(pickle.Unpickler):
    """An unpickler that imports nothing and calls nothing the data names."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), fix_imports=False, encoding="latin1")
        self._classes: dict[tuple[str, str], type[_Stored]] = {}

    def find_class(self, module: str, name: str) -> type[_Stored]:
        # The names Python 2 used, which protocols 0 to 2 still write (a table)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key not in self._classes:
            self._classes[key] = type(
                "_Stored", (_Stored,), {"_name": f"{module}.{name}"}
            )

        return self._classes[key]

    def persistent_load(self, _pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are refused")


# Decoding


def _load_pickle(data: bytes) -> object:
    return _Unpickler(data).load()


def _load_json(data: bytes) -> object:
    return json.loads(data)


def _cbor_tag(_decoder: object, tag: Any) -> object:
    value = tag.value
    if tag.tag == CBOR_OBJECT_TAG and isinstance(value, (list, tuple)):
        if len(value) == 2:
            return _Marshalled(value[0], value[1])

    return tag


def _load_cbor(data: bytes) -> object:
    try:
        import cbor2
    except ImportError:
        raise ValueError("not pickle or JSON (and cbor2 is not installed)") from None

    stream = io.BytesIO(data)
    value = cbor2.CBORDecoder(stream, tag_hook=_cbor_tag).decode()
    if stream.tell() != len(data):  # one item, as the serializer writes
        raise ValueError(f"not CBOR: {len(data) - stream.tell()} bytes after an item")

    return value


def _looks_like_json(data: bytes) -> bool:
    start = data.lstrip(b" \t\r\n")[:1]
    return bool(start) and start[0] in _JSON_START


def _decoders(data: bytes) -> list[Callable[[bytes], object]]:
    """Return the decoders to try on ``data``, the likeliest first."""
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return [_load_pickle, _load_cbor]  # b"\x80" alone is CBOR's empty array

    if _looks_like_json(data):
        return [_load_json, _load_cbor]

    if data.endswith(b"."):  # the STOP of a protocol 0 or 1 pickle
        return [_load_pickle, _load_cbor]

    return [_load_cbor]


def decode(serialized: object) -> object:
    """
    Return the value that stored bytes hold, with placeholders for the objects that
    they name.

    :raises Exception: if the bytes cannot be decoded (any error a decoder raises)
    """
    if isinstance(serialized, (bytearray, memoryview)):
        serialized = bytes(serialized)

    if not isinstance(serialized, bytes):
        raise TypeError(f"stored as {type(serialized).__name__}, not as bytes")

    first, *others = _decoders(serialized)
    try:
        return first(serialized)
    except Exception:
        for load in others:  # the same bytes may also be valid in another format
            with contextlib.suppress(Exception):
                return load(serialized)

        raise


# Showing


class _Full(Exception):
    """Raised inside :class:`_Writer` once the text is long enough."""


class _Writer:
    """Text written in parts, up to a limit (then :class:`_Full` is raised)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0

    @property
    def room(self) -> int:
        """How many more characters can be written (one more marks the cut)."""
        return max(self.limit - self.size, 0) + 1

    def write(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size > self.limit:
            raise _Full

    def text(self) -> str:
        return shorten("".join(self.parts), self.limit)


def _name(value: object) -> str:
    """Show a name the data gave: as it is if plain, else as a string literal."""
    if isinstance(value, str) and _PLAIN_NAME.match(value):
        return value

    return shown(value, 80)


def _as_bytes(value: object) -> bytes | None:
    """Return bytes given directly or as protocol 0 pickles them, else ``None``."""
    if isinstance(value, bytes):
        return value

    if (
        isinstance(value, _Stored)
        and type(value)._name == "_codecs.encode"
        and len(value._args) == 2
        and isinstance(value._args[0], str)
        and value._args[1] in ("latin1", "latin-1")
    ):
        try:
            return value._args[0].encode("latin1")
        except UnicodeEncodeError:
            return None

    return None


def _moment(name: str, args: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]] | None:
    """
    Return the text of a pickled date, time or datetime (from the bytes it is
    pickled as) and the rest of its arguments (a time zone); ``None`` if it is not
    one of those, as pickled by Python.
    """
    data = _as_bytes(args[0]) if args else None
    if data is None:
        return None

    if name == "datetime.date" and len(data) == 4:
        return f"{data[0] * 256 + data[1]:04}-{data[2]:02}-{data[3]:02}", args[1:]

    if name == "datetime.time" and len(data) == 6:
        micros = (data[3] << 16) | (data[4] << 8) | data[5]
        clock = f"{data[0] & 0x7F:02}:{data[1]:02}:{data[2]:02}"
        return clock + (f".{micros:06}" if micros else ""), args[1:]

    if name == "datetime.datetime" and len(data) == 10:
        micros = (data[7] << 16) | (data[8] << 8) | data[9]
        text = (
            f"{data[0] * 256 + data[1]:04}-{data[2] & 0x7F:02}-{data[3]:02} "
            f"{data[4]:02}:{data[5]:02}:{data[6]:02}"
        )
        return text + (f".{micros:06}" if micros else ""), args[1:]

    return None


def _write_items(out: _Writer, items: list[tuple[str | None, Any]], depth: int) -> None:
    """Write ``value`` or ``key=value`` items, comma separated."""
    for index, (key, value) in enumerate(items):
        if index:
            out.write(", ")
        if key is not None:
            out.write(f"{key}=")
        _write(out, value, depth)


def _state_items(state: object) -> list[tuple[str | None, Any]]:
    """Return the items that show a recorded state: ``key=value`` where it can."""
    if (
        isinstance(state, tuple)
        and len(state) == 2
        and isinstance(state[0], (dict, type(None)))
        and isinstance(state[1], dict)
    ):
        # (__dict__ or None, slot values): how objects with __slots__ pickle
        state = {**(state[0] or {}), **state[1]}

    if isinstance(state, dict) and all(
        isinstance(key, str) and key.isidentifier() for key in state
    ):
        return list(state.items())

    return [(None, state)]


def _no_time(value: object) -> bool:
    """Tell whether a value is a pickled ``timedelta(0)``."""
    return (
        isinstance(value, _Stored)
        and type(value)._name == "datetime.timedelta"
        and value._args == (0, 0, 0)
        and not value._kwargs
    )


def _zone_key(callee: _Stored, args: tuple[Any, ...]) -> str | None:
    """Return the key of a pickled ``ZoneInfo`` (``getattr(ZoneInfo, '_unpickle')``
    called with the key), else ``None``."""
    if (
        type(callee)._name == "builtins.getattr"
        and callee._args[1:] == ("_unpickle",)
        and isinstance(zone := callee._args[0], type)
        and issubclass(zone, _Stored)
        and zone._name == "zoneinfo.ZoneInfo"
        and args
        and isinstance(args[0], str)
    ):
        return args[0]

    return None


def _write_stored(out: _Writer, value: _Stored, depth: int) -> None:
    """Write a placeholder as the call it stands for."""
    args, kwargs = value._args, value._kwargs
    if value._callee is None:
        name = type(value)._name
        if moment := _moment(name, args):
            out.write(f"{name.rpartition('.')[2]}({moment[0]}")
            for arg in moment[1]:
                out.write(", ")
                _write(out, arg, depth + 1)

            out.write(")")
            return

        if name == "datetime.timezone" and len(args) == 1 and _no_time(args[0]):
            out.write("timezone.utc")
            return

        if name == "copyreg._reconstructor" and len(args) == 3 and not kwargs:
            # How protocols 0 and 1 pickle an instance: (class, base, base state)
            _write(out, args[0], depth + 1)
            args = () if args[2] is None else (args[2],)
        elif (
            name == "builtins.getattr"
            and len(args) == 2
            and isinstance(args[1], str)
            and not value._state
        ):
            _write(out, args[0], depth + 1)
            out.write(f".{_name(args[1])}")
            return
        else:
            out.write(_name(name))
    elif _zone_key(value._callee, args) is not None:
        out.write(f"ZoneInfo({shown(args[0], 60)})")
        return
    else:
        _write(out, value._callee, depth + 1)

    items: list[tuple[str | None, Any]] = [(None, arg) for arg in args]
    items += [(_name(key), item) for key, item in kwargs.items()]
    for state in value._state:
        items += _state_items(state)
    if value._items:
        items.append((None, value._items))
    if value._entries:
        items.append((None, _Entries(value._entries)))

    out.write("(")
    _write_items(out, items, depth + 1)
    out.write(")")


class _Entries(list[tuple[Any, Any]]):
    """The entries ``SETITEMS`` gave a placeholder, shown as a dict."""


def _as_marshalled(value: object) -> _Marshalled | None:
    """Return a marshalled object (a CBOR tag's, a JSON one-key dict's) or ``None``."""
    if isinstance(value, _Marshalled):
        return value

    if isinstance(value, dict) and len(value) == 1:
        marshalled = value.get(JSON_MAGIC_KEY)
        if isinstance(marshalled, list) and len(marshalled) == 2:
            return _Marshalled(marshalled[0], marshalled[1])

    return None


def _write_marshalled(out: _Writer, ref: object, state: object, depth: int) -> None:
    out.write(f"{_name(ref)}(")
    if state is not None:
        _write_items(out, _state_items(state), depth + 1)
    out.write(")")


def _write_sequence(
    out: _Writer, opening: str, values: list[Any], closing: str, depth: int
) -> None:
    out.write(opening)
    _write_items(out, [(None, value) for value in values], depth + 1)
    out.write(closing)


def _write_mapping(out: _Writer, entries: list[tuple[Any, Any]], depth: int) -> None:
    out.write("{")
    for index, (key, value) in enumerate(entries):
        if index:
            out.write(", ")
        _write(out, key, depth + 1)
        out.write(": ")
        _write(out, value, depth + 1)
    out.write("}")


def _write(out: _Writer, value: object, depth: int) -> None:  # noqa: C901
    """Write a decoded value, placeholders as the calls they stand for."""
    if depth > MAX_DEPTH:
        out.write("...")
    elif isinstance(value, _Stored):
        _write_stored(out, value, depth)
    elif isinstance(value, type) and issubclass(value, _Stored):
        out.write(_name(value._name))  # named, never called
    elif (marshalled := _as_marshalled(value)) is not None:
        _write_marshalled(out, marshalled.ref, marshalled.state, depth)
    elif isinstance(value, str):
        out.write(repr(value[: out.room]))
    elif isinstance(value, (bytes, bytearray)):
        out.write(repr(bytes(value[: out.room])))
    elif isinstance(value, _Entries):
        _write_mapping(out, list(value), depth)
    elif isinstance(value, dict):
        _write_mapping(out, list(value.items()), depth)
    elif isinstance(value, list):
        _write_sequence(out, "[", value, "]", depth)
    elif isinstance(value, tuple):
        _write_sequence(out, "(", list(value), ",)" if len(value) == 1 else ")", depth)
    elif isinstance(value, (set, frozenset)) and value:
        kind = "frozenset({" if isinstance(value, frozenset) else "{"
        _write_sequence(out, kind, list(value), "})" if kind != "{" else "}", depth)
    elif type(value).__name__ == "CBORTag" and hasattr(value, "tag"):
        out.write(f"CBORTag({shown(getattr(value, 'tag', None))}, ")
        _write(out, getattr(value, "value", None), depth + 1)
        out.write(")")
    else:
        # Numbers, None, and the standard library's values (dates, decimals, UUIDs)
        # that CBOR's own tags give
        out.write(shown(value, out.room))


def _render(limit: int, how: Callable[[_Writer], None]) -> str:
    out = _Writer(limit)
    try:
        how(out)
    except _Full:
        pass
    except Exception as exc:
        return shorten(f"(cannot be shown: {_error_text(exc)})", limit)

    return out.text()


def show_value(value: object, limit: int = LIMIT) -> str:
    """Return a decoded value as text, placeholders as the calls they stand for."""
    return _render(limit, lambda out: _write(out, value, 0))


#: How the text of stored bytes that cannot be decoded starts
UNREADABLE = "(unreadable: "


def _decoded(serialized: object, limit: int) -> tuple[bool, object]:
    """Return ``(True, value)``, or ``(False, why)`` if the bytes are unreadable."""
    try:
        return True, decode(serialized)
    except Exception as exc:
        return False, shorten(f"{UNREADABLE}{_error_text(exc)})", limit)


def unreadable(text: str) -> bool:
    """
    Tell whether a text from :func:`describe` or :func:`describe_arguments` says
    that the stored bytes cannot be decoded (a decoded value is never shown so).
    """
    return text.startswith((UNREADABLE, f"args: {UNREADABLE}", f"kwargs: {UNREADABLE}"))


def describe(serialized: object, limit: int = LIMIT) -> str:
    """
    Return stored bytes (pickle, APScheduler's JSON or CBOR) as readable text,
    without importing or calling anything they name.

    :param limit: the longest text to return
    :return: the text; ``(unreadable: ...)`` if the bytes cannot be decoded
    """
    readable, value = _decoded(serialized, limit)
    return show_value(value, limit) if readable else str(value)


def describe_arguments(args: object, kwargs: object, limit: int = LIMIT) -> str:
    """
    Return stored positional and keyword arguments (each serialized) as one text,
    ``1, 'a', key='value'``; an argument list that cannot be decoded says so.
    """
    parts: list[tuple[str | None, Any]] = []
    readable, positional = _decoded(args, limit)
    if not readable:
        return f"args: {positional}"

    readable, named = _decoded(kwargs, limit)
    if not readable:
        return f"kwargs: {named}"

    if isinstance(positional, (list, tuple)):
        parts += [(None, arg) for arg in positional]
    elif positional is not None:
        parts.append(("*", positional))

    if (
        isinstance(named, Mapping)
        and _as_marshalled(named) is None
        and all(isinstance(key, str) for key in named)
    ):
        parts += [(_name(key), value) for key, value in named.items()]
    elif named is not None:
        parts.append(("**", named))

    def write(out: _Writer) -> None:
        for index, (key, value) in enumerate(parts):
            if index:
                out.write(", ")
            if key in ("*", "**"):
                out.write(str(key))
            elif key is not None:
                out.write(f"{key}=")
            # One argument that cannot be shown spoils only its own place
            out.write(show_value(value, out.room))

    return _render(limit, write)


#: How the names of exception classes end, by convention
_EXCEPTION_ENDINGS = ("Error", "Exception", "Warning", "Exit", "Interrupt")


def _exception_name(name: object) -> str:
    text = _name(name).replace(":", ".")
    return text.removeprefix("builtins.")


def describe_error(serialized: object, limit: int = LIMIT) -> str:
    """
    Return a stored exception as ``ValueError: boom`` text, without importing its
    class; anything else stored there is shown as :func:`describe` shows it.
    """
    readable, value = _decoded(serialized, limit)
    if not readable:
        return str(value)

    if (
        isinstance(value, _Stored)
        and value._callee is None
        and type(value)._name.endswith(_EXCEPTION_ENDINGS)
    ):
        # Shown as Python shows an error; anything else the data calls, as a call
        name = _exception_name(type(value)._name)
        args = value._args
        if not args:
            return shorten(name, limit)

        if len(args) == 1 and isinstance(args[0], str):
            return shorten(f"{name}: {args[0]}", limit)

        return shorten(f"{name}: {show_value(args, limit)}", limit)

    if (marshalled := _as_marshalled(value)) is not None:
        # APScheduler marshals an exception as its class and __dict__ (no message)
        name = _exception_name(marshalled.ref)
        if marshalled.state in (None, {}):
            return shorten(name, limit)

        return shorten(f"{name}: {show_value(marshalled.state, limit)}", limit)

    return show_value(value, limit)
