"""Persist: every stateful object saves a typed, versioned state and restores from it.

A state is a frozen dataclass deriving from `State`, naming what it describes (`KIND`) and
its layout's version (`VERSION`). Its fields have plain types: int, bool, str, bytes, float,
None, other States, `tuple[X, ...]`, fixed tuples, `dict[str | int, X]` and unions (`X | None`).
Constructing a state checks every field against its annotation and then runs `validate()`
(range checks), so a State object that exists is well-formed: a restore checks only what
depends on the object restored into (a FIFO's capacity, a queue size the device offers) and
then applies the state, never leaving a half-restored object.

`to_dict()` gives a JSON-able form ({"kind", "version", "fields"}; bytes as base64) and
`from_dict()` reads it back with the same checks: a wrong kind or version, a missing or an
extra field, a value of the wrong type or out of range is a `StateError` naming the field.
A class reads older layouts by overriding `upgrade(version, fields)`. A field annotated with
a base State class (e.g. `device: State`) holds any state deriving from it: the serialised
form is read back by its kind (every State class registers its KIND; kinds are unique).

Objects implement the `Persist` protocol: `save() -> S` and `restore(S)`.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import types
import typing
from typing import Any, ClassVar, Protocol, TypeVar

from .errors import UserError

S = TypeVar("S", bound="State")


class StateError(UserError, ValueError):
    """A saved state that cannot be restored: the message names the state and the field."""


class Persist(Protocol[S]):
    def save(self) -> S: ...

    def restore(self, state: S) -> None: ...


@dataclasses.dataclass(frozen=True)
class State:
    KIND: ClassVar[str] = "state"
    VERSION: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        known = _KINDS.get(cls.KIND)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"state kind {cls.KIND!r} is taken by {known.__module__}.{known.__qualname__}")
        _KINDS[cls.KIND] = cls  # the same class defined again (a test run twice) replaces itself

    def __post_init__(self) -> None:
        for name, annotation in _field_types(type(self)).items():
            _check(f"{self.KIND}.{name}", getattr(self, name), annotation)
        self.validate()

    def validate(self) -> None:
        """Range and consistency checks beyond the field types; raise StateError (see `fail`)."""

    def fail(self, field: str, problem: str) -> typing.NoReturn:
        raise StateError(f"{self.KIND} state: {field}: {problem}")

    def check_range(self, field: str, low: int, high: int) -> None:
        value = getattr(self, field)
        if not low <= value <= high:
            self.fail(field, f"{value} is outside {low}..{high}")

    def check_mask(self, field: str, mask: int) -> None:
        """The field is a non-negative int with no bit set outside `mask`."""
        value = getattr(self, field)
        if value < 0 or value & ~mask:
            self.fail(field, f"{value:#x} has bits outside {mask:#x}")

    def check_items(self, field: str, low: int, high: int) -> None:
        """Every int in the tuple field lies in low..high."""
        for i, value in enumerate(getattr(self, field)):
            if not low <= value <= high:
                self.fail(f"{field}[{i}]", f"{value} is outside {low}..{high}")

    # --- the serialised form --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "version": self.VERSION,
                "fields": {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls: type[S], data: Any) -> S:
        where = f"{cls.KIND} state"
        if not isinstance(data, dict) or set(data) != {"kind", "version", "fields"}:
            raise StateError(f"{where}: expected an object with kind, version and fields")
        if data["kind"] != cls.KIND:
            raise StateError(f"{where}: this is a {data['kind']!r} state")
        version, fields = data["version"], data["fields"]
        if not isinstance(fields, dict):
            raise StateError(f"{where}: fields must be an object")
        if type(version) is not int or version < 1 or version > cls.VERSION:
            raise StateError(f"{where}: version {version!r} is not supported (this pyvmm reads 1..{cls.VERSION})")
        if version != cls.VERSION:
            fields = cls.upgrade(version, dict(fields))
        hints = _field_types(cls)
        missing, extra = set(hints) - set(fields), set(fields) - set(hints)
        if missing:
            raise StateError(f"{where}: missing field {sorted(missing)[0]}")
        if extra:
            raise StateError(f"{where}: unknown field {sorted(extra)[0]}")
        return cls(**{name: _decode(f"{cls.KIND}.{name}", fields[name], hints[name]) for name in hints})

    @classmethod
    def upgrade(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        """Turn the fields of an older `version` into this version's (none is readable by default)."""
        raise StateError(f"{cls.KIND} state: version {version} is not supported (this pyvmm reads {cls.VERSION})")


