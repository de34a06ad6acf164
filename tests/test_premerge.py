"""The premerge worker (engine/premerge.py, premerge_worker.py): a process without torch merges
ahead, and the merge takes a result only where it is the very tensor it would compute.

Every merge here runs with and without a worker and the outputs must be the same bytes; the
report must count what was taken, and whatever the worker got wrong or could not do (another
factor, another order, a dead process) must leave no trace but a smaller count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import adapter_dir, base_dir
from loramerge import apply
from loramerge.cli import main
from loramerge.engine import pipeline, premerge, premerge_worker

BF16_BASE, BF16_ADAPTER = base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16")


@pytest.fixture(autouse=True)
def wanted(monkeypatch):
    monkeypatch.setenv("LORAMERGE_PREMERGE", "1")


def _weights(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".safetensors"}


def _merge(out: Path, pre, base=BF16_BASE, adapter=BF16_ADAPTER, **kw):
    try:
        return apply(base, [adapter], out, device="cpu", _premerge=pre, **kw)
    finally:
        if pre is not None:
            pre.close()


def _begin(base=BF16_BASE, adapter=BF16_ADAPTER, **kw):
    pre = premerge.begin(base, [adapter], device="cpu", **kw)
    assert pre is not None, "no worker: the test would prove nothing"
    return pre


def _bf16_copy(tmp_path: Path, name: str) -> Path:
    """A fixture base with its float32 tensors stored as bfloat16 (the worker merges half bases)."""
    src, dst = base_dir(name), tmp_path / f"{name}-bf16"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) if v.dtype == torch.float32 else v for k, v in load_file(f).items()},
                      dst / f.name)
        elif f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("options", [{}, {"weights": [0.37]}, {"dtype": "float16"}, {"accum": "float64"}])
def test_worker_results_are_the_merge_own(tmp_path, options):
    plain = apply(BF16_BASE, [BF16_ADAPTER], tmp_path / "plain", device="cpu", **options)
    report = _merge(tmp_path / "pre", _begin(**options), **options)
    assert report.tensors_merged == plain.tensors_merged > 0
    assert report.tensors_premerged == report.tensors_merged  # every target came from the worker
    assert _weights(tmp_path / "pre") == _weights(tmp_path / "plain")
    assert report.exact_fixups == plain.exact_fixups


@pytest.mark.parametrize("adapter", ["llama-rslora", "llama-patterns", "llama-layers"])
def test_scales_and_patterns_as_the_reader_computes_them(tmp_path, adapter):
    """rsLoRA's alpha/sqrt(r), rank and alpha patterns, a subset of layers: the worker's factors
    must be the reader's to the bit, else nothing is taken (the count says which)."""
    base = _bf16_copy(tmp_path, "llama-fp32")
    plain = apply(base, [adapter_dir(adapter)], tmp_path / "plain", device="cpu")
    report = _merge(tmp_path / "pre", _begin(base, adapter_dir(adapter)), base, adapter_dir(adapter))
    assert report.tensors_premerged == report.tensors_merged == plain.tensors_merged > 0
    assert _weights(tmp_path / "pre") == _weights(tmp_path / "plain")


def test_another_factor_is_never_taken(tmp_path):
    """A worker told weight 0.5 for a merge at weight 1: every key differs, nothing is taken, and
    the output is the merge's own."""
    plain = apply(BF16_BASE, [BF16_ADAPTER], tmp_path / "plain", device="cpu")
    report = _merge(tmp_path / "pre", _begin(weights=[0.5]))
    assert report.tensors_premerged == 0 and report.tensors_merged == plain.tensors_merged
    assert _weights(tmp_path / "pre") == _weights(tmp_path / "plain")


