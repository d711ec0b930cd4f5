"""Typed parsing of nested dicts into dataclasses, and dotted `key=value` overrides (used by recipes).

Values are checked against the dataclass annotations (`int`, `float`, `bool`, `str`, `Literal`, unions
with `None`, `list[...]`, fixed `tuple[...]`, `dict[str, Any]`); unknown keys fail with the closest
known key. Override values are parsed as YAML (`3`, `1e-4`, `[9, 15]`, `null`, `true`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Literal, Union

import yaml

__all__ = ["RecipeError", "apply_dotted_overrides", "build_dataclass", "coerce_value"]


class RecipeError(ValueError):
    """A recipe file, key or value is invalid; the message names it."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce_value(key: str, value: Any, tp: Any) -> Any:
    """Return `value` checked against the annotation `tp` (ints widen to floats, lists to tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return coerce_value(key, value, option)
            except RecipeError:
                continue
        raise RecipeError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise RecipeError(f"{key}: expected one of {list(args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{key}: expected a string, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise RecipeError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(
                coerce_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        items = [coerce_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise RecipeError(f"{key}: unsupported annotation {tp!r}")  # pragma: no cover - recipe bug


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, known: list[str]) -> RecipeError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RecipeError(f"unknown recipe key {key!r}{hint}; known keys here: {sorted(known)}")


def build_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a nested dict, checking keys and value types."""
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix or 'recipe'}: expected a mapping, got {data!r}")
    fields = _fields(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(key, list(fields))
        tp = fields[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, value if value is not None else {}, f"{key}.")
        else:
            kwargs[name] = coerce_value(key, value, tp)
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------ overrides
def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like key=value (e.g. train.epochs=3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"override {key}: cannot parse value {raw!r}: {err}") from None
    return key, value


def apply_dotted_overrides(root: type, data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings (values parsed as YAML) to a nested dict for dataclass `root`,
    returning a copy.

    Keys are checked against the recipe schema (dict-typed fields such as `model.grm` accept new keys),
    so a typo fails with the closest known key.
    """
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, value = _parse_override(item)
        parts = key.split(".")
        cls: Any = root
        node = data
        for depth, part in enumerate(parts[:-1]):
            if cls is not None:
                fields = _fields(cls)
                if part not in fields:
                    raise _unknown_key(".".join(parts[: depth + 1]), list(fields))
                cls = fields[part] if dataclasses.is_dataclass(fields[part]) else None
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {key}: {'.'.join(parts[: depth + 1])} is not a mapping")
            node = child
        if cls is not None:
            fields = _fields(cls)
            if parts[-1] not in fields:
                raise _unknown_key(key, list(fields))
            if dataclasses.is_dataclass(fields[parts[-1]]):
                raise RecipeError(f"override {key}: is a section; set one of its keys, e.g. {key}.<key>=...")
        node[parts[-1]] = value
    return data
