"""Dataclass configs that round-trip to YAML and accept dotted CLI overrides.

Every config in kdcache is a ``@dataclass`` that inherits :class:`ConfigBase`:

* ``Cfg.from_dict(d)`` builds it strictly (an unknown key is an error naming the
  dotted path, e.g. ``aug.mixup_alfa``); nested dataclass fields are built recursively,
  tuples are restored from YAML lists.
* ``cfg.to_dict()`` gives plain Python values, so ``from_dict(to_dict(c)) == c``.
* Validation lives in each class's ``__post_init__`` and raises :class:`ConfigError`
  naming the field (use :func:`check`).
* :func:`load_config` reads a YAML file and applies overrides such as
  ``aug.mixup_alpha=0.0``. An override sets the value at its dotted path: a mapping value
  (``model.model_kwargs={}``) replaces the whole mapping, ``model.model_kwargs.depth=2`` one key.
* Values are read as YAML 1.2 numbers, so ``5e-4`` and ``1e-3`` are floats (YAML 1.1, PyYAML's
  default, would read them as strings), in files and overrides alike.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T", bound="ConfigBase")


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the field."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats: ``5e-4`` is a number, as users write learning rates."""


# YAML 1.1 needs a dot in the mantissa and a sign in the exponent (``5.0e-4``); 1.2 does not.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text with :class:`_Loader` (safe; YAML 1.2 floats)."""
    return yaml.load(text, Loader=_Loader)


def check(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError(``field: message``) unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def resolve_callable(spec: str) -> Any:
    """The object a ``"module:function"`` config value names (``teacher.callable``, a student's
    ``model.name``), imported on demand.

    Raises:
        ImportError, AttributeError: the module, or the name in it, is missing.
    """
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


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
        raise ConfigError(f"{path}: expected {_describe(tp)}, found {value!r}")
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


_NAMES = {float: "a number", int: "an integer", bool: "true/false", str: "a string", dict: "a mapping",
          type(None): "null"}


def _describe(tp: Any) -> str:
    """``float | None`` -> 'a number or null' (for error messages)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if _is_config(tp):
        return f"a mapping ({tp.__name__})"
    if typing.get_origin(tp) in (tuple, list):
        return "a list"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


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


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Set each ``key.sub=value`` of ``overrides``, in order, on a copy of ``data``.

    The value (parsed as YAML) replaces what is at the dotted path, mappings included:
    ``model.model_kwargs={}`` empties the mapping, ``model.model_kwargs.depth=2`` sets one key.
    """
    out = _copy_tree(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e.problem})") from None
        node = out
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent, or a section written as `aug: null`
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is {node!r}, not a section")
        node[parts[-1]] = value
    return out


def _copy_tree(data: dict) -> dict:
    return {k: _copy_tree(v) if isinstance(v, dict) else v for k, v in data.items()}


def parse_overrides(overrides: Sequence[str]) -> dict:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into ``{"a": {"b": 1}, "c": [1, 2]}``."""
    return apply_overrides({}, overrides)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) plus dotted overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    return cls.from_dict(apply_overrides(data, overrides))