def test_a_base_changed_after_the_worker_read_it_is_not_taken(tmp_path):
    """The key holds the base file's size and mtime: a base rewritten in between (same names,
    other values) is merged afresh."""
    base = _bf16_copy(tmp_path, "llama-fp32")
    pre = _begin(base, adapter_dir("llama-basic"))
    deadline = time.monotonic() + 60
    while pre.targets is None or len(pre._results) < len(pre.targets):  # all merged ahead (by its guess)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert pre.targets
    for f in base.glob("*.safetensors"):
        save_file({k: v * 2 if v.is_floating_point() else v for k, v in load_file(f).items()}, f)
    report = _merge(tmp_path / "pre", pre, base, adapter_dir("llama-basic"))
    plain = apply(base, [adapter_dir("llama-basic")], tmp_path / "plain", device="cpu")
    assert report.tensors_premerged == 0
    assert _weights(tmp_path / "pre") == _weights(tmp_path / "plain")


def _blocked_with_two(**kw):
    """A worker with two slots (the fewest it takes), both full of its own guesses, waiting."""
    largest = max(t.nbytes for t in premerge_worker.plan({"base": str(BF16_BASE), "adapter": str(BF16_ADAPTER)}))
    pre = _begin(ring_bytes=2 * premerge_worker._page(largest), **kw)
    deadline = time.monotonic() + 60
    while not pre._blocked:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(pre._results) == 2
    return pre


def test_slots_full_of_results_wanted_last_are_given_back():
    """The merge wants the worker's targets in the reverse of its guess: the two results it holds
    are wanted last, and what is wanted first has no slot. The merge gives the latest back (drop),
    the worker computes what is wanted, and the given-back one again in its turn: every target
    arrives, in the merge's order, none lost."""
    pre = _blocked_with_two()
    try:
        order = list(reversed(pre.targets))
        assert len(order) > 2
        pre.want(order)
        for name in order:
            got = pre._wait(name)
            assert got is not None, name
            pre._send(release=got.slot)
        assert pre.dropped >= 1
    finally:
        pre.close()


def test_another_order_with_a_small_ring_neither_hangs_nor_differs(tmp_path, monkeypatch):
    """The merge writes the shards last to first, the worker guessed first to last, with two
    slots full of its guesses: the same bytes, every target from the worker."""
    plain = apply(BF16_BASE, [BF16_ADAPTER], tmp_path / "plain", device="cpu")
    pre = _blocked_with_two()
    monkeypatch.setattr(pipeline, "_write_order",
                        lambda plan: [(fi, j) for fi in reversed(range(len(plan.files))) for j in plan.files[fi].jobs])
    report = _merge(tmp_path / "pre", pre)
    assert report.tensors_premerged == report.tensors_merged == plain.tensors_merged > 0
    assert _weights(tmp_path / "pre") == _weights(tmp_path / "plain")


def test_a_dead_worker_leaves_the_merge_to_itself(tmp_path):
    plain = apply(BF16_BASE, [BF16_ADAPTER], tmp_path / "plain", device="cpu")
    pre = _begin()
    pre._proc.kill()
    report = _merge(tmp_path / "pre", pre)
    assert report.tensors_premerged == 0 and report.tensors_merged == plain.tensors_merged
    assert _weights(tmp_path / "pre") == _weights(tmp_path / "plain")


