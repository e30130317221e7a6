"""Serializers that rebuild only the classes they are allowed to.

APScheduler 4.0.0a6's serializers run code chosen by whoever can write the database
(advisory CVE-2026-31072):
:class:`~apscheduler.serializers.json.JSONSerializer` and
:class:`~apscheduler.serializers.cbor.CBORSerializer` rebuild a marshalled object by
importing whatever module its ``"module:qualname"`` reference names and calling the
class's ``__new__()`` and ``__setstate__()``, and
:class:`~apscheduler.serializers.pickle.PickleSerializer` is plain :func:`pickle.loads`.
Even a trigger is not safe: ``AndTrigger`` and ``OrTrigger`` import the modules named
in their stored state when they are rebuilt.

The serializers here write exactly what APScheduler's write, and read it back
rebuilding only allowed classes:

* always: :data:`BUILTIN_ALLOWED_TYPES`, which holds APScheduler's triggers and
  enums, the harmless value types of the standard library that job arguments and
  results commonly hold, and the exception classes of :mod:`builtins` (so that a job's
  stored exception reads back)
* the classes given in ``allowed_types``, either as classes or as ``"module:qualname"``
  strings. A string is compared as text and never imported: it only resolves when its
  module has already been imported by the application.

Nothing a payload names is ever imported, and anything else it names is refused with
:exc:`~apscheduler.DeserializationError`. The pickle serializer also refuses
persistent ids, and stands in for the few functions that pickle's own protocol needs
(``copyreg._reconstructor``, ``_codecs.encode``, ``getattr`` for
``ZoneInfo._unpickle``) with versions that accept only what pickle writes. While the
application has registered :func:`copyreg.add_extension` codes, it refuses pickles
that use them.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import copyreg
import io
import json
import pickle
import pickletools
import re
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Final, TypeGuard, cast
from uuid import UUID
from zoneinfo import ZoneInfo

import attrs
from apscheduler import (
    CoalescePolicy,
    ConflictPolicy,
    DeserializationError,
    JobOutcome,
    SerializationError,
    TaskLookupError,
)
from apscheduler.abc import Trigger
from apscheduler.serializers.json import JSONSerializer
from apscheduler.serializers.pickle import PickleSerializer
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.combining import AndTrigger, BaseCombiningTrigger, OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from ._signing import DisallowedCallableError, UnverifiedDataError

#: Why cbor2 could not be imported, if it could not
_CBOR2_MISSING: ImportError | None

if TYPE_CHECKING:
    import cbor2
    from apscheduler.serializers.cbor import CBORSerializer
else:
    try:
        import cbor2
        from apscheduler.serializers.cbor import CBORSerializer
    except ImportError as exc:  # cbor2 is an optional dependency
        _CBOR2_MISSING = exc

        @attrs.define(kw_only=True, eq=False)
        class CBORSerializer:
            """Stand in for APScheduler's CBOR serializer (never instantiated)."""

            type_tag: int = 4664
            dump_options: dict[str, Any] = attrs.field(factory=dict)
            load_options: dict[str, Any] = attrs.field(factory=dict)

    else:
        _CBOR2_MISSING = None

__all__ = [
    "BUILTIN_ALLOWED_TYPES",
    "SafeCBORSerializer",
    "SafeJSONSerializer",
    "SafePickleSerializer",
]

#: The classes that every safe serializer rebuilds, whatever ``allowed_types`` says
BUILTIN_ALLOWED_TYPES: Final[frozenset[type]] = frozenset(
    {
        # APScheduler's triggers (the cron trigger stores its fields as text)
        DateTrigger,
        IntervalTrigger,
        CalendarIntervalTrigger,
        CronTrigger,
        AndTrigger,
        OrTrigger,
        # APScheduler's enums
        CoalescePolicy,
        ConflictPolicy,
        JobOutcome,
        # Value types of the standard library; none of them calls anything it is given
        date,
        datetime,
        time,
        timedelta,
        timezone,
        ZoneInfo,
        UUID,
        Decimal,
        Fraction,
        OrderedDict,  # not defaultdict: its default_factory is called later
        deque,
        set,
        frozenset,
        complex,
        range,
        slice,
        # The errors the store itself finishes jobs with (exceptions hold no code)
        TaskLookupError,
        DeserializationError,
        SerializationError,
        UnverifiedDataError,
        DisallowedCallableError,
        # Every exception class of builtins, so that a job's stored exception reads back
        *(
            value
            for value in vars(builtins).values()
            if isinstance(value, type) and issubclass(value, BaseException)
        ),
    }
)


