"""A caller's torch.set_flush_denormal(True) must not change what loramerge writes.

With it, the CPU reads float32 subnormals as zero and flushes subnormal results (DAZ/FTZ, per
thread), and every bfloat16 subnormal is a float32 subnormal. Found in review: the kernel's value
table of every 16-bit pattern, cached for the process, stored bfloat16 subnormals as 0 when it was
first built under the flag. Reference: tests/exact_ref.py (Fractions), computed with the flag off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramerge
from exact_ref import exact_merge
from loramerge.engine import fpenv, ops, precision, rounding_kernel
from loramerge.verifier import compare_kernel

R, ALPHA = 4, 8


@pytest.fixture
def flushing():
    """This thread flushes subnormals to zero, as a caller's torch.set_flush_denormal(True) makes it."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode torch can set")
    try:
        assert fpenv.flushes_subnormals()
        yield
    finally:
        torch.set_flush_denormal(False)


def _fresh_tables():
    rounding_kernel._LUTS.clear()
    rounding_kernel._LUTS32.clear()


def _half_bits(n: int, top: int, g: torch.Generator) -> torch.Tensor:
    """n random 16-bit patterns of magnitude below `top` (subnormals when top is the smallest
    normal's pattern), random signs."""
    mag = torch.randint(0, top, (n,), generator=g, dtype=torch.int32)
    return (mag | (torch.randint(0, 2, (n,), generator=g, dtype=torch.int32) << 15)).to(torch.int16)


def _case(root, rows=16, cols=64):
    """A base with a bfloat16 and a float16 weight, most entries subnormal in their format, and a
    LoRA whose deltas are of that size."""
    g = torch.Generator().manual_seed(3)
    w_bf = _half_bits(rows * cols, 0x0100, g).view(torch.bfloat16).reshape(rows, cols)  # subnormal, and 2^-126..2^-125
    w_fp = _half_bits(rows * cols, 0x0600, g).view(torch.float16).reshape(rows, cols)  # subnormal, and 2^-14..2^-13
    # rank 0 of the bfloat16 LoRA and rank 1 of the float16 one have float32 subnormals in A, and
    # B large enough that their products are of the outputs' subnormal size too
    a_bf = torch.randn(R, cols, generator=g) * 2.0 ** -64
    a_bf[0] = torch.randn(cols, generator=g) * 2.0 ** -135
    b_bf = torch.randn(rows, R, generator=g) * 2.0 ** -68
    b_bf[:, 0] = torch.randn(rows, generator=g) * 8
    a_fp = torch.randn(R, cols, generator=g) * 2.0 ** -12
    a_fp[1] = torch.randn(cols, generator=g) * 2.0 ** -140
    b_fp = torch.randn(rows, R, generator=g) * 2.0 ** -12
    b_fp[:, 1] = torch.randn(rows, generator=g) * 2.0 ** 116
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": w_bf, "model.layers.0.mlp.down_proj.weight": w_fp},
              str(base / "model.safetensors"), metadata={"format": "pt"})
    pre = "base_model.model.model.layers.0.mlp."
    save_file({pre + "up_proj.lora_A.weight": a_bf, pre + "up_proj.lora_B.weight": b_bf,
               pre + "down_proj.lora_A.weight": a_fp, pre + "down_proj.lora_B.weight": b_fp},
              str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": ["up_proj", "down_proj"]}))
    f = torch.full((R,), ALPHA / R, dtype=torch.float64)
    want = {"model.layers.0.mlp.up_proj.weight": exact_merge(w_bf, a_bf, b_bf, f, torch.bfloat16),
            "model.layers.0.mlp.down_proj.weight": exact_merge(w_fp, a_fp, b_fp, f, torch.float16)}
    return base, adapter, want


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_merge_with_subnormals_is_the_same_with_the_callers_flush_denormal(path, tmp_path, monkeypatch):
    base, adapter, want = _case(tmp_path)  # the reference with gradual underflow
    if path == "torch":  # lowrank's torch stages (and rounding.decide) instead of the numba kernels
        monkeypatch.setattr(ops, "_kernel_supports", lambda w, out_dtype: False)
        monkeypatch.setattr(rounding_kernel, "AVAILABLE", False)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode torch can set")
    try:
        _fresh_tables()  # first built under the caller's flag
        loramerge.apply(base, adapter, tmp_path / "on", sync=False)
        assert fpenv.flushes_subnormals()  # the caller's setting is back
    finally:
        torch.set_flush_denormal(False)
    loramerge.apply(base, adapter, tmp_path / "off", sync=False)
    got = load_file(str(tmp_path / "on" / "model.safetensors"))
    for name, w in want.items():
        assert got[name].dtype == w.dtype
        bad = got[name].view(torch.int16) != w.view(torch.int16)
        assert not bad.any(), (name, int(bad.sum()), got[name][bad][:4], w[bad][:4])
    assert any(bool(((w.view(torch.int16) & 0x7FFF) > 0).logical_and_(w.abs() < 2.0 ** -126).any())
               for w in want.values())  # the outputs hold subnormals: the case tests something
    on, off = (tmp_path / "on" / "model.safetensors").read_bytes(), (tmp_path / "off" / "model.safetensors").read_bytes()
    assert on == off


def test_value_tables_built_while_flushing_hold_the_subnormals(flushing):
    _fresh_tables()
    assert rounding_kernel.lut(torch.bfloat16)[1] == 2.0 ** -133
    assert rounding_kernel.lut(torch.bfloat16)[0x807F] == -(2.0 ** -126 - 2.0 ** -133)
    assert rounding_kernel.lut(torch.float16)[1] == 2.0 ** -24
    torch.set_flush_denormal(False)  # compare in gradual underflow: the table read back as float32 bits
    for dtype in (torch.bfloat16, torch.float16):
        ref = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).to(torch.float64).numpy()
        for table in (rounding_kernel.lut(dtype), compare_kernel._lut(dtype)):
            same = (table == ref) | ((table != table) & (ref != ref))  # NaN patterns stay NaN
            assert same.all() and ((table == 0) == (ref == 0)).all(), dtype


