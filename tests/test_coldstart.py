"""Cold start (issue 15): the CLI imports no heavy module before it needs one, reads ahead while
torch imports, pushes written bytes to the disk early, and allocates its buffers on first use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramerge.engine.threads import BufferPool
from loramerge.readers import prefetch as pf
from loramerge.writers import writeback
from loramerge.writers.safetensors import SafetensorsWriter

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
HEAVY = ("torch", "numba", "transformers", "onnx", "onnxruntime", "peft", "numpy", "safetensors")


def _imported_after(code: str) -> set[str]:
    """Top-level packages from HEAVY that a fresh interpreter has imported after running `code`."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    return set(json.loads(out.strip().splitlines()[-1])) & set(HEAVY)


@pytest.mark.parametrize("code", [
    "import loramerge",
    "import loramerge.cli",
    # what `apply` imports before torch, whether or not a premerge worker is wanted
    "import loramerge.engine.premerge, loramerge.writers.headstart, loramerge.readers.prefetch",
    "from loramerge.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    *(f"from loramerge.cli import main\ntry:\n    main([{cmd!r}, '--help'])\nexcept SystemExit:\n    pass"
      for cmd in ("apply", "verify", "unmerge", "combine", "export-onnx")),
])
def test_cli_and_package_import_nothing_heavy(code):
    assert _imported_after(code) == set()


def test_float32_merge_does_not_import_numba(tmp_path):
    # the fused kernel is for half precision on the CPU: a float32 merge (or a GPU run) never needs it
    code = (f"import loramerge\nloramerge.apply({str(FIX / 'bases/llama-fp32')!r}, "
            f"{str(FIX / 'adapters/llama-basic')!r}, {str(tmp_path / 'out')!r}, device='cpu')")
    got = _imported_after(code)
    assert "torch" in got and "numba" not in got


# -- prefetch --------------------------------------------------------------------------------------

def test_weight_files_follow_the_index_order(tmp_path):
    names = ["model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"]
    for n in names:
        (tmp_path / n).write_bytes(b"x" * 10)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": names[0], "b": names[1],
                                                                                      "c": names[0]}}))
    assert pf.weight_files(tmp_path) == [tmp_path / names[0], tmp_path / names[1]]
    (tmp_path / "model.safetensors.index.json").unlink()
    assert pf.weight_files(tmp_path) == [tmp_path / names[1], tmp_path / names[0]]  # by name, configs left out
    assert pf.weight_files(tmp_path / names[0]) == [tmp_path / names[0]]
    assert pf.weight_files(tmp_path / "missing") == []


def test_hints_cover_files_in_order_within_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(pf, "CHUNK", 4)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"0" * 10)
    b.write_bytes(b"1" * 6)
    assert pf.plan_hints([a, b], 100) == [(a, 0, 4), (a, 4, 4), (a, 8, 2), (b, 0, 4), (b, 4, 2)]
    assert pf.plan_hints([a, b], 11) == [(a, 0, 4), (a, 4, 4), (a, 8, 2), (b, 0, 1)]
    assert pf.plan_hints([tmp_path / "gone", b], 5) == [(b, 0, 4), (b, 4, 1)]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_prefetch_hints_adapters_first_and_leaves_files_alone(tmp_path, monkeypatch):
    base = FIX / "bases/llama-bf16-sharded"
    adapter = FIX / "adapters/llama-bf16"
    before = {p: p.read_bytes() for p in [*pf.weight_files(base), *pf.weight_files(adapter)]}
    seen = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: (seen.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                                         real(fd, off, n, advice)))
    t = pf.prefetch(base, [adapter])
    t.join(10)
    files = list(dict.fromkeys(seen))
    assert files == [str(p) for p in [*pf.weight_files(adapter), *pf.weight_files(base)]]
    assert {p: p.read_bytes() for p in before} == before
    assert pf.prefetch(tmp_path / "missing", [tmp_path / "nothing"]) is None  # nothing to read: no thread


# -- early writeback -------------------------------------------------------------------------------

def test_writer_pushes_every_byte_in_order_and_the_file_is_unchanged(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(writeback, "_fn", lambda fd, off, n, flags: (calls.append((off, n, flags)), 0)[1])
    monkeypatch.setattr(writeback, "PUSH_BYTES", 1000)
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(40 + i, 17, generator=g) for i in range(6)}
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src))
    from loramerge.readers.checkpoint import read_safetensors_header
    refs, _ = read_safetensors_header(src)
    entries = [(n, "F32", tuple(t.shape), t.numel() * 4) for n, t in tensors.items()]
    # buffered writes (where O_DIRECT is refused or turned off): nothing dirty may wait for fsync
    w = SafetensorsWriter(tmp_path / "out.safetensors", entries, None, direct=False)
    for i, (n, t) in enumerate(tensors.items()):
        if i % 2:
            w.copy_range(n, src, refs[n].offset, refs[n].nbytes)  # file-to-file, like untouched tensors
        else:
            w.write(n, t)
    w.close()
    size = (tmp_path / "out.safetensors").stat().st_size
    assert calls and all(f == writeback.SYNC_FILE_RANGE_WRITE for _, _, f in calls)
    assert calls[0][0] == 0 and all(o1 + n1 == o2 for (o1, n1, _), (o2, _, _) in zip(calls, calls[1:]))
    assert calls[-1][0] + calls[-1][1] > size - 1000  # less than one push interval is left for fsync
    got = load_file(str(tmp_path / "out.safetensors"))
    assert all(torch.equal(got[n], t) for n, t in tensors.items())


