"""Start writing a file's new bytes to the disk as soon as they are in the page cache.

Without a push, Linux keeps written pages dirty until a background threshold (10% of memory by
default: gigabytes on a large machine) or the final fsync; a multi-GB shard's fsync then runs
after the last tensor, with nothing left to overlap it. sync_file_range(SYNC_FILE_RANGE_WRITE)
queues the range for writeback without waiting for it, so the disk writes while the merge still
computes and the final fsync finds little left. Linux only; elsewhere (or on a filesystem that
refuses it) a no-op: fsync still makes the file durable either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

SYNC_FILE_RANGE_WRITE = 2
# Push every this many bytes: large enough that the syscall costs nothing, small enough that the
# disk starts early and the tail left for fsync is short.
PUSH_BYTES = 64 << 20

_fn = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _fn = _libc.sync_file_range
        _fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _fn.restype = ctypes.c_int
    except (OSError, AttributeError):
        _fn = None


class Writeback:
    """Tracks what one file descriptor has written and pushes it out every PUSH_BYTES."""

    def __init__(self, fd: int, enabled: bool = True):
        self.fd = fd
        self.enabled = enabled and _fn is not None
        self._pushed = 0   # bytes [0, _pushed) are queued for writeback
        self._end = 0      # bytes written so far (files are written front to back)

    def wrote(self, end: int) -> None:
        """The file now holds bytes up to `end`; queue what is new once enough has gathered."""
        self._end = max(self._end, end)
        if self.enabled and self._end - self._pushed >= PUSH_BYTES:
            self.push()

    def push(self) -> None:
        if not self.enabled or self._end <= self._pushed:
            return
        if _fn(self.fd, self._pushed, self._end - self._pushed, SYNC_FILE_RANGE_WRITE) != 0:
            self.enabled = False  # e.g. a filesystem without it: fsync alone will do
            return
        self._pushed = self._end
