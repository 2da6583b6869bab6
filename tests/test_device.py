"""CUDA decisions tested on CPU, the simulated accelerator, and GPU checks (marked ``gpu``)."""
from __future__ import annotations

import time

import pytest
import torch

from teacher import device as D
from teacher.model import TeacherConfig, build_teacher
from bench.simulated import SleepingNet

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_autocast_dtype():
    assert D.autocast_dtype("auto", CUDA) is torch.bfloat16
    assert D.autocast_dtype("bf16", "cuda:1") is torch.bfloat16
    assert D.autocast_dtype("fp16", CUDA) is torch.float16
    assert D.autocast_dtype("none", CUDA) is None
    for amp in D.AMP_MODES:
        assert D.autocast_dtype(amp, CPU) is None  # the teacher runs fp32 on CPU whatever amp says
    with pytest.raises(ValueError, match="amp"):
        D.autocast_dtype("bfloat16", CUDA)


def test_copies_pinning_backend_channels_last():
    assert D.pin_memory(CUDA) and D.non_blocking("cuda:0") and D.ddp_backend(CUDA) == "nccl"
    assert not D.pin_memory(CPU) and not D.non_blocking("cpu") and D.ddp_backend("cpu") == "gloo"
    assert D.channels_last(True, torch.zeros(2, 3, 8, 8))
    assert not D.channels_last(False, torch.zeros(2, 3, 8, 8)) and not D.channels_last(True, torch.zeros(3, 8))


def test_actor_plan():
    gpu_node = {"CPU": 32.0, "GPU": 4.0}
    assert D.actor_plan(gpu_node, 0, 8) == (4, {"num_gpus": 1, "num_cpus": 1})
    assert D.actor_plan(gpu_node, 2, 8, "ray") == (2, {"num_gpus": 1, "num_cpus": 1})
    assert D.actor_plan({"CPU": 8.0}, 0, 3) == (2, {"num_cpus": 1})  # 1 + 3 workers each
    assert D.actor_plan({"CPU": 8.0}, 0, 3, "ray") == (4, {"num_cpus": 1})
    assert D.actor_plan({"CPU": 2.0}, 0, 4) == (1, {"num_cpus": 1})


def test_simulated_teacher_is_deterministic_and_takes_its_time():
    cfg = TeacherConfig(callable="bench.simulated:sleeping_net", num_classes=7, input_size=16, amp="none",
                        channels_last=False, model_kwargs={"images_per_s": 100.0, "num_classes": 7})
    teacher = build_teacher(cfg, k=3)
    assert teacher.checkpoint_sha256 == "callable:bench.simulated:sleeping_net"
    x = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    a = teacher.score(x)
    assert time.perf_counter() - start >= 10 / 100.0  # a lower bound: the forward sleeps batch / rate
    b = build_teacher(cfg, k=3).score(x)
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
    c = teacher.score(x.flip(-1).roll(3, -2))
    assert not torch.equal(a.values, c.values)  # the pixels matter
    with pytest.raises(ValueError, match="images_per_s"):
        SleepingNet(images_per_s=0)


def test_simulated_timeline_gives_the_step_rate(tmp_path):
    from bench.simulated import sleeping_net, steady_rate

    timeline = tmp_path / "t.txt"
    net = sleeping_net(num_classes=3, images_per_s=400.0, timeline=str(timeline))
    for _ in range(5):
        net(torch.zeros(8, 3, 8, 8))
    assert len(timeline.read_text().splitlines()) == 5
    assert 0 < steady_rate(str(timeline), skip=1) <= 400.0  # sleeping makes it at most the set rate
    with pytest.raises(ValueError, match="need at least"):
        steady_rate(str(timeline), skip=4)


def test_simulated_student_trains_through_build_student():
    from student.models import build_student

    model = build_student("bench.simulated:sleeping_net", 5, 32, 0.1, {"images_per_s": 1000.0})
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    before = model.head.weight.detach().clone()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(before, model.head.weight)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_teacher_bf16_on_cuda_agrees_with_fp32():
    import timm  # noqa: F401

    torch.manual_seed(0)
    cfg = TeacherConfig(name="regnety_002", num_classes=10, input_size=64, amp="auto")
    fp32 = build_teacher(cfg.replace(amp="none"), device="cuda", k=5)
    bf16 = build_teacher(cfg, device="cuda", k=5)
    bf16.module.load_state_dict(fp32.module.state_dict())
    x = torch.randn(32, 3, 64, 64).pin_memory()
    a, b = fp32.score(x), bf16.score(x)
    assert a.values.dtype == b.values.dtype == torch.float32
    assert (a.indices[:, 0] == b.indices[:, 0]).float().mean() >= 0.9


@pytest.mark.gpu
def test_feed_batches_are_pinned_for_a_cuda_teacher(fmnist_shards, tmp_path):
    from teacher.feed import ItemFeed
    from teacher.job import CacheJobConfig
    from pipeline.manifest import load_manifest

    cfg = CacheJobConfig.from_dict(dict(shards=str(fmnist_shards / "train"), out=str(tmp_path / "c.zarr"),
                                        views=2, k=5, batch_size=32, num_workers=1,
                                        teacher=dict(name="regnety_002", num_classes=10, input_size=32)))
    feed = ItemFeed(cfg, load_manifest(cfg.shards), 32, pin=D.pin_memory("cuda"))
    try:
        batch = next(iter(feed.batches(0, 0, [], set())))
        assert batch.images.is_pinned()
        on_gpu = batch.images.to("cuda", non_blocking=D.non_blocking("cuda"))
        torch.cuda.synchronize()
        assert torch.equal(on_gpu.cpu(), batch.images)
    finally:
        feed.close()
