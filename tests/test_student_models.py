"""Student models as users configure them: a convnet override of a ViT config (refused naming the
key, then working once the kwargs are replaced), and model.checkpoint loading strictly (a file made
for another model is refused naming keys; a right one says what it loaded and resized).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from student.checkpoint import CheckpointError, save_checkpoint
from student.config import TrainConfig
from student.models import build_student
from teacher.model import TeacherConfig, create_model

REPO = Path(__file__).resolve().parents[1]
VIT_CONFIG = REPO / "configs" / "student" / "fmnist_hard.yaml"   # model_kwargs: patch_size, embed_dim, ...
TINY = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
DEIT = "deit_tiny_distilled_patch16_224"


def _build(cfg: TrainConfig, **kw) -> torch.nn.Module:
    m = cfg.model
    return build_student(m.name, 10, cfg.data.img_size, m.drop_path_rate, m.model_kwargs, m.checkpoint, **kw)


def test_convnet_override_of_a_vit_config():
    cfg = load_config(TrainConfig, VIT_CONFIG, ["model.name=resnet10t"])
    assert cfg.model.model_kwargs["patch_size"] == 4           # the ViT kwargs came along
    with pytest.raises(ConfigError) as err:
        _build(cfg)
    msg = str(err.value)
    assert msg.startswith("model.model_kwargs.patch_size: resnet10t does not take 'patch_size'"), msg
    assert "model.model_kwargs={}" in msg
    cfg = load_config(TrainConfig, VIT_CONFIG, ["model.name=resnet10t", "model.model_kwargs={}"])
    assert cfg.model.model_kwargs == {}
    model = _build(cfg).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match=r"model\.name: 'resnet_10t' is not a timm model name"):
        _build(load_config(TrainConfig, VIT_CONFIG, ["model.name=resnet_10t", "model.model_kwargs={}"]))


def test_a_teacher_file_is_refused_as_a_student_checkpoint(tmp_path):
    """The reported case: a student pointed at the RegNetY teacher file loaded nothing, silently."""
    torch.manual_seed(0)
    teacher = create_model(TeacherConfig(name="regnety_002", num_classes=10, input_size=32, stem_stride=1))
    path = tmp_path / "teacher.pt"
    torch.save({"model": teacher.state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        build_student(DEIT, 10, 32, 0.0, TINY, checkpoint=str(path))
    msg = str(err.value)
    assert f"{path} does not fit VisionTransformerDistilled" in msg
    assert "35 missing keys (cls_token, pos_embed, dist_token" in msg and "318 unexpected keys (stem.conv.weight" in msg


@pytest.mark.parametrize("change, needle", [
    ({"name": "deit_tiny_patch16_224"}, "missing keys (dist_token"),           # no dist token in the file
    ({"model_kwargs": {**TINY, "depth": 1}}, "unexpected keys (blocks.1."),     # one block fewer here
    ({"model_kwargs": {**TINY, "embed_dim": 64, "num_heads": 4}}, "shape mismatches (cls_token"),
])
def test_another_student_file_is_refused_naming_keys(tmp_path, change, needle):
    src = build_student(change.get("name", DEIT), 10, 32, 0.0, TINY)
    save_checkpoint(tmp_path / "c.pt", model=src)
    kwargs = change.get("model_kwargs", TINY)
    with pytest.raises(CheckpointError) as err:
        build_student(DEIT, 10, 32, 0.0, kwargs, checkpoint=str(tmp_path / "c.pt"))
    assert needle in str(err.value), str(err.value)


def test_right_checkpoint_reports_loaded_resized_reinitialised(tmp_path):
    torch.manual_seed(0)
    small = build_student(DEIT, 10, 32, 0.0, TINY)                 # 8x8 patch grid
    save_checkpoint(tmp_path / "c.pt", model=small, epoch=3)       # a full training checkpoint
    lines: list[str] = []
    big = build_student(DEIT, 5, 48, 0.0, TINY, checkpoint=str(tmp_path / "c.pt"), log=lines.append)
    (line,) = lines
    n = len(small.state_dict()) - 4                                 # head + head_dist weight/bias re-initialised
    assert line.startswith(f"model.checkpoint {tmp_path / 'c.pt'}: loaded {n} tensors into {DEIT}"), line
    assert "resized pos_embed (1, 66, 32) -> (1, 146, 32)" in line
    assert "re-initialised head.weight, head.bias, head_dist.weight, head_dist.bias (another class count)" in line
    torch.testing.assert_close(big.blocks[1].mlp.fc2.weight, small.blocks[1].mlp.fc2.weight)
    assert big.head.out_features == 5
