"""apply reports the seconds numba spent compiling the CPU kernels (engine/jit_time.py): the first
run after an install compiles them (~20 s on two cores), later runs load them from the cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from loramerge.api import ApplyReport
from loramerge.engine import jit_time, rounding_kernel

numba = pytest.importorskip("numba")


@pytest.mark.skipif(not rounding_kernel.AVAILABLE, reason="numba kernels off")
def test_a_compile_is_counted_once_with_its_callees():
    @numba.njit
    def inner(x):
        return x * 3.0 + 1.0

    @numba.njit
    def outer(x):
        s = 0.0
        for i in range(x.shape[0]):
            s += inner(x[i])
        return s

    import numpy as np
    before = jit_time.seconds()
    t0 = time.perf_counter()
    assert outer(np.arange(4.0)) == 3.0 * 6.0 + 4.0  # compiles outer, and inner inside it
    wall = time.perf_counter() - t0
    spent = jit_time.seconds() - before
    assert 0.0 < spent <= wall  # counted, and the nested compilation not twice
    t0 = time.perf_counter()
    outer(np.arange(5.0))  # same types: nothing to compile
    assert jit_time.seconds() - before == spent


def test_the_summary_says_when_the_kernels_were_compiled():
    report = ApplyReport(out=Path("o"), dry_run=False, device="cpu", stage_seconds={"compile": 21.4})
    assert "compiled the CPU kernels for this machine: 21.4 s" in report.summary()
    report.stage_seconds["compile"] = 0.0
    assert "compiled" not in report.summary()


def test_every_kernel_module_counts_its_compilations():
    """Each module that compiles CPU kernels installs the counter on import (an FP8 merge imports
    fp8_kernel without the half-precision kernels). A fresh process: the counter is per process."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    for module in ("fp8_kernel", "rounding_kernel", "kernels"):
        code = f"from loramerge.engine import jit_time, {module}\nprint(jit_time._installed)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True,
                             env={**os.environ, "PYTHONPATH": str(root)}).stdout.strip()
        assert out == "True", (module, out)
