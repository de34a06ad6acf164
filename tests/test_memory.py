"""Peak memory: apply streams, so its resident memory grows by a few tensors, not with the model.

Two generated checkpoints of float32 [1024, 4096] weights (16 MiB each: one float64 block of the
merge math, ops.BLOCK_ELEMS_CPU elements), 3 and 16 of them, each weight with a PEFT LoRA (r=8),
are merged in a child process: nothing else of the test suite is resident there. The child first
merges a tiny model (numba's compilation, thread stacks and allocator arenas then belong to the
baseline); before each measured merge it resets the kernel's peak-RSS counter
(/proc/self/clear_refs; a 1 ms psutil sampler as well), and reports the peak's growth.

Bounds: (1) 16 tensors cost at most 4 tensors more than 3 (allocator and scheduling noise under
load reach ~2): memory does not grow with the model (holding it would cost 13 more, 208 MiB;
a reader running ahead unbounded cost ~10 more when tried); (2) in absolute terms, the engine's buffer pools
(3 reads and 2 outputs in flight) plus 8 float64 blocks of the merge math, plus 16 MiB (352 MiB
for float32 out, 336 for bfloat16). Measured on 2 cores, torch 2.13, two runs each: float32 out
100-181 MiB, bfloat16 out 229-265 MiB (a float32 base to bfloat16 takes the torch path: its
float32 stage holds the sum, its bound and rounding.decide's distances, ~8 float32 blocks).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from loramerge.engine.ops import BLOCK_ELEMS_CPU

psutil = pytest.importorskip("psutil")
peft = pytest.importorskip("peft")

ROWS, COLS = 1024, 4096
TENSOR = ROWS * COLS * 4                       # one float32 weight
BLOCK = 8 * min(ROWS * COLS, BLOCK_ELEMS_CPU)  # one float64 block of the merge math
MiB = 1 << 20


def make(root, n: int, rows: int, cols: int, seed: int):
    """A base checkpoint of n [rows, cols] weights and a PEFT LoRA (r=8) on all of them."""
    gen = torch.Generator().manual_seed(seed)
    root.mkdir()
    save_file({f"{i}.weight": torch.randn(rows, cols, generator=gen) * 0.02 for i in range(n)},
              root / "model.safetensors")
    net = torch.nn.Sequential(*(torch.nn.Linear(cols, rows, bias=False, device="meta") for _ in range(n)))
    pm = peft.get_peft_model(net.to_empty(device="cpu"),
                             peft.LoraConfig(r=8, lora_alpha=16, target_modules=[str(i) for i in range(n)]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    pm.save_pretrained(root / "adapter")
    return [str(root / "model.safetensors"), str(root / "adapter")]


CHILD = textwrap.dedent("""
    import json, re, sys, threading, time
    from pathlib import Path
    import psutil
    import loramerge

    out, dtype, *pairs = sys.argv[1:]
    proc, status, clear = psutil.Process(), Path("/proc/self/status"), Path("/proc/self/clear_refs")

    def peak_growth(base, adapter, dest):
        try:
            clear.write_text("5")  # the kernel's peak RSS (VmHWM) := the current RSS
            hwm = True
        except OSError:
            hwm = False
        before = proc.memory_info().rss
        peak, done = [before], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        loramerge.apply(base, adapter, dest, dtype=dtype, sync=False)
        done.set()
        sampler.join()
        if hwm:
            peak[0] = max(peak[0], int(re.search(r"VmHWM:\\s+(\\d+)", status.read_text()).group(1)) * 1024)
        return peak[0] - before

    growth = [peak_growth(pairs[i], pairs[i + 1], f"{out}.{i}.safetensors") for i in range(0, len(pairs), 2)]
    print(json.dumps(growth[1:]))  # the first merge (a tiny model) is the warm-up
""")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    return make(root / "warm", 2, 64, 64, 0) + make(root / "three", 3, ROWS, COLS, 1) + \
        make(root / "sixteen", 16, ROWS, COLS, 2)


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_apply_peak_memory_is_a_few_tensors_whatever_the_model(dtype, checkpoints, tmp_path):
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "out"), dtype, *checkpoints],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    small, large = json.loads(run.stdout.strip().splitlines()[-1])
    out = TENSOR // (2 if dtype == "bfloat16" else 1)
    assert (tmp_path / "out.4.safetensors").stat().st_size > 16 * out
    shown = f"peak RSS growth {small / MiB:.0f} MiB (3 tensors), {large / MiB:.0f} MiB (16 tensors)"
    assert large <= small + 4 * TENSOR, shown
    assert 0 < max(small, large) <= 3 * TENSOR + 2 * out + 8 * BLOCK + 16 * MiB, shown
