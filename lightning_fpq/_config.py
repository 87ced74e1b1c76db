"""Shared parsing and validation of user input: block sizes, choices, numbers, patterns, and
mappings (YAML, dicts, ``key=value`` overrides) checked against a dataclass.

Every error is one ``ValueError`` line that names the offending key or argument, its value, and
what would be valid: callers pass ``what`` (the name the user wrote) and never re-word it.
This module imports neither torch nor Lightning.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Optional, TypeVar, Union

BlockSize = Union[int, str, None]
"""Elements that share one scale: an int >= 1, ``"channel"`` (one scale per row of the
reduction), ``"tensor"`` (one scale) or ``None`` (no scaling)."""

BLOCK_WORDS = ("channel", "tensor")
NO_SCALING = "none"
"""How "no scaling" is written in text and YAML (``None`` in Python)."""

T = TypeVar("T")


# ------------------------------------------------------------------------ block sizes
def block_size(value: Any, *, what: str = "block_size", allow_none: bool = True) -> BlockSize:
    """A user's block size in its one Python form: an int >= 1, "channel", "tensor", or ``None``
    for no scaling (written ``None`` or "none"; refused when ``allow_none`` is False).
    Digit strings ("128", from CSV cells and the command line) and whole floats (128.0) are ints."""
    valid = (
        "None, a positive int, 'channel' or 'tensor' ('none': no scaling)"
        if allow_none
        else "an int >= 1, 'channel' or 'tensor'"
    )
    if value is None or (isinstance(value, str) and value.strip().lower() == NO_SCALING):
        if allow_none:
            return None
        raise ValueError(f"{what}={value!r} is not valid: expected {valid}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in BLOCK_WORDS:
            return text
        try:
            number = float(text)  # "128" and "128.0" (CSV cells, the command line)
        except ValueError:
            number = math.nan
        if number.is_integer() and number >= 1:
            return int(number)
    elif isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value)
    elif _is_int(value) and value >= 1:
        return int(value)
    raise ValueError(f"{what}={value!r} is not valid: expected {valid}")


def block_size_text(value: BlockSize) -> str:
    """The block size as printed and written to YAML/CSV: "128", "channel", "tensor", "none"."""
    return NO_SCALING if value is None else str(value)


def block_size_yaml(value: BlockSize) -> Union[int, str]:
    """The block size as a YAML value: ints stay ints, no scaling is "none"."""
    return NO_SCALING if value is None else value


# --------------------------------------------------------------------- scalar checks
def _is_int(value: Any) -> bool:
    """Python and numpy integers, not bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def choice(value: Any, choices: Iterable[str], *, what: str) -> str:
    """``value`` lower-cased when it is one of ``choices`` (case-insensitive), else ValueError."""
    choices = tuple(choices)
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise ValueError(f"{what}={value!r} is not valid: expected one of {choices}")
    return value.strip().lower()


def flag(value: Any, *, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what}={value!r} is not valid: expected true or false")
    return value


def number(
    value: Any,
    *,
    what: str,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in the interval (``low_open``/``high_open`` exclude the ends)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{what}={value!r} is not valid: expected a finite number in {interval}")
    return float(value)


def integer(value: Any, *, what: str, low: int = 1, optional: bool = False) -> Optional[int]:
    """An int >= ``low`` (``None`` too when ``optional``)."""
    if value is None and optional:
        return None
    if not _is_int(value) or value < low:
        raise ValueError(f"{what}={value!r} is not valid: expected {'None or ' if optional else ''}an int >= {low}")
    return int(value)


def patterns(value: Any, *, what: str) -> tuple[str, ...]:
    """fnmatch patterns: one string or a list of non-empty strings."""
    if isinstance(value, str):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{what}={value!r} is not valid: expected a list of fnmatch patterns") from None
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{what} holds {item!r}: expected non-empty fnmatch pattern strings")
    return items


# ------------------------------------------------------------------ dataclass mappings
def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def check_keys(data: Mapping[str, Any], cls: type, *, what: str) -> None:
    """Refuse keys that are not fields of the dataclass ``cls``, naming the valid ones."""
    unknown = sorted(set(data) - set(field_names(cls)))
    if unknown:
        key = unknown[0]
        raise ValueError(f"unknown key {f'{what}.{key}'!r}: {key!r} is not one of the valid keys {field_names(cls)}")


def _dataclass_in(annotation: Any) -> Optional[type]:
    """The dataclass named by a field's type (``X``, ``Optional[X]``), if any."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    found = [a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a)]
    return found[0] if len(found) == 1 else None


def from_mapping(cls: type[T], data: Any, *, what: str) -> T:
    """Build the frozen dataclass ``cls`` from a mapping (a parsed YAML document or a dict).

    Walks ``cls``'s fields: unknown keys are refused with the valid ones; a field whose type is
    a dataclass is built from its nested mapping the same way; every value is then checked by
    ``cls.__post_init__`` (the one validator), whose error is prefixed with ``what``.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{what}={data!r} is not valid: expected a mapping with keys {field_names(cls)}")
    check_keys(data, cls, what=what)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        nested = _dataclass_in(hints[key])
        if nested is not None and isinstance(value, Mapping):
            value = from_mapping(nested, value, what=f"{what}.{key}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValueError as err:
        message = str(err)
        raise ValueError(message if message.startswith(what) else f"{what}: {message}") from None


# ---------------------------------------------------------------------- YAML / OmegaConf
def read_yaml(source: Union[str, os.PathLike], *, what: str) -> Any:
    """A YAML file (or YAML text holding a newline) as plain Python containers."""
    from omegaconf import OmegaConf

    if isinstance(source, str) and "\n" in source:
        data = OmegaConf.create(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"{what} {path!r} does not exist")
        data = OmegaConf.load(path)
    return OmegaConf.to_container(data, resolve=True)


def omegaconf_message(err: Exception) -> str:
    """OmegaConf's first line plus the full key it names (its messages carry it on a later line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    head = lines[0] if lines else type(err).__name__
    key = str(getattr(err, "full_key", None) or "") or next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), ""
    )
    if key and key not in head:
        head = f"{head} (key: {key})"
    return head


def load_structured(schema: type[T], source: Any = None, overrides: Iterable[str] = (), *, what: str) -> T:
    """Defaults of the dataclass ``schema``, then ``source`` (a YAML path, a dict or an instance),
    then ``key=value`` overrides (OmegaConf dot-list). Unknown keys and values of the wrong type
    raise one ``ValueError`` naming the key and the valid top-level keys."""
    from omegaconf import OmegaConf

    try:
        merged = OmegaConf.structured(schema)
        if source is not None:
            if isinstance(source, schema):
                data = OmegaConf.structured(source)
            elif isinstance(source, Mapping):
                data = OmegaConf.create(dict(source))
            else:
                path = os.fspath(source)
                if not os.path.isfile(path):
                    raise ValueError(f"{what} {path!r} does not exist")
                data = OmegaConf.load(path)
            merged = OmegaConf.merge(merged, data)
        overrides = list(overrides)
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ValueError:
        raise
    except Exception as err:  # OmegaConf's ConfigKeyError / ValidationError: it names the key
        raise ValueError(
            f"{what}: {omegaconf_message(err)} (valid top-level keys: {sorted(field_names(schema))})"
        ) from None
