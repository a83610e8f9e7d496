"""Checking plain data (parsed YAML, command-line values) against typed dataclasses.

Shared by the recipe config (:mod:`asr_parallel.config`) and the strategy registry
(:mod:`asr_parallel.strategies`), which both build typed dataclasses from user input; it imports
nothing of the project, so neither depends on the other through it.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A recipe config has an unknown key, a value of the wrong type, or an invalid value."""



def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp)
        return f"list of {type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against type ``tp``; return it (ints are accepted where floats are)."""

    def fail() -> typing.NoReturn:
        raise ConfigError(
            f"{source}: key '{key}' expects {type_name(tp)}, got {type(value).__name__} {value!r}"
        )

    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return build(tp, value, source, prefix=key + ".")
    if origin is Literal:
        if value not in get_args(tp):
            fail()
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return coerce(value, option, key, source)
            except ConfigError:
                continue
        fail()
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, list):
            fail()
        return [coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            fail()
        return None
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        if isinstance(value, str) and FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads exponents without a dot (1e9) as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    if tp is Any:
        return value
    if tp is dict:
        if not isinstance(value, dict):
            fail()
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def public_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def build(cls: type, data: dict, source: str, prefix: str = "") -> Any:
    fields = public_fields(cls)
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}'"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {name: coerce(value, hints[name], prefix + name, source) for name, value in data.items()}
    return cls(**kwargs)