def test_writeback_turns_itself_off_where_refused(monkeypatch):
    calls = []
    monkeypatch.setattr(writeback, "_fn", lambda *a: (calls.append(a), -1)[1])
    wb = writeback.Writeback(0)
    wb.wrote(writeback.PUSH_BYTES)
    wb.wrote(3 * writeback.PUSH_BYTES)
    assert len(calls) == 1 and not wb.enabled


# -- buffer pool -----------------------------------------------------------------------------------

def test_buffer_pool_allocates_on_demand_and_never_more_than_its_count():
    pool = BufferPool(64, 3, pin=False)
    assert pool._free.qsize() == 0  # nothing allocated before it is needed
    stop = threading.Event()
    bufs = [pool.get(stop) for _ in range(3)]
    assert len({b.data_ptr() for b in bufs}) == 3 and all(b.numel() == 64 for b in bufs)
    pool.put(bufs[1])
    assert pool.get(stop).data_ptr() == bufs[1].data_ptr()  # reused, not a fourth
    stop.set()
    with pytest.raises(RuntimeError, match="stopped"):
        pool.get(stop)  # all three are out: a fourth get waits (here: until the pipeline stops)


# -- quick exit ------------------------------------------------------------------------------------

def test_cli_exits_without_tearing_down_torch_yet_runs_exit_handlers_and_flushes(tmp_path):
    """After a command that loaded torch, `loramerge` ends with os._exit once its exit handlers
    ran and its streams are flushed: the report is complete, the status is the command's, and
    the output is committed; an exit handler registered by a library still runs."""
    base, adapter = FIX / "bases/llama-bf16-sharded", FIX / "adapters/llama-bf16"
    # the handler's line stays in stdout's buffer (a pipe: block-buffered) unless it is flushed
    code = ("import atexit, sys; atexit.register(lambda: print('handler ran', end='')); "
            "from loramerge.cli import run; run(sys.argv[1:])")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-c", code, "apply", str(base), str(adapter), str(tmp_path / "out"),
                         "--json"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.endswith("handler ran")
    report = json.loads(ok.stdout.removesuffix("handler ran"))  # the whole report reached the pipe
    assert report["ok"] and report["tensors_merged"] > 0
    assert (tmp_path / "out" / "loramerge_manifest.json").exists()
    bad = subprocess.run([sys.executable, "-m", "loramerge", "apply", str(base), str(adapter), str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("Error: ") and "--overwrite" in bad.stderr, bad.stderr
    # and the ordinary exit where torch was never imported
    helped = subprocess.run([sys.executable, "-m", "loramerge", "--help"], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=60)
    assert helped.returncode == 0 and "Usage:" in helped.stdout


# -- garbage collection ----------------------------------------------------------------------------

@pytest.mark.parametrize("enabled", [True, False])
def test_apply_holds_automatic_collections_and_restores_the_callers_setting(tmp_path, enabled):
    import gc

    from loramerge.api import apply  # imported before counting: the pause covers the call

    base, adapter = FIX / "bases/llama-bf16-sharded", FIX / "adapters/llama-bf16"
    seen = []
    threshold = gc.get_threshold()

    def count(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.set_threshold(10)  # a collection every 10 allocations, were they allowed
    (gc.enable if enabled else gc.disable)()
    gc.callbacks.append(count)
    try:
        apply(base, adapter, tmp_path / "out", sync=False)
        during = len(seen)
        assert gc.isenabled() == enabled
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*threshold)
        gc.enable()
    assert during <= 2, f"{during} collections during the merge"  # explicit gc.collect() calls, if any


def test_lazy_import_of_torch_holds_collections_and_restores_the_setting():
    """`loramerge.apply` (and the CLI's commands) import torch with automatic collections held."""
    probe = textwrap.dedent("""
        import gc, json, sys
        import loramerge
        seen = []
        gc.callbacks.append(lambda phase, info: seen.append(1) if phase == "start" else None)
        gc.set_threshold(10)
        loramerge.apply  # imports loramerge.api, torch with it
        out = {"torch": "torch" in sys.modules, "during": len(seen), "enabled": gc.isenabled()}
        gc.disable()
        loramerge.verify
        out["still_disabled"] = not gc.isenabled()
        print(json.dumps(out))
    """)
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    out = json.loads(got.strip().splitlines()[-1])
    assert out["torch"] and out["enabled"] and out["still_disabled"], out
    assert out["during"] <= 2, out  # explicit gc.collect() calls in the libraries, if any (~400 otherwise)
