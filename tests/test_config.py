"""Config machinery: YAML round trip, dotted overrides, errors that name the field."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pipeline.config import ConfigBase, ConfigError, check, load_config, parse_overrides


@dataclass
class Inner(ConfigBase):
    alpha: float = 0.8
    size: tuple[int, int] = (3, 4)
    name: str | None = None

    def __post_init__(self):
        check(self.alpha >= 0, "alpha", f"must be >= 0, found {self.alpha}")


@dataclass
class Outer(ConfigBase):
    epochs: int = 2
    inner: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)


def test_round_trip_through_yaml(tmp_path):
    cfg = Outer(epochs=5, inner=Inner(alpha=0.1, size=(7, 8), name="x"), extra={"a": 1})
    path = tmp_path / "c.yaml"
    cfg.save(path)
    assert load_config(Outer, path) == cfg
    assert Outer.from_dict(cfg.to_dict()) == cfg


def test_dotted_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    Outer().save(path)
    cfg = load_config(Outer, path, ["inner.alpha=0.0", "epochs=9", "inner.size=[1, 2]", "inner.name=null"])
    assert cfg.inner.alpha == 0.0 and cfg.epochs == 9 and cfg.inner.size == (1, 2) and cfg.inner.name is None
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_unknown_key_names_the_dotted_path():
    with pytest.raises(ConfigError, match=r"inner\.alfa"):
        Outer.from_dict({"inner": {"alfa": 1.0}})


def test_validation_names_the_field():
    with pytest.raises(ConfigError, match="alpha"):
        load_config(Outer, None, ["inner.alpha=-1"])


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match="epochs"):
        Outer.from_dict({"epochs": "many"})
    with pytest.raises(ConfigError, match="override"):
        parse_overrides(["epochs"])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
