"""O_DIRECT output (writers/direct.py, issue 15): the same bytes as safetensors' own serializer and
as buffered writes, every direct write aligned in memory, offset and length, results written
straight from the engine's buffers, and a clean fall back to buffered writes wherever the file
system or a write refuses O_DIRECT."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import time

import pytest
import torch
from safetensors.torch import save_file

import loramerge
from conftest import adapter_dir, base_dir
from loramerge.engine.timeline import since_start
from loramerge.readers.checkpoint import read_safetensors_header
from loramerge.types import TORCH_TO_ST
from loramerge.writers import direct
from loramerge.writers.safetensors import SafetensorsWriter

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


def _direct_ok(path) -> bool:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


class _Writes:
    """Records every os.write: (fd had O_DIRECT, file offset, buffer address, length)."""

    def __init__(self, monkeypatch, fail_direct_after: int | None = None, short: bool = False):
        self.calls, self._write = [], os.write
        self.fail_after, self.short = fail_direct_after, short
        monkeypatch.setattr(os, "write", self.write)

    def write(self, fd, data):
        view = memoryview(data).cast("B")
        is_direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        if is_direct and self.fail_after is not None and sum(c[3] for c in self.calls if c[0]) >= self.fail_after:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if is_direct and self.short and len(view) > direct.ALIGN:
            view = view[: direct.ALIGN + 100]  # a short, unaligned write (as at a file-size limit)
        self.calls.append((is_direct, os.lseek(fd, 0, os.SEEK_CUR), direct.address(view), len(view)))
        return self._write(fd, view)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "tiny": torch.randn(3, generator=g),                         # staged
        "big": torch.randn(700, 33, generator=g),                    # 92 KB: several blocks
        "odd.bf16": torch.randn(5, 7, generator=g).bfloat16(),       # 70 bytes: offsets lose 8-alignment
        "huge": torch.randn(3000, 101, generator=g),                 # > STAGE below
        "half": torch.randn(4097, generator=g).half(),
        "count": torch.arange(1000, dtype=torch.int64),
    }


def _write(path, tensors, order, copy_from=None, place=False, direct_mode=None):
    """Write `tensors` in `order` with SafetensorsWriter; names (but "tiny") are copied from
    copy_from's ranges if given. place=True hands each tensor's bytes at the phase of its file
    offset, as the engine does; place=False at another phase (a fresh tensor's own address could
    match by chance, which made the "everything is staged" case depend on the allocator)."""
    entries = [(n, TORCH_TO_ST[tensors[n].dtype], tuple(tensors[n].shape),
                tensors[n].numel() * tensors[n].element_size()) for n in order]
    w = SafetensorsWriter(path, entries, {"format": "pt"}, direct=direct_mode)
    refs = read_safetensors_header(copy_from)[0] if copy_from else {}
    for n in order:
        if n in refs and n != "tiny":
            w.copy_range(n, copy_from, refs[n].offset, refs[n].nbytes)
            continue
        t = tensors[n].contiguous().view(-1).view(torch.uint8)
        # a copy of t's bytes at an address with the phase of its file offset (place), or 64 bytes off it
        buf = torch.empty(t.numel() + direct.ALIGN, dtype=torch.uint8)
        start = (w._sink.pos + (0 if place else 64) - buf.data_ptr()) % direct.ALIGN
        t = buf[start: start + t.numel()].copy_(t)
        w.write(n, t)
    w.close()
    return w


def _count_staged(monkeypatch) -> list[int]:
    staged = []
    real = direct.DirectSink._stage_in
    monkeypatch.setattr(direct.DirectSink, "_stage_in", lambda self, v: (staged.append(len(v)), real(self, v))[1])
    return staged


@pytest.mark.parametrize("place", [False, True])
@pytest.mark.parametrize("copy", [False, True])
def test_direct_bytes_equal_safetensors_and_every_direct_write_is_aligned(tmp_path, monkeypatch, place, copy):
    if not _direct_ok(tmp_path / "probe"):
        pytest.skip("this file system refuses O_DIRECT")
    chunk = 16 * direct.ALIGN + 512
    monkeypatch.setattr(direct, "STAGE", 4 * direct.ALIGN)  # small buffers: many refills and chunks
    monkeypatch.setattr(direct, "COPY_CHUNK", chunk)
    tensors = _tensors()
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt"})
    hdr = read_safetensors_header(ref)[0]
    order = sorted(hdr, key=lambda n: hdr[n].offset)  # safetensors' order, to compare bytes
    writes, staged = _Writes(monkeypatch), _count_staged(monkeypatch)
    out = tmp_path / "out.safetensors"
    w = _write(out, tensors, order, copy_from=ref if copy else None, place=place)
    data = ref.read_bytes()
    assert out.read_bytes() == data
    assert w.hasher.record() == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert w.direct and any(d for d, *_ in writes.calls)
    for is_direct, offset, addr, n in writes.calls:
        if is_direct:
            assert offset % direct.ALIGN == 0 and n % direct.ALIGN == 0 and addr % direct.ALIGN == 0
    # the last partial block is the one buffered write
    assert [d for d, *_ in writes.calls].count(False) == 1 and not writes.calls[-1][0]
    header = min(r.offset for r in hdr.values())
    if place or copy:
        # placed tensors and copied chunks go to the disk from where they are: only the bytes that
        # complete a block, and the last partial block of each, pass through the staging buffer
        pieces = sum(-(-r.nbytes // chunk) if copy and n != "tiny" else 1 for n, r in hdr.items())
        assert sum(staged) <= header + 2 * direct.ALIGN * pieces < len(data) // 2
    else:  # nothing is placed: everything is staged
        assert sum(staged) == len(data)


@pytest.mark.parametrize("how", ["fcntl", "einval", "short"])
def test_falls_back_to_buffered_writes_where_o_direct_is_refused(tmp_path, monkeypatch, how):
    tensors = _tensors()
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt"})
    hdr = read_safetensors_header(ref)[0]
    order = sorted(hdr, key=lambda n: hdr[n].offset)
    if how == "fcntl":  # the file system has no O_DIRECT (tmpfs on older kernels, some FUSE mounts)
        real = fcntl.fcntl

        def refuse(fd, cmd, arg=0):
            if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return real(fd, cmd, arg)

        monkeypatch.setattr(fcntl, "fcntl", refuse)
    elif not _direct_ok(tmp_path / "probe"):
        pytest.skip("this file system refuses O_DIRECT")
    writes = _Writes(monkeypatch, fail_direct_after=20000 if how == "einval" else None, short=how == "short")
    out = tmp_path / "out.safetensors"
    w = _write(out, tensors, order, copy_from=ref, place=True)
    assert out.read_bytes() == ref.read_bytes()
    assert w.hasher.record()["sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()
    assert not w.direct
    if how == "fcntl":
        assert not any(d for d, *_ in writes.calls)
    else:  # some bytes went direct before the refusal
        assert any(d for d, *_ in writes.calls) and not writes.calls[-1][0]


def test_env_switch_forces_buffered_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMERGE_BUFFERED_WRITES", "1")
    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", "F32", (2,), 8)], None)
    w.write("a", torch.zeros(2))
    w.close()
    assert not w.direct


def _checkpoint(root):
    """A bf16 base of [384, 512] weights (384 KiB: many blocks each) with a rank-4 PEFT LoRA on
    half of them; the others, a norm and an embedding are copied untouched."""
    g = torch.Generator().manual_seed(1)
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    weights = {"model.embed_tokens.weight": torch.randn(1000, 64, generator=g).bfloat16(),
               "model.a_norm.weight": torch.ones(513, dtype=torch.bfloat16)}  # 1026 bytes: offsets after
    # it are 2 mod 8 (odd multiples of bf16's size)
    lora = {}
    for i in range(4):
        for proj in ("up_proj", "down_proj"):
            weights[f"model.layers.{i}.mlp.{proj}.weight"] = (torch.randn(384, 512, generator=g) * 0.02).bfloat16()
        key = f"base_model.model.model.layers.{i}.mlp.up_proj"
        lora[key + ".lora_A.weight"] = torch.randn(4, 512, generator=g) / 20
        lora[key + ".lora_B.weight"] = torch.randn(384, 4, generator=g) / 100
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj"]}')
    return base, adapter


def test_apply_writes_results_from_the_engine_buffers(tmp_path, monkeypatch):
    """The engine places each result at its file offset's phase: a merged tensor reaches the disk
    without a copy, and the output is the same as with buffered writes."""
    if not _direct_ok(tmp_path / "probe"):
        pytest.skip("this file system refuses O_DIRECT")
    base, adapter = _checkpoint(tmp_path)
    staged = _count_staged(monkeypatch)
    report = loramerge.apply(base, adapter, tmp_path / "a.safetensors", sync=False)
    assert report.tensors_merged == 4 and report.tensors_copied == 6
    st = report.stage_seconds  # the writer's wait for the manifest's hash is part of its time
    assert {k for k in st if not k.startswith("at_")} == {"read", "math", "write", "hash_wait", "compile",
                                                        "buffer_wait", "result_wait"}
    assert 0 <= st["hash_wait"] <= st["write"]
    assert 0 <= st["compile"] <= st["math"]  # numba compiles inside the merge's first calls, if at all
    # the timeline (seconds since the process started) in the order things happen
    marks = ["at_start", "at_planned", "at_first_write", "at_last_write", "at_synced", "at_committed"]
    assert [k for k in st if k.startswith("at_")] == marks
    assert 0 < st["at_start"] <= st["at_planned"] <= st["at_first_write"] <= st["at_last_write"] \
        <= st["at_synced"] <= st["at_committed"] <= since_start()
    data = (tmp_path / "a.safetensors").read_bytes()
    monkeypatch.setenv("LORAMERGE_BUFFERED_WRITES", "1")
    loramerge.apply(base, adapter, tmp_path / "b.safetensors", sync=False)
    assert data == (tmp_path / "b.safetensors").read_bytes()
    refs = read_safetensors_header(tmp_path / "a.safetensors")[0]
    header = min(r.offset for r in refs.values())
    # staged: the header, at most the bytes that complete a block and a last partial block per tensor
    assert 0 < sum(staged) <= header + sum(min(r.nbytes, 2 * direct.ALIGN) for r in refs.values()) < len(data) // 8


def test_waits_name_the_stage_that_set_the_pace(tmp_path, monkeypatch):
    """stage_seconds says who waited for whom: slow math shows as the writer's result_wait; slow
    hashing (which holds the output buffers) as the math's buffer_wait; neither shows the other."""
    import loramerge.engine.pipeline as pipeline
    from loramerge.writers import manifest
    base, adapter = _checkpoint(tmp_path)
    real_compute, real_update = pipeline.compute, manifest.Hasher.update

    def slow_compute(*a, **k):
        time.sleep(0.15)
        return real_compute(*a, **k)

    monkeypatch.setattr(pipeline, "compute", slow_compute)
    st = loramerge.apply(base, adapter, tmp_path / "a.safetensors", sync=False).stage_seconds
    assert st["result_wait"] >= 0.4, st  # 4 merged tensors x 0.15 s, the writer idle for most of it
    assert st["buffer_wait"] < 0.1, st
    monkeypatch.setattr(pipeline, "compute", real_compute)

    def slow_update(self, data):
        if len(data) >= 100_000:  # each weight (384 KiB) and the embedding, not the header
            time.sleep(0.2)
        real_update(self, data)

    monkeypatch.setattr(manifest.Hasher, "update", slow_update)
    st = loramerge.apply(base, adapter, tmp_path / "b.safetensors", sync=False).stage_seconds
    # three output buffers: the 4th merged tensor waits for the 1st one's hash, which comes after
    # the embedding's and its own (0.4 s from the start)
    assert st["buffer_wait"] >= 0.1, st


