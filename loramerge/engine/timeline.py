"""When things happened, in seconds since the process started (stdlib only).

A cold `loramerge apply` is judged by its wall time, start to exit, against copying the same
bytes. The stage seconds say how busy each thread was; these marks say when the disk first got
something to write and how long the process ran after the last byte, which is where a cold
process loses time that no stage shows (imports, CUDA's start, planning, the final fsync, the
exit). Marks are reported as ApplyReport.stage_seconds["at_<mark>"].
"""

from __future__ import annotations

import os
import time


def _started() -> float | None:
    """This process's start on CLOCK_BOOTTIME, from /proc/self/stat (clock ticks since boot), or
    None where either is missing (then marks count from the first call here)."""
    try:
        with open("/proc/self/stat") as f:
            # the command name (field 2) may hold spaces; fields after its ')' are plain
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, ValueError, IndexError, AttributeError):
        return None


_CLOCK = getattr(time, "CLOCK_BOOTTIME", None)
_START = _started() if _CLOCK is not None else None
_FALLBACK = time.monotonic()


def since_start() -> float:
    """Seconds since this process started (10 ms resolution), or since this module was imported
    where the kernel does not say."""
    if _START is not None:
        return time.clock_gettime(_CLOCK) - _START
    return time.monotonic() - _FALLBACK
