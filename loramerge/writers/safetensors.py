"""Streaming safetensors writer.

The header is computed up front from the plan (names, dtypes, shapes are all known before any
data exists), so each tensor is written the moment it is produced and nothing but the tensor in
hand is ever buffered. Bytes go to the disk with O_DIRECT where the file system allows it
(direct.py says why); there, untouched tensors are read from the base into aligned buffers and
written from them. Buffered, they are copied file-to-file inside the kernel (copy_file_range),
never entering this process's memory. The file's sha256 (for the manifest) is computed as it is
written, on a thread of the file's own; a copied range is hashed there from its source, and the
writer goes on without waiting for that hash (a copy waiting for it idles the disk: the hash of
one core, ~1.3 GB/s on the H200 machine, is slower than its disk).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from ..errors import OutputError
from .direct import DirectSink, direct_wanted
from .header import build_header
from .early import EarlyFile, adopt
from .manifest import Hasher


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")


class SafetensorsWriter:
    """Writes one .safetensors file: header first, then tensors strictly in header order."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict | None,
                 direct: bool | None = None, early: EarlyFile | None = None,
                 copies: dict[int, tuple[Path, int, int]] | None = None):
        """direct: O_DIRECT where the file system takes it (default: unless LORAMERGE_BUFFERED_WRITES).
        early: this file as a head start began it before the plan existed (headstart.py), and
        copies: the copy_range calls this file will get (output offset -> source, offset, nbytes).
        Taken over only if its header is this file's: of what it copied and hashed, what copies
        confirms is not written or hashed again."""
        self.path = path
        self.entries = entries
        self._next = 0
        header = build_header(entries, metadata)
        taken = adopt(early, header, path, copies or {}) if early is not None else None
        self._early = taken.ranges if taken is not None else {}
        self._merged = taken.merged if taken is not None else {}
        self._hashed_to = taken.hashed[1] if taken is not None and taken.hashed is not None else 0
        self._marks = taken.marks if self._hashed_to else {}  # states to go back to inside the prefix
        self.bytes_early = 0  # bytes the head start wrote that this writer moved past
        flags = os.O_WRONLY if self._early or self._merged else os.O_WRONLY | os.O_CREAT | os.O_EXCL
        self._fd = os.open(path, flags, 0o644)
        self._sink = DirectSink(self._fd, path, direct_wanted() if direct is None else direct)
        self.hasher = Hasher(taken.hashed if self._hashed_to else None)
        self._write_all(header, hashed=not self._hashed_to)  # a hashed prefix starts with the header
        self.bytes_written = 0

    def _expect(self, name: str, nbytes: int) -> None:
        if self._next >= len(self.entries):
            raise RuntimeError(f"{self.path}: unexpected extra tensor {name!r}")
        ename, _, _, enbytes = self.entries[self._next]
        if ename != name or enbytes != nbytes:
            raise RuntimeError(f"{self.path}: expected {ename!r} ({enbytes} bytes) next, got {name!r} ({nbytes} bytes)")
        self._next += 1
        self.bytes_written += nbytes

    @property
    def direct(self) -> bool:
        return self._sink.direct

    def _write_all(self, data, hashed: bool = True) -> None:
        view = memoryview(data).cast("B")
        with self.hasher.alongside(self.hasher.update, view) if hashed else contextlib.nullcontext():
            self._sink.write(view)  # an OSError names the file: Staged makes it one OutputError line

    def write(self, name: str, t: torch.Tensor, defer_hash: bool = False):
        """Write the next tensor. defer_hash: do not wait for its hash; the returned future is done
        once the hashing thread is (the tensor's memory must stay untouched until then)."""
        data = tensor_bytes(t.cpu())
        if not len(data):  # a zero-size tensor: at the offset of the next one, whose result or hash this is not
            self._expect(name, 0)
            return None
        if self._sink.pos < self._hashed_to:
            self._unhash_from(name)
        self._merged.pop(self._sink.pos, None)  # a premerged result the merge did not confirm: written over
        self._expect(name, len(data))
        if not defer_hash:
            self._write_all(data)
            return None
        view = memoryview(data).cast("B")
        hashed = self.hasher.later(view)  # hashed while it is written
        self._sink.write(view)
        return hashed

    def _unhash_from(self, name: str) -> None:
        """The next tensor lies in the prefix the head start hashed, as a premerged result the
        merge did not confirm (it writes or copies other bytes): the hash goes back to the state
        at its start, and everything from there on is hashed as it is written."""
        at = self._sink.pos
        mark = self._marks.get(at)
        if mark is None:  # adopt() confirmed each copy in the prefix: only a result can be undone
            raise RuntimeError(f"{self.path}: tensor {name!r} lies in the prefix a head start hashed")
        waited = self.hasher.waited
        self.hasher.close()
        self.hasher = Hasher((mark.copy(), at))
        self.hasher.waited = waited
        self._hashed_to, self._marks = at, {}

    def copy_range(self, name: str, src: Path, offset: int, nbytes: int) -> None:
        """Copy bytes [offset, offset+nbytes) of `src` into this file, inside the kernel when it can;
        the part a head start already copied from the same bytes is moved past."""
        at = self._sink.pos
        if not nbytes:  # a zero-size tensor: at the offset of the next one, whose range or hash this is not
            self._expect(name, 0)
            return
        if at in self._marks:  # the head start hashed the worker's result here: the base's bytes instead
            self._unhash_from(name)
        self._expect(name, nbytes)
        if at >= self._hashed_to:  # (a hashed prefix holds whole tensors)
            self.hasher.later_from(src, offset, nbytes)  # in file order, not waited for
        done = self._early.pop(at, None)
        if done is None:
            self._copy(name, src, offset, nbytes)
            return
        if (done.src_offset, done.nbytes) != (offset, nbytes):
            raise RuntimeError(f"{self.path}: tensor {name!r} is not the copy the head start was taken over for")
        # [at, start) and [end, at + nbytes): the partial blocks around what the head start wrote
        self._copy(name, src, offset, done.start - at)
        self._sink.skip(done.end - done.start)
        self.bytes_early += done.end - done.start
        self._copy(name, src, offset + done.end - at, at + nbytes - done.end)

    def place_premerged(self, name: str, m) -> None:
        """The next tensor is the premerge worker's result `m` (early.EarlyMerged) that the head
        start wrote, confirmed by the merge as its own (the same key): the bytes around its whole
        blocks are written, and the blocks moved past, hashed in file order from the page cache
        the head start wrote them into (unless the head start's hash holds them already); or,
        where this file is not the head start's (its hard link failed), copied from its file."""
        in_prefix = self._sink.pos < self._hashed_to  # (a hashed prefix holds whole tensors)
        adopted = self._merged.pop(self._sink.pos, None) is m
        self._expect(name, m.nbytes)
        self._write_all(m.head, hashed=not in_prefix)
        if m.end > m.start:
            if adopted:
                if not in_prefix:
                    self.hasher.later_from(self.path, m.start, m.end - m.start)  # in file order, not waited for
                self._sink.skip(m.end - m.start)
                self.bytes_early += m.end - m.start
            else:
                if not in_prefix:
                    self.hasher.later_from(m.file, m.start, m.end - m.start)
                self._copy(name, m.file, m.start, m.end - m.start)
        self._write_all(m.tail, hashed=not in_prefix)

    def _copy(self, name: str, src: Path, offset: int, nbytes: int) -> None:
        if not nbytes:
            return
        if self._sink.direct:  # read into aligned buffers, written from there
            with open(src, "rb", buffering=0) as f:
                self._sink.copy_range(
                    f.fileno(), offset, nbytes,
                    truncated=lambda: OutputError(f"{src}: file ended while copying tensor {name!r}; it was truncated"))
            return
        with open(src, "rb", buffering=0) as f:
            fd_in = f.fileno()
            done = 0
            use_cfr = hasattr(os, "copy_file_range")
            while done < nbytes:
                n = 0
                if use_cfr:
                    try:
                        n = os.copy_file_range(fd_in, self._fd, nbytes - done, offset + done)
                    except OSError:
                        use_cfr = False  # e.g. across filesystems on old kernels: fall back below
                    if n == 0:
                        use_cfr = False  # some filesystems answer 0 instead of an error: fall back
                if not use_cfr:
                    chunk = os.pread(fd_in, min(nbytes - done, 64 << 20), offset + done)
                    self._write_all(chunk, hashed=False)  # the whole range is hashed from the source
                    n = len(chunk)
                if n == 0:
                    raise OutputError(f"{src}: file ended while copying tensor {name!r}; it was truncated")
                done += n
                if use_cfr:
                    self._sink.copied(n)

    @property
    def complete(self) -> bool:
        return self._next == len(self.entries)

    def close(self, sync: bool = True) -> None:
        if self._next != len(self.entries):
            missing = self.entries[self._next][0]
            os.close(self._fd)
            raise RuntimeError(f"{self.path}: closed before tensor {missing!r} was written")
        try:
            self._sink.finish()
            if sync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        self.hasher.close()
        try:
            os.close(self._fd)
        except OSError:
            pass
