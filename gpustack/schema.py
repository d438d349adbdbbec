"""Typed, validated step parameters: a frozen dataclass per step, one `param(...)` per TOML key.

No torch here: `gpustack validate` checks a whole params.toml without loading it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any

from gpustack.area import Area
from gpustack.errors import ConfigError

Coerce = Callable[[Any], Any]  # raises ValueError with a short reason


class Invalid(ValueError):
    """A parameter that is wrong given the others (raised by a config's `__post_init__`) or given the data."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def param(default: Any, coerce: Coerce, doc: str, *, required: bool = False) -> Any:
    """A step parameter: its default, how a TOML value becomes a Python value, and one line of documentation."""
    return dataclasses.field(default=default, metadata={"coerce": coerce, "doc": doc, "required": required})


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def integer(lo: int | None = None, hi: int | None = None) -> Coerce:
    def coerce(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_type_name(value)} {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"{value} is out of range [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]")
        return value

    return coerce


def number(lo: float | None = None, hi: float | None = None) -> Coerce:
    def coerce(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {_type_name(value)} {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"{value} is out of range [{lo}, {hi}]")
        return float(value)

    return coerce


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)} {value!r}")
    return value


def choice(*options: str) -> Coerce:
    def coerce(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected one of {', '.join(map(repr, options))}, got {_type_name(value)} {value!r}")
        for option in options:
            if value.lower() == option.lower():
                return option
        raise ValueError(f"{value!r} is not one of {', '.join(map(repr, options))}")

    return coerce


def int_list(length: int | None = None, lo: int | None = None) -> Coerce:
    item = integer(lo)

    def coerce(value: Any) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list of integers, got {_type_name(value)} {value!r}")
        if length is not None and len(value) != length:
            raise ValueError(f"expected {length} integers, got {len(value)}")
        return tuple(item(v) for v in value)

    return coerce


def area(value: Any) -> Area:
    xmin, xmax, ymin, ymax = int_list(4, lo=0)(value)
    if xmin >= xmax or ymin >= ymax:
        raise ValueError(f"[xmin, xmax, ymin, ymax] = {list(value)} needs xmin < xmax and ymin < ymax")
    return Area(xmin, xmax, ymin, ymax)


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)} {value!r}")
    return value


def number_pair(value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"expected [low, high], got {_type_name(value)} {value!r}")
    lo, hi = (number()(v) for v in value)
    if not lo < hi:
        raise ValueError(f"{list(value)} needs low < high")
    return lo, hi


def optional(coerce: Coerce) -> Coerce:
    """None, or '' as PyStack3D's writer and GUI store it, means 'not set'."""

    def wrapped(value: Any) -> Any:
        return None if value is None or value == "" else coerce(value)

    return wrapped


def build(cls: type, table: Mapping[str, Any], *, file: str | None, name: str) -> Any:
    """Make `cls` (a dataclass of `param`s) from a TOML table; every problem is a ConfigError naming the key."""
    fields = {f.name: f for f in dataclasses.fields(cls) if "coerce" in f.metadata}
    unknown = [key for key in table if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields) or 'none'}"
        raise ConfigError(f"unknown key{hint}", file=file, table=name, key=key)
    values = {}
    for key, f in fields.items():
        if key not in table:
            if f.metadata["required"]:
                raise ConfigError(f"missing required key ({f.metadata['doc']})", file=file, table=name, key=key)
            continue
        try:
            values[key] = f.metadata["coerce"](table[key])
        except ValueError as exc:
            raise ConfigError(str(exc), file=file, table=name, key=key) from None
    try:
        return cls(**values)
    except Invalid as exc:  # checks across keys, e.g. threshold_min < threshold_max
        raise ConfigError(str(exc), file=file, table=name, key=exc.key) from None


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """(key, default, doc) of each parameter, for the template and the README."""
    return [(f.name, f.default, f.metadata["doc"]) for f in dataclasses.fields(cls) if "coerce" in f.metadata]


def to_jsonable(config: Any) -> dict[str, Any]:
    """A config as plain JSON values (for fingerprints and the manifest)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return plain(dataclasses.asdict(v))
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