def _ref(cls: type) -> str:
    """Return the ``"module:qualname"`` reference of ``cls``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_ref(text: str) -> bool:
    """Tell whether ``text`` has the form ``"module:qualname"``."""
    module_name, colon, qualname = text.partition(":")
    return bool(colon) and all(
        part.isidentifier() for part in (*module_name.split("."), *qualname.split("."))
    )


def _check_allowed_types(value: Iterable[type | str]) -> tuple[type | str, ...]:
    """Return the extra allowed types as a tuple, after checking each of them.

    :param value: classes, and ``"module:qualname"`` strings naming classes
    :raises TypeError: if ``value`` is not an iterable of classes and strings
    :raises ValueError: if a string is not of the form ``"module:qualname"``

    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            "allowed_types must be an iterable of classes and 'module:qualname' "
            f"strings, not {type(value).__qualname__}"
        )

    items = tuple(value)
    for item in items:
        if isinstance(item, str):
            if not _is_ref(item):
                raise ValueError(
                    f"allowed_types: {item!r} is not a 'module:qualname' reference"
                )
        elif not isinstance(item, type):
            raise TypeError(
                f"allowed_types: {item!r} is neither a class nor a 'module:qualname' "
                "string"
            )

    return items


def _refuse(ref: str, reason: str = "not an allowed type") -> DeserializationError:
    return DeserializationError(f"refusing to rebuild {ref!r}: {reason}")


@attrs.frozen
class _AllowList:
    """Resolve allowed references to classes, and rebuild marshalled objects."""

    #: Allowed classes by reference: the built-in ones and those given as classes
    classes: Mapping[str, type]
    #: References given as strings, resolved only among the imported modules
    names: frozenset[str]

    @classmethod
    def build(cls, allowed_types: Iterable[type | str]) -> _AllowList:
        """Return the allow list of the built-in types plus ``allowed_types``."""
        classes = {_ref(item): item for item in BUILTIN_ALLOWED_TYPES}
        names: set[str] = set()
        for item in allowed_types:
            if isinstance(item, str):
                names.add(item)
            else:
                classes[_ref(item)] = item

        return cls(classes, frozenset(names - classes.keys()))

    def resolve(self, ref: str) -> type:
        """Return the allowed class named by ``ref``, importing nothing.

        :param ref: a ``"module:qualname"`` reference
        :raises DeserializationError: if ``ref`` does not name an allowed class

        """
        cls = self.classes.get(ref)
        if cls is not None:
            return cls

        if ref not in self.names:
            raise _refuse(ref)

        module_name, _, qualname = ref.partition(":")
        obj: object = sys.modules.get(module_name)
        if obj is None:
            raise _refuse(ref, f"module {module_name!r} has not been imported")

        for name in qualname.split("."):
            obj = getattr(obj, name, None)

        if not isinstance(obj, type):
            raise _refuse(ref, "it does not name a class")

        if _ref(obj) != ref:
            raise _refuse(ref, f"it names the class {_ref(obj)!r}")

        return obj

    def allows(self, cls: type) -> bool:
        """Tell whether ``cls`` is an allowed class."""
        try:
            return self.resolve(_ref(cls)) is cls
        except DeserializationError:
            return False

    def rebuild(self, ref: object, state: object) -> object:
        """Return a new instance of the allowed class ``ref``, given its state.

        :param ref: the ``"module:qualname"`` reference of the class
        :param state: what the object's ``__getstate__()`` returned
        :raises DeserializationError: if ``ref`` does not name an allowed class

        """
        if not isinstance(ref, str):
            raise DeserializationError(f"malformed class reference {ref!r:.80}")

        cls = self.resolve(ref)
        instance: object = cast(Any, cls).__new__(cls)
        self.restore(instance, cls, state)
        return instance

    def restore(self, instance: object, cls: type, state: object) -> None:
        """Give ``instance`` (of class ``cls``) its state, as pickle's BUILD would.

        :raises DeserializationError: if a combining trigger's state names a class that
            is not an allowed trigger class, or ``cls`` cannot take a state

        """
        if issubclass(cls, BaseCombiningTrigger):
            # BaseCombiningTrigger.__setstate__() would import the modules named in
            # the state, so rebuild the combined triggers here and hand it none
            if not isinstance(state, Mapping) or not isinstance(
                state.get("triggers"), (list, tuple)
            ):
                raise DeserializationError(f"malformed state of {_ref(cls)!r}")

            triggers = [self._rebuild_trigger(item) for item in state["triggers"]]
            assert isinstance(instance, cls)
            cls.__setstate__(instance, {**state, "triggers": []})
            instance.triggers = triggers
            return

        setstate: Callable[[object], None] | None = getattr(
            instance, "__setstate__", None
        )
        if setstate is None:
            raise _refuse(_ref(cls), "it has no __setstate__()")

        setstate(state)

    def _rebuild_trigger(self, marshalled: object) -> Trigger:
        if not isinstance(marshalled, (list, tuple)) or len(marshalled) != 2:
            raise DeserializationError(f"malformed combined trigger {marshalled!r:.80}")

        ref, state = marshalled
        if isinstance(ref, str) and not issubclass(self.resolve(ref), Trigger):
            raise _refuse(ref, "it is not a trigger class")

        trigger = self.rebuild(ref, state)
        assert isinstance(trigger, Trigger)
        return trigger