def test_a_cpu_merge_runs_with_a_short_switch_interval_and_gives_it_back(tmp_path, monkeypatch):
    """The GIL switch interval is CPU_SWITCH_INTERVAL while a CPU merge's threads run (so the
    writer gets the GIL back soon after each write), and the caller's own once apply returns,
    whether it succeeded or failed."""
    import sys

    import loramerge.engine.pipeline as pipeline
    import loramerge.engine.threads as engine_threads
    base, adapter = _checkpoint(tmp_path)
    real_compute, seen = pipeline.compute, []

    def spy(*a, **k):
        seen.append(sys.getswitchinterval())
        return real_compute(*a, **k)

    monkeypatch.setattr(pipeline, "compute", spy)
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.003)
        loramerge.apply(base, adapter, tmp_path / "a.safetensors", sync=False, device="cpu")
        assert seen and all(s == pytest.approx(pipeline.CPU_SWITCH_INTERVAL) for s in seen)
        assert sys.getswitchinterval() == pytest.approx(0.003)

        def broken(*a, **k):
            raise RuntimeError("boom")

        monkeypatch.setattr(pipeline, "compute", broken)
        with pytest.raises(Exception):
            loramerge.apply(base, adapter, tmp_path / "b.safetensors", sync=False, device="cpu")
        assert sys.getswitchinterval() == pytest.approx(0.003)
        with engine_threads.switch_interval(None):  # a GPU run leaves it alone
            assert sys.getswitchinterval() == pytest.approx(0.003)
    finally:
        sys.setswitchinterval(before)
