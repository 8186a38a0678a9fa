"""Frozen dataclasses from their JSON objects, by field name and type (torch-free).

`from_fields(Plan, data)` and `from_fields(Profile, data)` read what `dataclasses.asdict` wrote:
nested dataclasses come from objects, tuples from lists, and the integer keys of `Mapping[int, ...]`
fields from the strings JSON turned them into. Values are passed on as they are, so each class's
`__post_init__` stays the one place that checks them.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class MissingField(KeyError):
    """A required field is absent; `args[0]` is its name."""


def from_fields(cls: type[T], data: Any) -> T:
    """An instance of dataclass `cls` built from the mapping `data`.

    Missing fields with a default take it. Raises MissingField naming a required field that is absent,
    TypeError for an unknown field or a value of the wrong shape (a number where an object or a list belongs).
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"{cls.__name__} is a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TypeError(f"unknown field(s) {unknown} of {cls.__name__}")
    hints = get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], data[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise MissingField(name)
    return cls(**kwargs)


def convert(tp: Any, value: Any) -> Any:
    """`value`, read from JSON, in the shape of the annotation `tp` (see the module docstring)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_fields(tp, value)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        return convert(next(a for a in get_args(tp) if a is not type(None)), value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v) for v in value)
        if len(args) != len(value):
            raise TypeError(f"expected a list of {len(args)} items, got {value!r}")
        return tuple(convert(a, v) for a, v in zip(args, value))
    if origin in (Mapping, dict):
        key_type, value_type = get_args(tp)
        if not isinstance(value, Mapping):
            raise TypeError(f"expected an object, got {value!r}")
        return {int(k) if key_type is int else k: convert(value_type, v) for k, v in value.items()}
    return value