def _deserialize(load: Callable[[], Any]) -> Any:
    """Return what ``load()`` returns, turning any error into DeserializationError."""
    try:
        return load()
    except DeserializationError:
        raise
    except Exception as exc:
        raise DeserializationError(f"cannot deserialize: {exc}") from exc


@attrs.define(kw_only=True, eq=False)
class SafeJSONSerializer(JSONSerializer):
    """Serialize objects as JSON, and rebuild only allowed classes.

    Writes exactly what :class:`~apscheduler.serializers.json.JSONSerializer` writes.

    :param allowed_types: classes to rebuild besides :data:`BUILTIN_ALLOWED_TYPES`,
        as classes or as ``"module:qualname"`` strings (only resolved when their module
        has already been imported)
    :param magic_key: name of the dict key that marks a marshalled object
    :param dump_options: keyword arguments passed to :func:`json.dumps`
    :param load_options: keyword arguments passed to :func:`json.loads`
    :raises TypeError: if ``allowed_types`` holds something else than classes and
        strings
    :raises ValueError: if a string in ``allowed_types`` is not a reference
    """

    allowed_types: tuple[type | str, ...] = attrs.field(
        default=(), converter=_check_allowed_types
    )
    _allow_list: _AllowList = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # type: ignore[no-untyped-call]
        self._allow_list = _AllowList.build(self.allowed_types)

    def _object_hook(self, obj_state: dict[str, Any]) -> Any:
        if self.magic_key not in obj_state:
            return obj_state

        marshalled = obj_state[self.magic_key]
        if not isinstance(marshalled, list) or len(marshalled) != 2:
            raise DeserializationError(
                f"malformed marshalled object {marshalled!r:.80}"
            )

        return self._allow_list.rebuild(*marshalled)

    def deserialize(self, serialized: bytes) -> Any:
        """Return the object that ``serialized`` holds.

        :param serialized: what :meth:`serialize` returned
        :raises DeserializationError: if ``serialized`` is not valid JSON or names a
            class that is not allowed

        """
        return _deserialize(lambda: json.loads(serialized, **self.load_options))


@attrs.define(kw_only=True, eq=False)
class SafeCBORSerializer(CBORSerializer):
    """Serialize objects as CBOR, and rebuild only allowed classes.

    Writes exactly what :class:`~apscheduler.serializers.cbor.CBORSerializer` writes.
    Needs the optional dependency ``cbor2``. Tags other than ``type_tag`` that cbor2
    does not know are returned as :class:`cbor2.CBORTag` objects.

    :param allowed_types: classes to rebuild besides :data:`BUILTIN_ALLOWED_TYPES`,
        as classes or as ``"module:qualname"`` strings (only resolved when their module
        has already been imported)
    :param type_tag: CBOR tag number that marks a marshalled object
    :param dump_options: keyword arguments passed to :func:`cbor2.dumps`
    :param load_options: keyword arguments passed to :func:`cbor2.loads`, except
        ``tag_hook``
    :raises ImportError: if cbor2 is not installed
    :raises TypeError: if ``allowed_types`` holds something else than classes and
        strings
    :raises ValueError: if a string in ``allowed_types`` is not a reference, or
        ``load_options`` has a ``tag_hook`` (it would bypass the allowed types)
    """

    allowed_types: tuple[type | str, ...] = attrs.field(
        default=(), converter=_check_allowed_types
    )
    _allow_list: _AllowList = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if _CBOR2_MISSING is not None:
            raise ImportError(
                "SafeCBORSerializer needs the cbor2 package (pip install cbor2)"
            ) from _CBOR2_MISSING

        if "tag_hook" in self.load_options:
            raise ValueError(
                "load_options must not have a tag_hook: it would rebuild classes "
                "without checking them"
            )

        super().__attrs_post_init__()
        self._allow_list = _AllowList.build(self.allowed_types)

    def _tag_hook(
        self,
        decoder: cbor2.CBORDecoder,
        tag: cbor2.CBORTag,
        shareable_index: int | None = None,
    ) -> object:
        del decoder, shareable_index  # cbor2 passes them; they are of no use here
        if tag.tag != self.type_tag:
            return tag

        marshalled = tag.value
        if not isinstance(marshalled, (list, tuple)) or len(marshalled) != 2:
            raise DeserializationError(
                f"malformed marshalled object {marshalled!r:.80}"
            )

        return self._allow_list.rebuild(*marshalled)

    def deserialize(self, serialized: bytes) -> Any:
        """Return the object that ``serialized`` holds.

        :param serialized: what :meth:`serialize` returned
        :raises DeserializationError: if ``serialized`` is not valid CBOR or names a
            class that is not allowed

        """
        return _deserialize(lambda: cbor2.loads(serialized, **self.load_options))