_KINDS: dict[str, type[State]] = {}


def require(state: object, cls: type[S]) -> S:
    """`state` if it is a `cls` state; a StateError naming both kinds otherwise (a restore's first line)."""
    if not isinstance(state, cls):
        kind = state.KIND if isinstance(state, State) else type(state).__name__
        raise StateError(f"{cls.KIND} state expected, got a {kind!r} state")
    return state


_FIELD_TYPES: dict[type, dict[str, Any]] = {}  # by State class, computed once


def _field_types(cls: type) -> dict[str, Any]:
    types_ = _FIELD_TYPES.get(cls)
    if types_ is None:
        hints = typing.get_type_hints(cls)
        types_ = _FIELD_TYPES[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return types_


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


@functools.lru_cache(maxsize=None)
def _shape(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    """get_origin and get_args of a field's annotation, once per annotation (a state holds
    thousands of values: decoding a VM's state on a migration's last step is downtime)."""
    return typing.get_origin(annotation), typing.get_args(annotation)


def _check(where: str, value: Any, annotation: Any) -> None:
    """Raise StateError unless `value` is of the (plain) type `annotation`."""
    origin, args = _shape(annotation)
    if annotation is Any:
        return
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check(where, value, arg)
            except StateError:
                continue
        raise StateError(f"{where}: {value!r:.60} is not {_type_name(annotation)}")
    if annotation is type(None):
        ok = value is None
    elif annotation is int:
        ok = type(value) is int
    elif annotation is float:
        ok = type(value) in (int, float)
    elif annotation in (bool, str, bytes):
        ok = type(value) is annotation
    elif isinstance(annotation, type) and issubclass(annotation, State):
        ok = isinstance(value, annotation)
    elif origin is tuple:
        if not isinstance(value, tuple):
            raise StateError(f"{where}: expected a tuple, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            for i, item in enumerate(value):
                _check(f"{where}[{i}]", item, args[0])
        else:
            if len(value) != len(args):
                raise StateError(f"{where}: expected {len(args)} items, got {len(value)}")
            for i, (item, arg) in enumerate(zip(value, args)):
                _check(f"{where}[{i}]", item, arg)
        return
    elif origin is dict:
        if not isinstance(value, dict):
            raise StateError(f"{where}: expected a mapping, got {type(value).__name__}")
        for key, item in value.items():
            _check(f"{where} key", key, args[0])
            _check(f"{where}[{key!r}]", item, args[1])
        return
    else:
        raise TypeError(f"{where}: {annotation!r} is not a type a State field may have")
    if not ok:
        raise StateError(f"{where}: expected {_type_name(annotation)}, got {type(value).__name__} {value!r:.60}")


def _encode(value: Any) -> Any:
    if isinstance(value, State):
        return value.to_dict()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, tuple):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _encode(item) for key, item in value.items()}
    return value


def _decode(where: str, value: Any, annotation: Any) -> Any:
    """The inverse of `_encode`, guided by the field's annotation (type errors are left to _check)."""
    origin, args = _shape(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                decoded = _decode(where, value, arg)
                _check(where, decoded, arg)
                return decoded
            except (StateError, ValueError, TypeError):
                continue
        raise StateError(f"{where}: {value!r:.60} is not {_type_name(annotation)}")
    if annotation is bytes:
        if not isinstance(value, str):
            raise StateError(f"{where}: expected base64 bytes, got {type(value).__name__}")
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise StateError(f"{where}: not valid base64") from None
    if isinstance(annotation, type) and issubclass(annotation, State):
        kind = value.get("kind") if isinstance(value, dict) else None
        actual = annotation if kind == annotation.KIND else _KINDS.get(kind) if isinstance(kind, str) else None
        if actual is None or not issubclass(actual, annotation):
            raise StateError(f"{where}: a {kind!r} state is not a {annotation.KIND} state")
        return actual.from_dict(value)
    if origin is tuple:
        if not isinstance(value, list):
            raise StateError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(f"{where}[{i}]", item, args[0]) for i, item in enumerate(value))
        if len(value) != len(args):
            raise StateError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_decode(f"{where}[{i}]", item, arg) for i, (item, arg) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise StateError(f"{where}: expected an object, got {type(value).__name__}")
        key_type = args[0]
        out = {}
        for key, item in value.items():
            if key_type is int:
                try:
                    key = int(key)
                except ValueError:
                    raise StateError(f"{where}: key {key!r} is not an integer") from None
            out[key] = _decode(f"{where}[{key!r}]", item, args[1])
        return out
    return value
