"""Write a file front to back with O_DIRECT: bytes go from this process's buffers to the disk,
not through the page cache.

Why. A buffered write copies every byte into a page-cache page that the kernel must first find
free, then writes it back to the disk later (sync_file_range, fsync). For a merge that writes a
whole checkpoint once and does not read it back, that copy is pure cost: one core's memcpy of
the model, and on a virtual machine whose free memory is handed back to the host (free page
reporting, ballooning) each fresh page faults on the host first; on this project's 2-core VM,
writing 2.2 GB into fresh page-cache pages took 8-20 s of system time against ~1 s with
O_DIRECT (bench/RESULTS.md, issue 15). With O_DIRECT the disk reads the buffer itself (DMA), the
merged model does not evict the base from the page cache, and a full disk fails the write
itself, not a later fsync.

O_DIRECT needs the memory address, the file offset and the length of each write to be multiples
of the device's logical block size: ALIGN (4096) covers the usual 512 and 4096. DirectSink takes
bytes at any address and length: a source whose address has the file offset's phase
(address % ALIGN == offset % ALIGN: engine/pipeline.py places its output buffers so) is written
straight from where it is, after the few bytes that complete the current block; anything else
goes through a small aligned staging buffer. The last partial block is written without O_DIRECT
when the file is finished. Where the file system refuses O_DIRECT (fcntl or a write answers
EINVAL: tmpfs on older kernels, some FUSE mounts), the file is written buffered instead, with
early writeback (writeback.py). LORAMERGE_BUFFERED_WRITES=1 forces buffered writes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

from .writeback import Writeback

ALIGN = 4096
STAGE = 1 << 20       # staging for small tensors and unaligned sources
COPY_CHUNK = 8 << 20  # bytes per read of a range copied from another file


def direct_wanted() -> bool:
    return hasattr(os, "O_DIRECT") and not os.environ.get("LORAMERGE_BUFFERED_WRITES")


def address(view: memoryview) -> int | None:
    """Memory address of a writable buffer's first byte (None for read-only or empty buffers:
    they are staged)."""
    if view.readonly or not view.nbytes:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for an open file; False where the file system (or OS) refuses."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    return True


def pread_full(fd: int, view: memoryview, offset: int) -> bool:
    """Fill `view` from the open file at `offset` (reads may come short); False if the file ends first."""
    got = 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            return False
        got += k
    return True


def aligned_buffer(nbytes: int) -> tuple[mmap.mmap, memoryview]:
    """An anonymous mapping (page-aligned, so ALIGN-aligned) and a view of it."""
    m = mmap.mmap(-1, max(nbytes, ALIGN))
    return m, memoryview(m)


class DirectSink:
    """Appends bytes to an open file descriptor, with O_DIRECT where the file system allows it."""

    def __init__(self, fd: int, path, direct: bool = True):
        self.fd, self.path = fd, path
        self.pos = 0  # bytes accepted so far (staged or written)
        self.direct = direct and self._set_direct(True)
        self._writeback = Writeback(fd, enabled=not self.direct)  # buffered: push to the disk early
        self._stage = self._stage_view = None
        self._pending = 0     # staged bytes not yet written; they end at self.pos
        self._chunk = None    # the buffer for copied ranges (copy_range)

    def _set_direct(self, on: bool) -> bool:
        return set_direct(self.fd, on)

    def _to_buffered(self) -> None:
        """The file system refused a direct write: the rest of the file goes through the page cache."""
        self._set_direct(False)
        self.direct = False
        self._writeback = Writeback(self.fd)

    def _os_write(self, view: memoryview, direct: bool | None = None) -> None:
        """Write all of `view` at the end of the file (direct: the fd has O_DIRECT set)."""
        direct = self.direct if direct is None else direct
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as e:
                if e.errno == errno.EINVAL and direct:
                    self._to_buffered()
                    direct = False
                    continue
                raise OSError(e.errno, e.strerror, str(self.path)) from e  # Staged names OUT in one line
            if direct and n % ALIGN:
                self._to_buffered()  # a short write left the file unaligned (a size limit): go on buffered
                direct = False
            view = view[n:]

    def _flush_stage(self) -> None:
        if self._pending:
            self._os_write(self._stage_view[: self._pending])
            self._pending = 0

    def _stage_in(self, view: memoryview) -> None:
        """Copy `view` (at most what fits) into the staging buffer; write the buffer when full.
        The staged bytes always start at a block boundary of the file."""
        if self._stage is None:
            self._stage, self._stage_view = aligned_buffer(STAGE)
        self._stage_view[self._pending: self._pending + len(view)] = view
        self._pending += len(view)
        if self._pending == STAGE:
            self._flush_stage()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.pos += len(view)
        addr = address(view) if self.direct else None
        while view and self.direct:
            partial = self._pending % ALIGN
            if partial or addr is None or addr % ALIGN or len(view) < ALIGN:
                # stage: the bytes that complete the current block (after which an aligned
                # source is written from where it is), or as much as fits of anything else
                take = min(len(view), ALIGN - partial if partial else STAGE - self._pending)
                self._stage_in(view[:take])
                view, addr = view[take:], None if addr is None else addr + take
                continue
            self._flush_stage()
            n = len(view) - len(view) % ALIGN
            self._os_write(view[:n])  # straight from the caller's memory
            view, addr = view[n:], addr + n
        if view:  # buffered (from the start, or since the file system refused O_DIRECT)
            self._flush_stage()
            self._os_write(view)
            self._writeback.wrote(self.pos)

    def copied(self, n: int) -> None:
        """`n` bytes were appended behind this sink's back (copy_file_range; buffered files only)."""
        self.pos += n
        self._writeback.wrote(self.pos)

    def skip(self, nbytes: int) -> None:
        """The file's next `nbytes` are already written (a head start wrote them: headstart.py):
        move past them. Whole blocks only, from a block boundary, so nothing staged is cut."""
        if self.pos % ALIGN or nbytes % ALIGN:
            raise ValueError(f"skip of {nbytes} bytes at {self.pos}: whole {ALIGN}-byte blocks only")
        self._flush_stage()  # staged bytes start at a block boundary and end at pos: whole blocks
        os.lseek(self.fd, nbytes, os.SEEK_CUR)
        self.pos += nbytes
        self._writeback.wrote(self.pos)

    def copy_range(self, fd_in: int, offset: int, nbytes: int, truncated) -> None:
        """Append bytes [offset, offset+nbytes) of the open file fd_in (O_DIRECT sinks): read
        chunk by chunk into an aligned buffer, placed so that each chunk is written from where it
        was read. `truncated()` is the error to raise if fd_in ends early."""
        if self._chunk is None:
            self._chunk = aligned_buffer(COPY_CHUNK + ALIGN)[1]
        at, done = self.pos, 0
        while done < nbytes:
            n = min(COPY_CHUNK, nbytes - done)
            phase = (at + done) % ALIGN
            view = self._chunk[phase: phase + n]
            if not pread_full(fd_in, view, offset + done):
                raise truncated()
            self.write(view)
            done += n

    def finish(self) -> None:
        """Write what is staged (the last partial block without O_DIRECT, which takes whole blocks
        only) and drop the buffers. `direct` still tells whether the file went to the disk direct."""
        tail = self._pending % ALIGN != 0
        if tail and self.direct:
            self._set_direct(False)
        if self._pending:
            self._os_write(self._stage_view[: self._pending], direct=self.direct and not tail)
            self._pending = 0
        self._stage = self._stage_view = self._chunk = None
