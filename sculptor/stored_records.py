"""Reading stored JSON back through its type: a record that does not fit is refused, never passed on as a dict.

Every record kept in Redis (tasks, jobs, versions, the subspace registry's records) is written from a typed
record and read back through the same type: `parse` for pydantic models, `parse_dataclass` for the plain
dataclasses of the subspace registry (worker/osft imports those where only torch is installed:
bench/gpu_check.py, so this module imports no pydantic). A record that does not fit (hand-edited, written by
a broken release, truncated) raises `CorruptRecord`, naming the key and the fields that are wrong.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class CorruptRecord(ValueError):
    """A stored record that does not validate against its type."""

    code = "corrupt_record"

    def __init__(self, key: str, kind: str, problems: list[str]):
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        super().__init__(f"the stored record {key} is not a valid {kind}: {'; '.join(problems[:5])}{more}")
        self.key, self.problems = key, problems


def parse(model: type[T], raw: str | bytes, key: str) -> T:
    """`raw` (JSON stored under `key`) validated as the pydantic `model`; CorruptRecord when it does not fit."""
    from pydantic import ValidationError

    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise CorruptRecord(key, model.__name__, [
            f"{'.'.join(str(p) for p in e['loc']) or '(record)'}: {e['msg']}" for e in err.errors()]) from None


def parse_dataclass(cls: type[T], raw: str | bytes, key: str) -> T:
    """`raw` (JSON stored under `key`) as the dataclass `cls`, every field's type checked."""
    try:
        return from_dict(cls, json.loads(raw))
    except json.JSONDecodeError as err:
        raise CorruptRecord(key, cls.__name__, [f"(record): not JSON ({err})"]) from None
    except Invalid as err:
        raise CorruptRecord(key, cls.__name__, [str(err)]) from None


class Invalid(ValueError):
    """A value that does not fit its declared type; says where (`a.b.c: ...`)."""


def from_dict(cls: type[T], obj: Any, where: str = "") -> T:
    """The dataclass `cls` from JSON-like `obj`, every field's type checked (Invalid otherwise). Keys that
    `cls` does not declare are ignored; a field left out takes its default, if it has one."""
    if dataclasses.is_dataclass(obj) and isinstance(obj, cls):
        return obj
    if not isinstance(obj, dict):
        raise Invalid(f"{where or '(record)'}: expected an object, got {type(obj).__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        name = f"{where}.{field.name}" if where else field.name
        if field.name in obj:
            values[field.name] = _load(hints[field.name], obj[field.name], name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise Invalid(f"{name}: field required")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # e.g. OSFTConfig's own range checks
        raise Invalid(f"{where or '(record)'}: {err}") from None


def _load(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        first = None
        for option in (a for a in args if a is not type(None)):
            try:
                return _load(option, value, where)
            except Invalid as err:
                first = first or err
        raise first or Invalid(f"{where}: must not be null")
    if origin is Literal:
        if value in args:
            return value
        raise Invalid(f"{where}: expected one of {list(args)}, got {value!r}")
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise Invalid(f"{where}: expected a list, got {type(value).__name__}")
        return [_load(args[0] if args else Any, v, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise Invalid(f"{where}: expected an object, got {type(value).__name__}")
        inner = args[1] if args else Any
        return {k: _load(inner, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{where}: no check for {tp!r}")
    raise Invalid(f"{where}: expected {tp.__name__}, got {value!r}")
