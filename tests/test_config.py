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


def test_numbers_parse_as_users_write_them(tmp_path):
    """5e-4 / 1e-3 are floats (YAML 1.1 reads them as strings) in files, overrides and mappings."""
    from student.config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("data: {train: x, seed: 0, aug: {}}\noptim: {lr: 5e-4, min_lr: 1E-6}\n"
                    "model: {model_kwargs: {layer_scale_init_value: 1e-5}}\n")
    cfg = load_config(TrainConfig, path, ["loss.mode=none", "optim.warmup_lr=1e-7"])
    assert cfg.optim.lr == 5e-4 and cfg.optim.min_lr == 1e-6 and cfg.optim.warmup_lr == 1e-7
    assert cfg.model.model_kwargs == {"layer_scale_init_value": 1e-5}
    assert load_config(TrainConfig, path, ["loss.mode=none", "optim.lr=2.5E+3"]).optim.lr == 2500.0
    assert parse_overrides(["a=1e", "b=10", "c=v1e3"]) == {"a": "1e", "b": 10, "c": "v1e3"}  # not numbers
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number or null, found 'fast'"):
        load_config(TrainConfig, path, ["loss.mode=none", "optim.lr=fast"])


def test_override_sets_the_value_at_its_path(tmp_path):
    """A mapping value replaces the mapping (a dict can be cleared); a dotted key sets one entry."""
    path = tmp_path / "c.yaml"
    Outer(extra={"patch_size": 4, "depth": 2}).save(path)
    assert load_config(Outer, path, ["extra={}"]).extra == {}
    assert load_config(Outer, path, ["extra={depth: 3}"]).extra == {"depth": 3}
    assert load_config(Outer, path, ["extra.depth=3"]).extra == {"patch_size": 4, "depth": 3}
    assert load_config(Outer, path, ["extra={}", "extra.a=1"]).extra == {"a": 1}   # in order
    path.write_text("inner: null\n")                       # a section written as null
    assert load_config(Outer, path, ["inner.alpha=0.5"]).inner == Inner(alpha=0.5)
    with pytest.raises(ConfigError, match=r"epochs is 2, not a section"):
        load_config(Outer, None, ["epochs=2", "epochs.x=1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, None, ["extra={a: [}"])
