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

Hostile data must not make showing it slow or greedy either (the dashboard renders
on its event loop), so the work is bounded by the size of the bytes, never by what
they describe:

* bytes over :data:`MAX_SIZE` are not decoded (``(too large to show: N bytes)``);
* the unpickler (the pure-Python one, its opcodes overridden where needed) never
  hashes a stored value: dicts and sets are placeholders keeping their entries and
  members in lists, so keys built to hash slowly (a tuple shared with itself at
  every level) or to collide cost nothing; nothing the data builds is copied per
  use (a shared tuple of arguments is recorded, not unpacked); extension codes
  (``copyreg``'s registry, which would give real objects) are refused;
* CBOR is scanned before it is decoded (cbor2 hashes map keys and set members, and
  decodes some tags to values that are slow to build): what could make decoding
  slow is refused (``(cannot be shown: ...)``), see :func:`_check_cbor`;
* the text is written while the value is walked, and the walk stops when the text
  is long enough or after a number of steps, so a value referring many times to
  the same parts (a pickle's memo makes a graph of any depth from a few bytes) is
  never walked in full.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import io
import itertools
import json
import pickle
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

#: How long a shown value may be, by default (characters)
LIMIT = 200
#: How deep nested values are shown; deeper ones are shown as ``...``
MAX_DEPTH = 12
#: The most stored bytes decoded to be shown; more are shown as too large
MAX_SIZE = 1 << 20
#: How many values showing a value visits, at most, per character of the limit
_VISITS_PER_CHARACTER = 4
#: How long a name is shown (a longer one, or one that is not a plain name, is
#: shown as a string literal cut to this many characters)
_NAME_LIMIT = 80
#: APScheduler's JSONSerializer marks a marshalled object with this key
JSON_MAGIC_KEY = "_apscheduler_json"
#: APScheduler's CBORSerializer tags a marshalled object with this number
CBOR_OBJECT_TAG = 4664
#: How a JSON document can start (after white space)
_JSON_START = frozenset(b'[{"-0123456789tfn')
#: A name that can be shown as it is (anything else is shown as a string literal)
_PLAIN_NAME = re.compile(r"[A-Za-z_][\w.:]*\Z")

_T = TypeVar("_T")


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


class _Refused(Exception):
    """Raised for stored bytes that are valid but not decoded to be shown."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        #: What is shown instead of the value
        self.text = text


# Placeholders


def _grown(current: Sequence[_T], more: Iterable[_T]) -> list[_T]:
    """Return ``current`` as a list (itself if it is one) with ``more`` added."""
    grown = current if isinstance(current, list) else list(current)
    grown.extend(more)
    return grown


class _Stored:
    """
    Something a pickle names: never imported, only recorded.

    Each name gets a subclass (made by :meth:`_Unpickler.find_class`) whose
    ``_name`` is the ``module.qualname`` the data gave. Calling it (``REDUCE``,
    ``NEWOBJ``) makes an instance that records the arguments (the tuple the data
    gave, never copied); ``BUILD`` records the state; ``APPENDS``, ``ADDITEMS`` and
    ``SETITEMS`` record items and entries. What is recorded is never hashed.
    """

    __slots__ = ("_args", "_callee", "_entries", "_items", "_kwargs", "_state")

    _name: ClassVar[str] = "?"
    _args: tuple[Any, ...]
    #: Keyword arguments, as (key, value) pairs (keys as the data gave them)
    _kwargs: Sequence[tuple[Any, Any]]
    _state: Sequence[Any]
    _items: Sequence[Any]
    _entries: Sequence[tuple[Any, Any]]
    #: What was called to make this (when an instance was called, not a class)
    _callee: _Stored | None

    @classmethod
    def _made(
        cls,
        args: tuple[Any, ...],
        kwargs: Sequence[tuple[Any, Any]] = (),
        callee: _Stored | None = None,
    ) -> _Stored:
        instance = object.__new__(cls)
        instance._args = args
        instance._kwargs = kwargs
        instance._state = instance._items = instance._entries = ()
        instance._callee = callee
        return instance


class _Dict:
    """A dict that a pickle builds: its entries in order, keys never hashed."""

    __slots__ = ("entries",)

    def __init__(self, entries: Sequence[tuple[Any, Any]] = ()) -> None:
        self.entries = entries


class _Set:
    """A set or frozenset that a pickle builds: its members, never hashed."""

    __slots__ = ("frozen", "items")

    def __init__(self, items: Sequence[Any] = (), *, frozen: bool = False) -> None:
        self.items = items
        self.frozen = frozen


class _Marshalled:
    """An object that APScheduler's JSON or CBOR serializer marshalled: its class
    reference (``module:qualname``) and its state, the class never imported."""

    def __init__(self, ref: object, state: object) -> None:
        self.ref = ref
        self.state = state


def _called(
    callee: object,
    args: object,
    kwargs: Sequence[tuple[Any, Any]] = (),
    *,
    class_only: bool = False,
) -> _Stored:
    """Return the placeholder for a call that a pickle makes (never made)."""
    if type(args) is not tuple:
        raise pickle.UnpicklingError(f"arguments are a {type(args).__name__}")

    if isinstance(callee, type) and issubclass(callee, _Stored):
        return callee._made(args, kwargs)

    if isinstance(callee, _Stored) and not class_only:
        return _Stored._made(args, kwargs, callee)

    raise pickle.UnpicklingError(f"cannot call a {type(callee).__name__}")


def _pairs(items: list[Any]) -> list[tuple[Any, Any]]:
    """Return the (key, value) pairs that the items after a pickle's mark give."""
    if len(items) % 2:
        raise pickle.UnpicklingError("odd number of items for a dict")

    return list(zip(items[::2], items[1::2], strict=True))


class _Unpickler(pickle._Unpickler):
    """
    An unpickler that imports nothing, calls nothing the data names and hashes
    nothing the data builds.

    The pure-Python unpickler, so that the opcodes that would hash, call or
    allocate can be replaced (see :data:`_DISPATCH`).
    """

    # The pure-Python unpickler's own (typeshed leaves them out)
    stack: list[Any]
    append: Callable[[Any], None]
    read: Callable[[int], bytes]
    pop_mark: Callable[[], list[Any]]

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
                "_Stored", (_Stored,), {"_name": f"{module}.{name}", "__slots__": ()}
            )

        return self._classes[key]

    def persistent_load(self, _pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are refused")

    def get_extension(self, _code: int) -> None:
        # The registry of copyreg, which holds real objects once a program used it
        raise pickle.UnpicklingError("extension codes are refused")

    # Calls, recorded

    def _instantiate(self, klass: object, args: list[Any]) -> None:  # INST, OBJ
        self.append(_called(klass, tuple(args)))

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = _called(self.stack[-1], args)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = _called(self.stack[-1], args, class_only=True)

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        if not isinstance(kwargs, _Dict):
            raise pickle.UnpicklingError(f"keyword arguments are a {type(kwargs)}")

        self.stack[-1] = _called(self.stack[-1], args, kwargs.entries, class_only=True)

    def _load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, _Stored):
            raise pickle.UnpicklingError(f"cannot set the state of a {type(target)}")

        target._state = _grown(target._state, (state,))

    # Containers, never hashing their contents

    def _load_empty_dict(self) -> None:
        self.append(_Dict())

    def _load_dict(self) -> None:
        entries = _pairs(self.pop_mark())  # first: it changes self.append
        self.append(_Dict(entries))

    def _set_items(self, entries: list[tuple[Any, Any]]) -> None:
        target = self.stack[-1]
        if isinstance(target, _Dict):
            target.entries = _grown(target.entries, entries)
        elif isinstance(target, _Stored):
            target._entries = _grown(target._entries, entries)
        else:
            raise pickle.UnpicklingError(f"cannot set items of a {type(target)}")

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._set_items([(key, value)])

    def _load_setitems(self) -> None:
        self._set_items(_pairs(self.pop_mark()))

    def _load_empty_set(self) -> None:
        self.append(_Set())

    def _load_frozenset(self) -> None:
        items = self.pop_mark()  # first: it changes self.append
        self.append(_Set(items, frozen=True))

    def _load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if isinstance(target, _Set) and not target.frozen:
            target.items = _grown(target.items, items)
        elif isinstance(target, _Stored):
            target._items = _grown(target._items, items)
        else:
            raise pickle.UnpicklingError(f"cannot add items to a {type(target)}")

    def _append_items(self, items: list[Any]) -> None:
        target = self.stack[-1]
        if type(target) is list:
            target.extend(items)
        elif isinstance(target, _Stored):
            target._items = _grown(target._items, items)
        else:
            raise pickle.UnpicklingError(f"cannot append to a {type(target)}")

    def _load_append(self) -> None:
        self._append_items([self.stack.pop()])

    def _load_appends(self) -> None:
        self._append_items(self.pop_mark())

    def _load_bytearray8(self) -> None:
        # The pure-Python unpickler allocates the size the data gives, first
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(min(size, MAX_SIZE))
        if len(data) != size:
            raise pickle.UnpicklingError("BYTEARRAY8 longer than the pickle")

        self.append(bytearray(data))


#: The unpickler's opcodes: the pure-Python unpickler's, but for those that hash,
#: call or allocate what the data gives
_DISPATCH: dict[int, Any] = {
    **pickle._Unpickler.dispatch,
    pickle.REDUCE[0]: _Unpickler._load_reduce,
    pickle.NEWOBJ[0]: _Unpickler._load_newobj,
    pickle.NEWOBJ_EX[0]: _Unpickler._load_newobj_ex,
    pickle.BUILD[0]: _Unpickler._load_build,
    pickle.EMPTY_DICT[0]: _Unpickler._load_empty_dict,
    pickle.DICT[0]: _Unpickler._load_dict,
    pickle.SETITEM[0]: _Unpickler._load_setitem,
    pickle.SETITEMS[0]: _Unpickler._load_setitems,
    pickle.EMPTY_SET[0]: _Unpickler._load_empty_set,
    pickle.FROZENSET[0]: _Unpickler._load_frozenset,
    pickle.ADDITEMS[0]: _Unpickler._load_additems,
    pickle.APPEND[0]: _Unpickler._load_append,
    pickle.APPENDS[0]: _Unpickler._load_appends,
    pickle.BYTEARRAY8[0]: _Unpickler._load_bytearray8,
}
_Unpickler.dispatch = _DISPATCH


# Decoding


def _load_pickle(data: bytes) -> object:
    return _Unpickler(data).load()


def _load_json(data: bytes) -> object:
    return json.loads(data)


#: CBOR tags refused, and what they stand for: string references and shared
#: values make a few bytes stand for much (cbor2 builds, hashes and copies what they
#: refer to each time), rationals take long to build from big integers, regular
#: expressions are compiled (and kept in the cache of :mod:`re`), MIME is parsed
_REFUSED_TAGS = {
    25: "string references",
    256: "string references",
    28: "shared values",
    29: "shared values",
    30: "rational numbers",
    35: "regular expressions",
    36: "MIME messages",
}
#: CBOR tags of big integers, whose bytes are limited to :data:`_MAX_BIGNUM`
_BIGNUM_TAGS = (2, 3)
#: The CBOR tag of a set, whose members (as map keys) are hashed
_SET_TAG = 258
#: The longest big integer in CBOR (bytes): decimal fractions and big floats are
#: slow to build from longer ones
_MAX_BIGNUM = 1024

# What holds a CBOR item being scanned
_ARRAY, _MAP, _TAG, _CHUNKS, _SET, _BIGNUM, _SET_TAGGED = range(7)


def _cbor_head(data: bytes, pos: int) -> tuple[int, int, int]:
    """Return the major type and argument (``-1``: indefinite) of the CBOR item at
    ``pos``, and where what follows its head starts."""
    if pos >= len(data):
        raise ValueError("not CBOR: cut short")

    major, info = data[pos] >> 5, data[pos] & 0x1F
    pos += 1
    if info < 24:
        return major, info, pos

    if info < 28:
        size = 1 << (info - 24)
        if pos + size > len(data):
            raise ValueError("not CBOR: cut short")
        return major, int.from_bytes(data[pos : pos + size], "big"), pos + size

    if info == 31 and major in (2, 3, 4, 5, 7):
        return major, -1, pos

    raise ValueError(f"not CBOR: invalid initial byte {data[pos - 1]:#04x}")


def _cbor_allowed(holder: list[int] | None, major: int, argument: int) -> None:
    """Refuse a CBOR item that ``holder`` (a frame of :func:`_check_cbor`) may not
    hold; raise :exc:`ValueError` if it cannot hold it at all."""
    if holder is None:
        return

    kind = holder[1]
    if (kind == _SET or (kind == _MAP and holder[2] % 2 == 0)) and major in (4, 5, 6):
        # Hashed, by cbor2: only numbers, strings and simple values can be, as
        # hashing is then quick and hard to make collide
        raise _Refused(
            "(cannot be shown: a CBOR map key or set member is not a number or text)"
        )

    if kind == _BIGNUM and not (major == 2 and 0 <= argument <= _MAX_BIGNUM):
        raise _Refused(
            f"(cannot be shown: a CBOR big number is over {_MAX_BIGNUM} bytes long)"
        )

    if kind == _SET_TAGGED and major != 4:
        raise _Refused("(cannot be shown: a CBOR set is not an array)")

    if kind == _CHUNKS and (major != holder[3] or argument < 0):
        raise ValueError("not CBOR: a string chunk is not a string")


def _cbor_frame(
    holder: list[int] | None, major: int, argument: int
) -> list[int] | None:
    """Return the frame (see :func:`_check_cbor`) of what a CBOR item holds, if it
    holds anything; refuse the tags of :data:`_REFUSED_TAGS`."""
    if major in (2, 3):
        return [-1, _CHUNKS, 0, major] if argument < 0 else None

    if major in (4, 5):
        if argument == 0:
            return None
        kind = _MAP if major == 5 else _ARRAY
        if holder is not None and holder[1] == _SET_TAGGED:
            kind = _SET
        return [argument * 2 if major == 5 and argument > 0 else argument, kind, 0, 0]

    if major == 6:
        if argument in _REFUSED_TAGS:
            raise _Refused(
                f"(cannot be shown: uses CBOR tag {argument}, "
                f"{_REFUSED_TAGS[argument]})"
            )
        kind = _TAG
        if argument in _BIGNUM_TAGS:
            kind = _BIGNUM
        elif argument == _SET_TAG:
            kind = _SET_TAGGED
        return [1, kind, 0, 0]

    return None


def _check_cbor(data: bytes) -> None:
    """
    Scan the first CBOR item of ``data`` (heads only, never building a value) and
    refuse it if decoding it could be slow or greedy: if it uses the tags of
    :data:`_REFUSED_TAGS`, big integers over :data:`_MAX_BIGNUM` bytes, or map keys
    or set members that are not numbers, strings or simple values (cbor2 hashes
    them: arrays of integers can be made to collide, so that building the map
    takes quadratic time).

    :raises _Refused: if the item is refused
    :raises ValueError: if the data is not CBOR
    """
    # What holds the item being read: [items left (-1: up to a break), kind,
    # items read, major type of chunks]
    frames: list[list[int]] = []
    pos = 0
    while True:
        major, argument, pos = _cbor_head(data, pos)
        holder = frames[-1] if frames else None
        if major == 7 and argument < 0:  # a break
            if (
                holder is None
                or holder[0] >= 0
                or (holder[1] == _MAP and holder[2] % 2)
            ):
                raise ValueError("not CBOR: misplaced break")
            frames.pop()
        else:
            _cbor_allowed(holder, major, argument)
            if major in (2, 3) and argument > 0:
                pos += argument
                if pos > len(data):
                    raise ValueError("not CBOR: cut short")
            frame = _cbor_frame(holder, major, argument)
            if frame is not None:
                frames.append(frame)
                continue

        # An item was read: count it in what holds it, closing what is then full
        while frames:
            frame = frames[-1]
            frame[2] += 1
            if frame[0] < 0:
                break
            frame[0] -= 1
            if frame[0]:
                break
            frames.pop()

        if not frames:
            return


def _cbor_tag(_decoder: object, tag: Any) -> object:
    if tag.tag in _REFUSED_TAGS:  # pragma: no cover (cbor2 decodes them itself)
        raise _Refused(f"(cannot be shown: uses CBOR tag {tag.tag})")

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

    _check_cbor(data)
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

    :raises _Refused: if the bytes are not decoded to be shown (over
        :data:`MAX_SIZE`, or CBOR that :func:`_check_cbor` refuses)
    :raises Exception: if the bytes cannot be decoded (any error a decoder raises)
    """
    if isinstance(serialized, memoryview):
        size = serialized.nbytes
    elif isinstance(serialized, (bytes, bytearray)):
        size = len(serialized)
    else:
        raise TypeError(f"stored as {type(serialized).__name__}, not as bytes")

    if size > MAX_SIZE:
        raise _Refused(f"(too large to show: {size} bytes)")

    data = bytes(serialized)
    first, *others = _decoders(data)
    try:
        return first(data)
    except _Refused:
        raise
    except Exception:
        for load in others:  # the same bytes may also be valid in another format
            with contextlib.suppress(Exception):
                return load(data)

        raise


# Showing


class _Full(Exception):
    """Raised inside :class:`_Writer` once the text is long enough."""


class _Writer:
    """
    Text written in parts, up to a limit (then :class:`_Full` is raised), by a walk
    of a value that visits a bounded number of values (then too).
    """

    def __init__(self, limit: int, memo: dict[int, bool] | None = None) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        #: How many more values may be visited
        self.visits = _VISITS_PER_CHARACTER * max(limit, 16)
        #: Whether the walk stopped before the text was long enough
        self.stopped = False
        #: What was found out about a value (by its id: the values shown are all
        #: kept by the value being shown), so as to find it out once
        self.memo: dict[int, bool] = {} if memo is None else memo

    @property
    def room(self) -> int:
        """How many more characters can be written (one more marks the cut)."""
        return max(self.limit - self.size, 0) + 1

    def visit(self) -> None:
        """Count a value visited, stopping the walk if too many were."""
        self.visits -= 1
        if self.visits < 0:
            self.stopped = True
            raise _Full

    def write(self, text: str) -> None:
        text = text[: self.room]
        self.parts.append(text)
        self.size += len(text)
        if self.size > self.limit:
            raise _Full

    def text(self) -> str:
        text = "".join(self.parts)
        return shorten(f"{text}..." if self.stopped else text, self.limit)


def _name(value: object) -> str:
    """
    Show a name the data gave: as it is if plain, else as a value (cut).

    Inside a walk (see :class:`_Writer`), a name that is not a string is written
    by the walk instead (its visits counted), see :class:`_ValueKey`.
    """
    if isinstance(value, str):
        if len(value) <= _NAME_LIMIT and _PLAIN_NAME.match(value):
            return value

        return shown(value[: _NAME_LIMIT + 1], _NAME_LIMIT)

    return _show(value, _NAME_LIMIT)


class _ValueKey:
    """A keyword that is not a string (as pickles can give), shown as a value."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value


def _as_bytes(value: object) -> bytes | None:
    """Return short bytes given directly or as protocol 0 pickles them, else
    ``None``."""
    if isinstance(value, bytes):
        return value

    if (
        isinstance(value, _Stored)
        and type(value)._name == "_codecs.encode"
        and len(value._args) == 2
        and isinstance(value._args[0], str)
        and len(value._args[0]) <= 16
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
    if not name.startswith("datetime.") or not args:
        return None

    data = _as_bytes(args[0])
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


#: An item that shows a value: ``(None, value)``, or ``(key, value)`` for
#: ``key=value`` (the key as text, or a value to write as the key)
_Item = tuple[str | _ValueKey | None, Any]


def _write_items(out: _Writer, items: Iterable[_Item], depth: int) -> None:
    """Write ``value`` or ``key=value`` items, comma separated."""
    for index, (key, value) in enumerate(items):
        if index:
            out.write(", ")
        if isinstance(key, _ValueKey):
            _write(out, key.value, depth)
            out.write("=")
        elif key is not None:
            out.write(f"{key}=")
        _write(out, value, depth)


def _entries(value: object) -> Iterable[tuple[Any, Any]] | None:
    """Return the entries of a dict (decoded or a pickle's), else ``None``."""
    if isinstance(value, dict):
        return value.items()

    if isinstance(value, _Dict):
        return value.entries

    return None


def _keywords(out: _Writer, value: object) -> Iterable[tuple[str, Any]] | None:
    """Return the entries of a dict whose keys are all identifiers, else ``None``
    (found out once for each dict)."""
    entries = _entries(value)
    if entries is None:
        return None

    known = out.memo.get(id(value))
    if known is None:
        known = out.memo[id(value)] = all(
            isinstance(key, str) and key.isidentifier() for key, _ in entries
        )

    return entries if known else None


def _state_items(out: _Writer, state: object) -> Iterable[_Item]:
    """Return the items that show a recorded state: ``key=value`` where it can."""
    if isinstance(state, tuple) and len(state) == 2:
        # (__dict__ or None, slot values): how objects with __slots__ pickle
        attributes = () if state[0] is None else _keywords(out, state[0])
        slots = _keywords(out, state[1])
        if attributes is not None and slots is not None:
            return itertools.chain(attributes, slots)

    keywords = _keywords(out, state)
    return [(None, state)] if keywords is None else keywords


def _no_time(value: object) -> bool:
    """Tell whether a value is a pickled ``timedelta(0)``."""
    return (
        isinstance(value, _Stored)
        and type(value)._name == "datetime.timedelta"
        and len(value._args) == 3
        and all(type(arg) is int and arg == 0 for arg in value._args)
        and not value._kwargs
    )


def _zone_key(callee: _Stored, args: tuple[Any, ...]) -> str | None:
    """Return the key of a pickled ``ZoneInfo`` (``getattr(ZoneInfo, '_unpickle')``
    called with the key), else ``None``."""
    if (
        type(callee)._name == "builtins.getattr"
        and len(callee._args) == 2
        and callee._args[1] == "_unpickle"
        and isinstance(zone := callee._args[0], type)
        and issubclass(zone, _Stored)
        and zone._name == "zoneinfo.ZoneInfo"
        and args
        and isinstance(args[0], str)
    ):
        return args[0]

    return None


def _call_items(out: _Writer, value: _Stored, args: tuple[Any, ...]) -> Iterator[_Item]:
    """Yield the items that show a call: its arguments and what it recorded."""
    for arg in args:
        yield None, arg
    for key, item in value._kwargs:
        yield (_name(key) if isinstance(key, str) else _ValueKey(key)), item
    for state in value._state:
        yield from _state_items(out, state)
    if value._items:
        yield None, value._items
    if value._entries:
        yield None, _Dict(value._entries)


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
        out.write(f"ZoneInfo({shown(args[0][:_NAME_LIMIT], 60)})")
        return
    else:
        _write(out, value._callee, depth + 1)

    out.write("(")
    _write_items(out, _call_items(out, value, args), depth + 1)
    out.write(")")


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
    if isinstance(ref, str):
        out.write(_name(ref))
    else:
        _write(out, ref, depth + 1)
    out.write("(")
    if state is not None:
        _write_items(out, _state_items(out, state), depth + 1)
    out.write(")")


def _write_sequence(
    out: _Writer, opening: str, values: Iterable[Any], closing: str, depth: int
) -> None:
    out.write(opening)
    _write_items(out, ((None, value) for value in values), depth + 1)
    out.write(closing)


def _write_set(out: _Writer, items: Iterable[Any], frozen: bool, depth: int) -> None:
    if not items:
        out.write("frozenset()" if frozen else "set()")
    elif frozen:
        _write_sequence(out, "frozenset({", items, "})", depth)
    else:
        _write_sequence(out, "{", items, "}", depth)


def _write_mapping(
    out: _Writer, entries: Iterable[tuple[Any, Any]], depth: int
) -> None:
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
    out.visit()
    if depth > MAX_DEPTH:
        out.write("...")
    elif isinstance(value, _Stored):
        _write_stored(out, value, depth)
    elif isinstance(value, type) and issubclass(value, _Stored):
        out.write(_name(value._name))  # named, never called
    elif isinstance(value, _Dict):
        _write_mapping(out, value.entries, depth)
    elif isinstance(value, _Set):
        _write_set(out, value.items, value.frozen, depth)
    elif (marshalled := _as_marshalled(value)) is not None:
        _write_marshalled(out, marshalled.ref, marshalled.state, depth)
    elif isinstance(value, str):
        out.write(repr(value[: out.room]))
    elif isinstance(value, (bytes, bytearray)):
        out.write(repr(bytes(value[: out.room])))
    elif isinstance(value, dict):
        _write_mapping(out, value.items(), depth)
    elif isinstance(value, list):
        _write_sequence(out, "[", value, "]", depth)
    elif isinstance(value, tuple):
        _write_sequence(out, "(", value, ",)" if len(value) == 1 else ")", depth)
    elif isinstance(value, (set, frozenset)):
        _write_set(out, value, isinstance(value, frozenset), depth)
    elif type(value).__name__ == "CBORTag" and hasattr(value, "tag"):
        out.write(f"CBORTag({shown(getattr(value, 'tag', None))}, ")
        _write(out, getattr(value, "value", None), depth + 1)
        out.write(")")
    else:
        # Numbers, None, and the standard library's values (dates, decimals, UUIDs)
        # that CBOR's own tags give
        out.write(shown(value, out.room))


def _render(
    limit: int, how: Callable[[_Writer], None], memo: dict[int, bool] | None = None
) -> str:
    out = _Writer(limit, memo)
    try:
        how(out)
    except _Full:
        pass
    except Exception as exc:
        return shorten(f"(cannot be shown: {_error_text(exc)})", limit)

    return out.text()


def _show(value: object, limit: int, memo: dict[int, bool] | None = None) -> str:
    return _render(limit, lambda out: _write(out, value, 0), memo)


def show_value(value: object, limit: int = LIMIT) -> str:
    """Return a decoded value as text, placeholders as the calls they stand for."""
    return _show(value, limit)


#: How the text of stored bytes that cannot be decoded starts
UNREADABLE = "(unreadable: "


def _decoded(serialized: object, limit: int) -> tuple[bool, object]:
    """Return ``(True, value)``, or ``(False, text)`` if the bytes are unreadable
    or not decoded to be shown (the text says which)."""
    try:
        return True, decode(serialized)
    except _Refused as refused:
        return False, shorten(refused.text, limit)
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
    :return: the text; ``(unreadable: ...)`` if the bytes cannot be decoded,
        ``(too large to show: ...)`` or ``(cannot be shown: ...)`` if they are not
        decoded to be shown
    """
    readable, value = _decoded(serialized, limit)
    return show_value(value, limit) if readable else str(value)


def _keyword_arguments(named: object) -> Iterable[tuple[str, Any]] | None:
    """Return the entries of decoded keyword arguments (a dict with text keys)."""
    if isinstance(named, Mapping) and _as_marshalled(named) is not None:
        return None

    entries = _entries(named)
    if entries is None or not all(isinstance(key, str) for key, _ in entries):
        return None

    return entries


def _argument_parts(positional: object, named: object) -> Iterator[_Item]:
    """Yield the parts of decoded arguments: ``(None, arg)``, ``(name, arg)``, or
    ``("*", args)`` and ``("**", kwargs)`` for what is not a list or a dict."""
    if isinstance(positional, (list, tuple)):
        for arg in positional:
            yield None, arg
    elif positional is not None:
        yield "*", positional

    entries = _keyword_arguments(named)
    if entries is not None:
        for key, value in entries:
            yield _name(key), value
    elif named is not None:
        yield "**", named


def describe_arguments(args: object, kwargs: object, limit: int = LIMIT) -> str:
    """
    Return stored positional and keyword arguments (each serialized) as one text,
    ``1, 'a', key='value'``; an argument list that cannot be decoded says so.
    """
    readable, positional = _decoded(args, limit)
    if not readable:
        return f"args: {positional}"

    readable, named = _decoded(kwargs, limit)
    if not readable:
        return f"kwargs: {named}"

    memo: dict[int, bool] = {}
    parts = _argument_parts(positional, named)

    def write(out: _Writer) -> None:
        for index, (key, value) in enumerate(parts):
            out.visit()
            if index:
                out.write(", ")
            if key in ("*", "**"):
                out.write(str(key))
            elif key is not None:
                out.write(f"{key}=")
            # One argument that cannot be shown spoils only its own place
            out.write(_show(value, out.room, memo))

    return _render(limit, write, memo)


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
            return shorten(f"{name}: {args[0][:limit]}", limit)

        return shorten(f"{name}: {show_value(args, limit)}", limit)

    if (marshalled := _as_marshalled(value)) is not None:
        # APScheduler marshals an exception as its class and __dict__ (no message)
        name = _exception_name(marshalled.ref)
        if marshalled.state is None or (
            isinstance(marshalled.state, dict) and not marshalled.state
        ):
            return shorten(name, limit)

        return shorten(f"{name}: {show_value(marshalled.state, limit)}", limit)

    return show_value(value, limit)
