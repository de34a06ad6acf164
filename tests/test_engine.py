"""The streaming engine: several compute workers (one per device) finishing out of order must
still produce byte-identical files; a failing stage must stop the pipeline, not hang it."""

from __future__ import annotations

import random
import time

import pytest
import torch

from conftest import adapter_dir, base_dir, requires_cuda
from loramerge import engine
from loramerge.engine import pipeline
from loramerge.readers.adapters import load_adapters
from loramerge.errors import NumericsError
from loramerge.plan import build_plan
from loramerge.readers.checkpoint import open_checkpoint


def _run(tmp_path, name, devices, base="llama-bf16-sharded", adapter="llama-bf16"):
    ck = open_checkpoint(base_dir(base))
    adapters = load_adapters([adapter_dir(adapter)])
    plan = build_plan(ck, adapters)
    out = tmp_path / name
    out.mkdir()
    stats = engine.run(plan, ck, adapters, out, devices, sync=False)
    return out, stats


def test_many_workers_out_of_order_give_identical_bytes(tmp_path, monkeypatch):
    one, stats1 = _run(tmp_path, "one", [torch.device("cpu")])
    real = engine.compute
    rng = random.Random(0)

    def slow_compute(*args, **kwargs):
        time.sleep(rng.random() * 0.02)  # finish in a scrambled order
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compute", slow_compute)
    many, stats3 = _run(tmp_path, "many", [torch.device("cpu")] * 3)
    assert stats1.merged == stats3.merged > 0
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in many.iterdir())
    for f in files:
        assert (one / f).read_bytes() == (many / f).read_bytes(), f


def test_failing_compute_stops_the_pipeline(tmp_path, monkeypatch):
    def boom(job, *args, **kwargs):
        raise NumericsError(f"{job.name}: synthetic failure")

    monkeypatch.setattr(pipeline, "compute", boom)
    t0 = time.perf_counter()
    with pytest.raises(NumericsError, match="synthetic failure"):
        _run(tmp_path, "fail", [torch.device("cpu")] * 2)
    assert time.perf_counter() - t0 < 30


def test_device_parsing():
    assert engine.resolve_devices("cpu") == [torch.device("cpu")]
    with pytest.raises(Exception, match="not a device name"):
        engine.resolve_devices("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="CUDA is not available here; use --device cpu"):
            engine.resolve_devices("cuda")


@requires_cuda
def test_gpu_merge_equals_cpu_merge(tmp_path):
    cpu, _ = _run(tmp_path, "cpu", [torch.device("cpu")])
    gpu, _ = _run(tmp_path, "gpu", engine.resolve_devices("cuda:all"))
    for f in sorted(p.name for p in cpu.iterdir()):
        assert (cpu / f).read_bytes() == (gpu / f).read_bytes(), f