def test_guard_turns_flushing_off_for_its_threads_and_restores_it(flushing):
    seen = []
    with precision.exact_matmul():
        with precision.exact_matmul():  # nested: the inner exit must not restore early
            pass
        seen.append(fpenv.flushes_subnormals())
        t = threading.Thread(target=lambda: seen.append(fpenv.flushes_subnormals()))  # a worker started inside
        t.start()
        t.join()
    assert seen == [False, False]
    assert fpenv.flushes_subnormals()
    with pytest.raises(RuntimeError):
        with precision.exact_matmul():
            raise RuntimeError("boom")
    assert fpenv.flushes_subnormals()


def test_a_thread_whose_openmp_pool_was_made_while_flushing_merges_right():
    """GNU OpenMP makes a thread's pool at its first parallel region, with that thread's setting,
    and never updates it: the guard must bring the pool in line, or the merge math on the caller's
    own thread (verify, combine, the ONNX paths) reads subnormals as zero in part of the rows; and
    must not leave the pool flushing after the caller turns flushing off (fpenv.py)."""
    if torch.get_num_threads() < 2:
        pytest.skip("no OpenMP pool with one thread")
    g = torch.Generator().manual_seed(5)
    w = torch.randint(0, 0x100, (256, 256), generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    a, b = torch.randn(4, 256, generator=g) * 2.0 ** -64, torch.randn(256, 4, generator=g) * 2.0 ** -68
    f = torch.full((4,), 2.0, dtype=torch.float64)
    got = {}

    def caller(name, flush):
        if flush and not torch.set_flush_denormal(True):
            return
        (torch.ones(1 << 20) * 2).sum()  # this thread's first parallel region: its pool is made now
        with precision.exact_matmul():
            got[name] = ops.merge_weight(w, a, b, f, torch.bfloat16)[0]
            got[name + " torch"] = ops.merge_weight(w, a, b, f, torch.bfloat16, block_elems=1 << 16)[0]
        got[name + " after"] = fpenv.flushes_subnormals()
        torch.set_flush_denormal(False)  # the caller turns it off: the pool must not flush either
        tiny = torch.ones(1 << 20, dtype=torch.int32).view(torch.float32)
        got[name + " pool flushes"] = bool((tiny * 2).view(torch.int32).ne(2).any())

    for name, flush in (("clean", False), ("flushing", True)):
        t = threading.Thread(target=caller, args=(name, flush))  # a fresh thread: a fresh pool
        t.start()
        t.join()
    if "flushing" not in got:
        pytest.skip("this CPU has no flush-to-zero mode torch can set")
    assert got["flushing after"] and not got["clean after"]  # the caller's thread got its setting back
    assert not got["flushing pool flushes"] and not got["clean pool flushes"]
    for path in ("", " torch"):
        assert torch.equal(got["flushing" + path].view(torch.int16), got["clean" + path].view(torch.int16)), path


def test_the_kernels_helper_threads_never_flush_whoever_made_them():
    """The kernels' helper threads (engine/row_threads.py) are made once per process, by the
    first thread that shares a merge; made by one that flushed, they would inherit it for every
    later merge. They start with gradual underflow instead. A fresh process: the pool is per process."""
    code = ("import torch\n"
            "from loramerge.engine import fpenv, kernels, row_threads\n"
            "torch.set_num_threads(3)\n"
            "if not torch.set_flush_denormal(True):\n"
            "    print('skip'); raise SystemExit\n"
            "w = torch.zeros(512, 512, dtype=torch.bfloat16); a = torch.randn(4, 512); b = torch.randn(512, 4)\n"
            "kernels.merge_half(w, a, b, torch.ones(4, dtype=torch.float64), torch.bfloat16)\n"
            "seen = {row_threads._pool.submit(lambda: (__import__('threading').current_thread().name,\n"
            "                                      fpenv.flushes_subnormals())).result() for _ in range(8)}\n"
            "print(fpenv.flushes_subnormals(), sorted(seen))\n")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)}).stdout.strip()
    if out == "skip":
        pytest.skip("this CPU has no flush-to-zero mode torch can set")
    assert out.startswith("True [('loramerge-kernel"), out  # the caller still flushes; its helpers exist
    assert "True)" not in out, out  # and none of them flushes
