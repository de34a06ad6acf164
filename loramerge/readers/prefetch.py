"""Start reading the inputs while the process is still importing torch.

A cold `loramerge apply` spends over a second importing torch (more with CUDA) before it reads a
byte; on a checkpoint that is not in the page cache, the disk then idles for that long. prefetch()
hands the kernel a read-ahead hint (posix_fadvise WILLNEED) for the adapter files and the base's
weight files in the order the merge reads them, from a daemon thread, so the disk works while
Python imports. Only a hint: nothing is read into this process, errors are ignored, and the
amount is capped at half the memory the kernel says is available (read-ahead beyond what the page
cache can hold would evict itself). Standard library only, so it can run before torch exists.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

CHUNK = 64 << 20  # one hint per 64 MiB, so a huge shard does not hold the thread in one call
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def weight_files(path: Path) -> list[Path]:
    """The files a merge reads from `path`, in reading order: a file itself; in a directory, the
    shards of a safetensors/.bin index in index order, else the weight files by name. Small files
    (configs) are not listed: they are read anyway and cost nothing."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        try:
            weight_map = json.loads((path / index).read_text())["weight_map"]
            return [path / name for name in dict.fromkeys(weight_map.values())]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def plan_hints(files: list[Path], budget: int) -> list[tuple[Path, int, int]]:
    """(file, offset, length) hints in order, at most `budget` bytes in all."""
    hints = []
    for f in files:
        try:
            size = f.stat().st_size
        except OSError:
            continue
        off = 0
        while off < size and budget > 0:
            n = min(CHUNK, size - off, budget)
            hints.append((f, off, n))
            off += n
            budget -= n
    return hints


def _advise(hints: list[tuple[Path, int, int]]) -> None:
    fd, current = -1, None
    try:
        for f, off, n in hints:
            if f != current:
                if fd >= 0:
                    os.close(fd)
                fd, current = os.open(f, os.O_RDONLY), f
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # a hint only: the merge reports unreadable files itself
    finally:
        if fd >= 0:
            os.close(fd)


def prefetch(base, adapters=(), budget: int | None = None) -> threading.Thread | None:
    """Hint the kernel to read `adapters` (first: they are loaded first) and then `base`'s weight
    files, in a daemon thread. Returns the thread (None where posix_fadvise does not exist)."""
    if not hasattr(os, "posix_fadvise"):
        return None
    if budget is None:
        budget = available_memory() // 2
    files = [f for a in adapters for f in weight_files(Path(a))] + weight_files(Path(base))
    hints = plan_hints(files, budget)
    if not hints:
        return None
    t = threading.Thread(target=_advise, args=(hints,), name="loramerge-prefetch", daemon=True)
    t.start()
    return t