#: The unpickler at work in this context (read by the stand-ins of combining triggers)
_UNPICKLER: ContextVar[_SafeUnpickler | None] = ContextVar("_UNPICKLER", default=None)
#: Stand-in subclass of each combining trigger class, and the other way round
_STAND_INS: dict[type, type] = {}
_REAL_CLASSES: dict[type, type] = {}


def _stand_in(cls: type[BaseCombiningTrigger]) -> type:
    """Return a subclass of ``cls`` whose ``__setstate__()`` imports nothing.

    Pickle's BUILD calls ``__setstate__()`` of whatever it built, as often as the data
    says, and that of a combining trigger imports the modules named in its state. So
    the unpickler builds an instance of this subclass instead, whose
    ``__setstate__()`` rebuilds the combined triggers through the allow list, and gives
    the instance its real class once the whole pickle has been read.
    """
    stand_in = _STAND_INS.get(cls)
    if stand_in is None:

        def __setstate__(self: BaseCombiningTrigger, state: object) -> None:
            unpickler = _UNPICKLER.get()
            if unpickler is None:
                raise DeserializationError(f"{_ref(cls)!r} is being unpickled unsafely")

            unpickler.restore_combining(self, cls, state)

        namespace = {"__slots__": (), "__setstate__": __setstate__}
        stand_in = type(f"_StandIn{cls.__name__}", (cls,), namespace)
        _STAND_INS[cls] = stand_in
        _REAL_CLASSES[stand_in] = cls

    return stand_in


def _encoder() -> Callable[[object, object], bytes]:
    """Return a stand-in for ``_codecs.encode``, which protocols 0-2 use for bytes.

    Pickle only ever writes ``_codecs.encode(text, "latin1")``, which is harmless; any
    other codec is refused, as looking it up would import ``encodings.<name>``.
    """

    def encode(text: object, encoding: object) -> bytes:
        if not isinstance(text, str) or encoding != "latin1":
            raise pickle.UnpicklingError(
                "refusing to rebuild '_codecs:encode' with other arguments than a "
                "string and 'latin1'"
            )

        return text.encode("latin-1")

    return encode


def _bytes_maker(cls: type[bytes] | type[bytearray]) -> Callable[..., object]:
    """Return a stand-in for ``cls`` that takes no encoding (so looks up no codec)."""

    def make(*args: object) -> object:
        if len(args) > 1:
            raise pickle.UnpicklingError(
                f"refusing to rebuild 'builtins:{cls.__name__}' with an encoding"
            )

        return cls(*args)

    return make


def _caller(cls: type) -> Callable[..., object]:
    """Return a new function that calls ``cls``.

    Pickle's BUILD sets the attributes of whatever it is given, a class included, when
    that has no ``__setstate__()``. The classes whose pickles only call them (such as
    Fraction and the enums) are handed out as such a function instead, whose
    attributes matter to nobody.
    """

    def make(*args: object) -> object:
        return cls(*args)

    return make


#: What ``str(Fraction)`` writes, which pickle passes on Python 3.11 and older
_FRACTION_TEXT: Final = re.compile(r"-?[0-9]{1,4300}(?:/[0-9]{1,4300})?")


