"""Dataclass configs that round-trip to YAML and accept dotted CLI overrides.

Every config in kdcache is a ``@dataclass`` that inherits :class:`ConfigBase`:

* ``Cfg.from_dict(d)`` builds it strictly (an unknown key is an error naming the
  dotted path, e.g. ``aug.mixup_alfa``); nested dataclass fields are built recursively,
  tuples are restored from YAML lists.
* ``cfg.to_dict()`` gives plain Python values, so ``from_dict(to_dict(c)) == c``.
* Validation lives in each class's ``__post_init__`` and raises :class:`ConfigError`
  naming the field (use :func:`check`).
* :func:`load_config` reads a YAML file and applies overrides such as
  ``aug.mixup_alpha=0.0`` (values are parsed as YAML scalars/lists).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T", bound="ConfigBase")


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the field."""


def check(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError(``field: message``) unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, ConfigBase)


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Coerce a YAML value to the annotated type ``tp`` (dataclass, tuple, optional)."""
    origin = typing.get_origin(tp)
    if _is_config(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, found {value!r}")
        return tp.from_dict(value, _path=path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except (ConfigError, TypeError, ValueError):
                continue
        raise ConfigError(f"{path}: {value!r} does not match {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, found {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} values, found {len(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))) if args else tuple(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, found {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_convert(arg, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, found {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, found {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, found {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, found {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, found {value!r}")
        return value
    return value


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class ConfigBase:
    """Mixin for ``@dataclass`` configs: strict ``from_dict``, ``to_dict``, YAML I/O."""

    @classmethod
    def from_dict(cls: type[T], data: dict | None, _path: str = "") -> T:
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            where = f"{_path}." if _path else ""
            raise ConfigError(
                f"unknown config key {where}{unknown[0]!s} (known: {', '.join(sorted(names))})"
            )
        kwargs = {}
        for name in names:
            if name in data:
                kwargs[name] = _convert(hints[name], data[name], f"{_path}.{name}" if _path else name)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return _plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)


def parse_overrides(overrides: Sequence[str]) -> dict:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into ``{"a": {"b": 1}, "c": [1, 2]}``."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is already set to a value")
        node[parts[-1]] = value
    return tree


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) plus dotted overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    return cls.from_dict(merge(data, parse_overrides(overrides)))
