"""engine/timeline.since_start: seconds since the process started, from the kernel's record."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

TIMELINE = Path(__file__).resolve().parents[1] / "loramerge" / "engine" / "timeline.py"


def test_since_start_counts_from_the_process_start_not_the_import():
    # the child sleeps before importing: a clock started by the import would say ~0
    code = ("import time; time.sleep(0.5)\n"
            "import importlib.util as u\n"
            f"s = u.spec_from_file_location('t', {str(TIMELINE)!r}); m = u.module_from_spec(s)\n"
            "s.loader.exec_module(m); print(m.since_start())")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    wall = time.monotonic() - t0
    assert 0.5 <= float(out) <= wall + 0.02  # 10 ms ticks: the start may read up to a tick early