def _integer(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _fraction_maker() -> Callable[..., object]:
    """Return a stand-in for Fraction that takes only what pickle writes.

    That is a numerator and a denominator (Python 3.12 and later), or their text
    (earlier ones). Fraction's own parser also takes decimals and exponents, and
    ``Fraction("1e10000000")`` alone takes seconds: a crafted pickle could keep a
    reader busy with a few bytes each.
    """

    def make(*args: object) -> object:
        if len(args) == 2:
            numerator, denominator = args
            if _integer(numerator) and _integer(denominator):
                return Fraction(numerator, denominator)

        if (
            len(args) == 1
            and isinstance(args[0], str)
            and _FRACTION_TEXT.fullmatch(args[0])
        ):
            return Fraction(args[0])

        raise pickle.UnpicklingError(
            "refusing to rebuild 'fractions:Fraction' from other than a numerator "
            "and a denominator"
        )

    return make


#: Py_TPFLAGS_IMMUTABLETYPE: the attributes of the class cannot be set
_IMMUTABLE_TYPE: Final = 1 << 8
#: Built-in allowed classes that BUILD could change, so handed out through _caller()
_CALLED_TYPES: Final[frozenset[type]] = frozenset(
    cls
    for cls in BUILTIN_ALLOWED_TYPES
    if not cls.__flags__ & _IMMUTABLE_TYPE and not hasattr(cls, "__setstate__")
)


def _modern_name(module_name: str, name: str) -> tuple[str, str]:
    """Return the Python 3 name of what a pickle names, as :class:`pickle.Unpickler`.

    Pickle protocols 0-2 write Python 2 names such as ``__builtin__.set`` and
    ``copy_reg._reconstructor``. Mapping them is harmless: what they map to still has
    to be allowed.
    """
    if (module_name, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[module_name, name]

    return _compat_pickle.IMPORT_MAPPING.get(module_name, module_name), name


#: Pickle's opcodes that load an object registered with copyreg.add_extension()
_EXT_OPCODES: Final = frozenset({"EXT1", "EXT2", "EXT4"})
#: The namespace of copyreg, whose extension registry is private (and untyped)
_COPYREG: Final[Mapping[str, Any]] = vars(copyreg)


def _refuse_extensions(serialized: bytes) -> None:
    """Refuse ``serialized`` if it uses copyreg's extension registry, when in use.

    Pickle's EXT1, EXT2 and EXT4 opcodes load the object registered under a code with
    :func:`copyreg.add_extension`. The C unpickler hands out the object cached in
    ``copyreg._extension_cache`` without calling ``find_class()``, and cannot be told
    to refuse these opcodes, so while any extension is registered the payload is
    scanned for them first. While none is (the default), the scan is skipped to keep
    reading fast: the cache is then empty and an EXT opcode only fails with
    ``ValueError("unregistered extension code ...")``, which ends in
    DeserializationError. The inverted registry and the cache are checked too, as
    they are what the unpickler reads, and could be left over if changed directly.

    :raises DeserializationError: if an extension is registered and ``serialized``
        has an EXT opcode, or cannot be parsed

    """
    if not (
        _COPYREG["_extension_registry"]
        or _COPYREG["_inverted_registry"]
        or _COPYREG["_extension_cache"]
    ):
        return

    try:
        for opcode, _, pos in pickletools.genops(serialized):
            if opcode.name in _EXT_OPCODES:
                raise DeserializationError(
                    f"refusing the {opcode.name} opcode at byte {pos}: objects "
                    "registered with copyreg.add_extension() are not checked"
                )
    except DeserializationError:
        raise
    except Exception as exc:
        raise DeserializationError(f"cannot deserialize: {exc}") from exc


class _SafeUnpickler(pickle.Unpickler):
    """Unpickle only allowed classes, and what pickle's protocol needs."""

    def __init__(self, file: io.BytesIO, allow_list: _AllowList) -> None:
        super().__init__(file)
        self._allow_list = allow_list
        self._stand_ins: list[BaseCombiningTrigger] = []
        # Bound methods and new functions: BUILD can change nothing shared through them
        self._helpers: dict[str, object] = {
            "copyreg:_reconstructor": self._reconstructor,
            "builtins:object": object,  # the base that copyreg._reconstructor gets
            "builtins:getattr": self._getattr,
            "_codecs:encode": _encoder(),
            "builtins:bytes": _bytes_maker(bytes),
            "builtins:bytearray": _bytes_maker(bytearray),
        }

    def find_class(self, module_name: str, global_name: str, /) -> Any:
        """Return the allowed class or pickle helper named ``module_name.global_name``.

        :raises pickle.UnpicklingError: if it is neither

        """
        module_name, global_name = _modern_name(module_name, global_name)
        ref = f"{module_name}:{global_name}"
        helper = self._helpers.get(ref)
        if helper is not None:
            return helper

        try:
            cls = self._allow_list.resolve(ref)
        except DeserializationError as exc:
            raise pickle.UnpicklingError(str(exc)) from None

        if issubclass(cls, BaseCombiningTrigger):
            return _stand_in(cls)

        if cls is Fraction:
            return _fraction_maker()

        if cls in _CALLED_TYPES:
            return _caller(cls)

        return cls

    def persistent_load(self, pid: Any, /) -> Any:
        """Refuse the persistent id ``pid``.

        :raises pickle.UnpicklingError: always

        """
        raise pickle.UnpicklingError(
            f"refusing persistent id {pid!r:.80}: persistent ids are not supported"
        )

    def load(self) -> Any:
        """Return the unpickled object, with every combining trigger's real class."""
        token = _UNPICKLER.set(self)
        try:
            obj = super().load()
        finally:
            _UNPICKLER.reset(token)

        for trigger in self._stand_ins:
            object.__setattr__(trigger, "__class__", _REAL_CLASSES[type(trigger)])

        return obj

    def restore_combining(
        self, instance: BaseCombiningTrigger, cls: type, state: object
    ) -> None:
        """Give the stand-in ``instance`` of the combining trigger ``cls`` its state."""
        self._allow_list.restore(instance, cls, state)
        self._stand_ins.append(instance)

    def _getattr(self, obj: object, name: object) -> object:
        # Pickle writes the classmethod in ZoneInfo.__reduce__() as
        # getattr(ZoneInfo, "_unpickle"); nothing else may be looked up
        if obj is not ZoneInfo or name != "_unpickle":
            raise pickle.UnpicklingError(
                f"refusing to rebuild 'builtins:getattr' for {name!r:.80} of an "
                f"object of type {type(obj).__qualname__!r}"
            )

        return getattr(obj, name)

    def _reconstructor(self, cls: object, base: object, state: object) -> object:
        # copyreg._reconstructor, as pickle protocols 0 and 1 use it, for allowed
        # classes only
        real = _REAL_CLASSES.get(cls, cls) if isinstance(cls, type) else cls
        if (
            not isinstance(real, type)
            or not isinstance(cls, type)
            or not isinstance(base, type)
            or not self._allow_list.allows(real)
            or not issubclass(cls, base)
            or (base is not object and not self._allow_list.allows(base))
        ):
            raise pickle.UnpicklingError(
                "refusing to rebuild 'copyreg:_reconstructor' for other than an "
                "allowed class"
            )

        if base is object:
            return object.__new__(cls)

        base_class: Any = base
        obj: object = base_class.__new__(cls, state)
        if base_class.__init__ != object.__init__:
            base_class.__init__(obj, state)

        return obj


@attrs.define(kw_only=True, eq=False)
class SafePickleSerializer(PickleSerializer):
    """Serialize objects with :mod:`pickle`, and rebuild only allowed classes.

    Writes exactly what :class:`~apscheduler.serializers.pickle.PickleSerializer`
    writes. Reading refuses any class or function that is not allowed, persistent
    ids, and (while :func:`copyreg.add_extension` has registered any) extension codes.

    :param allowed_types: classes to rebuild besides :data:`BUILTIN_ALLOWED_TYPES`,
        as classes or as ``"module:qualname"`` strings (only resolved when their module
        has already been imported)
    :param protocol: the pickle protocol to write
    :raises TypeError: if ``allowed_types`` holds something else than classes and
        strings
    :raises ValueError: if a string in ``allowed_types`` is not a reference
    """

    allowed_types: tuple[type | str, ...] = attrs.field(
        default=(), converter=_check_allowed_types
    )
    _allow_list: _AllowList = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._allow_list = _AllowList.build(self.allowed_types)

    def deserialize(self, serialized: bytes) -> Any:
        """Return the object that ``serialized`` holds.

        :param serialized: what :meth:`serialize` returned
        :raises DeserializationError: if ``serialized`` is not a valid pickle, names a
            class or function that is not allowed, has a persistent id, or uses an
            extension code while any is registered

        """
        _refuse_extensions(serialized)
        unpickler = _SafeUnpickler(io.BytesIO(serialized), self._allow_list)
        return _deserialize(unpickler.load)