def test_cli_takes_the_worker_results_and_leaves_no_process(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["apply", str(BF16_BASE), str(BF16_ADAPTER), str(out), "--device", "cpu",
                                       "--json", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tensors_premerged"] == report["tensors_merged"] > 0
    plain = apply(BF16_BASE, [BF16_ADAPTER], tmp_path / "plain", device="cpu")
    assert _weights(out) == _weights(tmp_path / "plain") and plain.tensors_premerged == 0
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "loramerge.engine.premerge_worker" not in ps


def test_not_started_where_it_cannot_help(monkeypatch):
    assert premerge.begin(BF16_BASE, [BF16_ADAPTER], device="cpu", dry_run=True) is None
    assert premerge.begin(BF16_BASE, [BF16_ADAPTER, BF16_ADAPTER], device="cpu") is None
    assert premerge.begin(BF16_BASE, [BF16_ADAPTER], device="cpu", dtype="float32") is None
    gpu = premerge.begin(BF16_BASE, [BF16_ADAPTER], device="cuda")  # for the head start's writes
    assert gpu is not None
    gpu.close()
    assert premerge.begin(base_dir("llama-bin"), [adapter_dir("llama-bin")], device="cpu") is None
    monkeypatch.setenv("LORAMERGE_PREMERGE", "0")
    assert premerge.begin(BF16_BASE, [BF16_ADAPTER], device="cpu") is None


def test_by_default_a_cpu_merge_with_cores_to_spare_only(monkeypatch):
    """Unset, LORAMERGE_PREMERGE means: a worker for a CPU merge with MIN_CORES usable cores or
    more (two: on one, its start and merge take the core torch's import needs), below SPARE_CORES
    only for a merge of MIN_ELEMENTS or more (its start must be repaid), none for a GPU merge;
    set, it decides."""
    assert premerge.MIN_CORES == 2
    monkeypatch.delenv("LORAMERGE_PREMERGE")
    monkeypatch.setattr(premerge, "usable_cores", lambda: premerge.MIN_CORES - 1)
    assert not premerge.wanted("cpu")
    assert premerge.begin(BF16_BASE, [BF16_ADAPTER], device="cpu") is None
    monkeypatch.setattr(premerge, "usable_cores", lambda: premerge.MIN_CORES)
    assert premerge.wanted("cpu") and not premerge.wanted("cuda")
    assert premerge.begin(BF16_BASE, [BF16_ADAPTER], device="cpu") is None   # the fixture: too small
    for cores, least in ((premerge.MIN_CORES, 0), (premerge.SPARE_CORES, premerge.MIN_ELEMENTS)):
        monkeypatch.setattr(premerge, "usable_cores", lambda: cores)
        monkeypatch.setattr(premerge, "MIN_ELEMENTS", least)
        pre = premerge.begin(BF16_BASE, [BF16_ADAPTER], device="cpu")
        assert pre is not None
        pre.close()
    monkeypatch.setenv("LORAMERGE_PREMERGE", "0")
    assert not premerge.wanted("cpu")
    monkeypatch.setenv("LORAMERGE_PREMERGE", "1")
    monkeypatch.setattr(premerge, "usable_cores", lambda: 1)
    assert premerge.wanted("cpu") and premerge.wanted("cuda")
    monkeypatch.setattr(premerge, "MIN_ELEMENTS", 1 << 62)   # set, the size does not matter either
    pre = premerge.begin(BF16_BASE, [BF16_ADAPTER], device="cpu")
    assert pre is not None
    pre.close()


def test_the_merge_size_counts_the_adapters_targets(tmp_path):
    """merge_elements: the elements of the base tensors the adapter's modules name (by the module
    names in the adapter file, counted here from PEFT's key format and the base's own shapes), 0
    for an adapter that is no safetensors file."""
    from safetensors import safe_open
    files = sorted(BF16_BASE.glob("*.safetensors"))
    shapes = {}
    for f in files:
        with safe_open(f, "pt") as h:
            shapes.update({k: h.get_slice(k).get_shape() for k in h.keys()})
    with safe_open(BF16_ADAPTER / "adapter_model.safetensors", "pt") as h:
        targets = {k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                   for k in h.keys() if k.endswith(".lora_A.weight")}
    expected = sum(shapes[t][0] * shapes[t][1] for t in targets)
    assert expected > 0 and premerge.merge_elements(files, BF16_ADAPTER) == expected
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text("{}")
    assert premerge.merge_elements(files, bare) == 0


def test_cpu_merge_is_told_without_torch(tmp_path, monkeypatch):
    assert premerge.cpu_merge("cpu") and not premerge.cpu_merge("cuda:0")
    # a CUDA build of torch on a machine with no NVIDIA device node: still the CPU
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "version.py").write_text("cuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n")
    spec = type("Spec", (), {"origin": str(fake / "__init__.py")})
    monkeypatch.setattr(premerge.importlib.util, "find_spec", lambda name: spec)
    monkeypatch.setattr(premerge.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    assert not premerge.cpu_merge("auto")
    monkeypatch.setattr(premerge.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(premerge.os.path, "exists", lambda p: False)
    assert premerge.cpu_merge("auto")
    (fake / "version.py").write_text("cuda: Optional[str] = None\nhip: Optional[str] = None\n")
    monkeypatch.setattr(premerge.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    assert premerge.cpu_merge("auto")  # a CPU build cannot use the GPU that is there


def test_the_worker_never_imports_torch(tmp_path):
    """Run the worker as the CLI does, to its end, and ask it what it imported."""
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('TORCH', 'torch' in sys.modules, 'NUMBA', 'numba' in sys.modules, "
            "file=sys.stderr))\n"
            "from loramerge.engine.premerge_worker import main\nmain()\n")
    fd = os.memfd_create("test")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=(fd,), text=True)
    proc.stdin.write(json.dumps({"base": str(BF16_BASE), "adapter": str(BF16_ADAPTER), "ring_fd": fd,
                                 "ring_bytes": premerge.RING_BYTES}) + "\n")
    proc.stdin.flush()
    ready = json.loads(proc.stdout.readline())
    assert ready["ready"] and ready["slots"] >= 2
    proc.stdin.write(json.dumps({"order": ready["ready"]}) + "\n")
    proc.stdin.flush()
    done = []
    while True:
        msg = json.loads(proc.stdout.readline())
        if "done" in msg:
            done.append(msg["done"])
            proc.stdin.write(json.dumps({"release": msg["slot"]}) + "\n")
            proc.stdin.flush()
        elif "end" in msg:
            break
        else:
            assert "failed" not in msg, msg
    proc.stdin.close()  # its end: the worker exits
    err = proc.stderr.read()
    assert proc.wait(timeout=30) == 0
    os.close(fd)
    assert sorted(done) == sorted(ready["ready"])
    assert "TORCH False NUMBA True" in err


def test_the_cli_side_imports_neither_torch_nor_numba():
    """engine/premerge.py runs in the CLI before torch's import: importing it (and starting a
    worker) must not import torch or numba."""
    code = ("import sys\nfrom loramerge.engine import premerge\n"
            f"pre = premerge.begin({str(BF16_BASE)!r}, [{str(BF16_ADAPTER)!r}], device='cpu')\n"
            "assert pre is not None\npre.close()\n"
            "print('torch' in sys.modules, 'numba' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LORAMERGE_PREMERGE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_results_outside_the_order_are_never_given_back_or_taken():
    """The merge wants none of the two results the worker holds (as with --only, which the worker
    does not know): the worker frees those slots itself, the merge forgets them, and everything
    it wants still arrives, without a give-back."""
    pre = _blocked_with_two()
    try:
        held = set(pre._results)
        order = [n for n in pre.targets if n not in held]
        pre.want(order)
        assert not pre._results.keys() & held
        for name in order:
            got = pre._wait(name)
            assert got is not None, name
            pre._send(release=got.slot, name=name)
        assert pre.dropped == 0
    finally:
        pre.close()


def test_a_message_about_a_reused_slot_changes_nothing():
    worker = premerge_worker.Worker({}, -1)
    worker.ring, worker.state, worker.free = {1: "b"}, {"a": "taken", "b": "ring"}, [0]
    worker._free(1, "pending", "a")   # slot 1 held "a" once; it holds "b" now
    assert worker.ring == {1: "b"} and worker.state["b"] == "ring" and worker.free == [0]
    worker._free(1, "taken", "b")
    assert worker.ring == {} and worker.state["b"] == "taken" and sorted(worker.free) == [0, 1]


def test_close_leaves_no_descriptor_and_may_come_twice():
    def fds():
        return len(os.listdir("/proc/self/fd"))
    before = fds()
    for _ in range(3):
        pre = _begin()
        pre.want(pre.targets or [])
        view = memoryview(pre._mem) if pre._mem is not None else None  # a copy still running
        pre.close()
        pre.close()
        if view is not None:
            view.release()
    assert fds() == before
