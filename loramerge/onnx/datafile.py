"""Writing an ONNX graph's external data file: the output stream (O_DIRECT where the file system
allows, ranges copied file to file otherwise), tensor bytes, and a stage clock for the fold's
report."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import OnnxError
from ..writers.direct import DirectSink, direct_wanted

COPY_CHUNK = 64 << 20


class Clock:
    """with clock("stage"): adds the block's seconds to stages["stage"] (no-op without stages)."""

    def __init__(self, stages: dict | None):
        self.stages = stages

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.stages is not None:
                self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - t0


class DataOut:
    """The output data file, written front to back through one descriptor, with O_DIRECT where
    the file system takes it (writers/direct.py: no copy into the page cache, which on a VM whose
    free memory goes back to the host costs more than the disk). Untouched ranges are read into
    aligned buffers and written from them; where writes are buffered, they are copied file to
    file (copy_file_range, falling back to pread/write) and each 64 MiB is handed to the disk at
    once (writers.writeback) rather than all at the final fsync."""

    def __init__(self, fd: int, path: Path):
        self._sink = DirectSink(fd, path, direct_wanted())

    @property
    def pos(self) -> int:
        return self._sink.pos

    def write(self, data) -> None:
        self._sink.write(data)

    def pad(self, align: int) -> None:
        if self.pos % align:
            self.write(b"\0" * (align - self.pos % align))

    def finish(self) -> None:
        """Write what is still staged; before the fsync."""
        self._sink.finish()

    def copy(self, src: Path, offset: int, length: int, name: str) -> None:
        try:
            fin = os.open(src, os.O_RDONLY)
        except OSError as e:
            raise OnnxError(f"{src}: cannot read external data of initializer {name!r} ({e.strerror or e})") from e

        def truncated():
            return OnnxError(f"{src}: file ends inside initializer {name!r}; the external data file is truncated")

        try:
            if self._sink.direct:
                self._sink.copy_range(fin, offset, length, truncated)
                return
            done, kernel_copy = 0, hasattr(os, "copy_file_range")
            while done < length:
                n = 0
                if kernel_copy:
                    try:
                        n = os.copy_file_range(fin, self._sink.fd, min(length - done, COPY_CHUNK), offset + done)
                    except OSError:
                        n = 0
                    if n == 0:
                        kernel_copy = False  # not supported here (or a short file): the slow path decides
                    else:
                        self._sink.copied(n)
                if not kernel_copy:
                    chunk = os.pread(fin, min(COPY_CHUNK, length - done), offset + done)
                    if not chunk:
                        raise truncated()
                    self.write(chunk)
                    n = len(chunk)
                done += n
        finally:
            os.close(fin)


def tensor_view(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor without copying them (a contiguous copy only if it is not)."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()

