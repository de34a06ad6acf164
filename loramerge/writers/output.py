"""Where outputs land: always a temporary sibling, renamed into place only when complete.

A failed or interrupted run leaves nothing at OUT (and no stale temporary); an existing OUT is
replaced only with overwrite=True, and only after the new output is complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..errors import OutputError


def check_output_path(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse outputs that would write into, over, or around an input, or clobber data."""
    out_r = out.resolve()
    for p in inputs:
        p_r = p.resolve()
        if out_r == p_r:
            raise OutputError(f"{out}: the output is the same path as the input {p}; choose a new directory")
        if p_r.is_dir() and out_r.is_relative_to(p_r):
            raise OutputError(f"{out}: the output is inside the input {p}; choose a directory outside it")
        if p_r.is_relative_to(out_r):
            raise OutputError(f"{out}: the input {p} lies inside the output path; replacing the output "
                              "would delete it, choose a new directory")
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{out}: is a dangling symbolic link; remove it or choose another path")
    if out.exists() and not overwrite:
        if out.is_file() or (out.is_dir() and any(out.iterdir())):
            raise OutputError(f"{out}: already exists and is not empty; pass --overwrite to replace it "
                              "(it is replaced only once the new output is complete)")
    if not out.parent.exists():
        raise OutputError(f"{out}: parent directory {out.parent} does not exist; create it first")


def check_disk_space(out: Path, nbytes: int) -> None:
    free = shutil.disk_usage(out.parent).free
    if nbytes > free:
        raise OutputError(f"{out.parent}: {nbytes / 1e9:.2f} GB needed for the output but only "
                          f"{free / 1e9:.2f} GB free; free space or choose another disk")


class Staged:
    """Context manager: yields a temporary path next to `final`; commit() moves it into place."""

    def __init__(self, final: Path, is_dir: bool, overwrite: bool):
        self.final = final
        self.is_dir = is_dir
        self.overwrite = overwrite
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = final.parent / f".{final.name}.loramerge-tmp-{tag}"
        self._old = final.parent / f".{final.name}.loramerge-old-{tag}"
        self._committed = False

    def __enter__(self) -> Path:
        if self.is_dir:
            self.tmp.mkdir()
        return self.tmp

    def commit(self) -> None:
        _fsync_tree(self.tmp)  # data and directory entries on disk before the rename makes them visible
        if self.final.exists() or self.final.is_symlink():
            if not self.overwrite and not (self.final.is_dir() and not any(self.final.iterdir())):
                self._committed = True  # keep the finished result: it may have taken hours
                raise OutputError(f"{self.final}: appeared while merging; not replaced. The result is at {self.tmp}")
            os.rename(self.final, self._old)
        os.rename(self.tmp, self.final)
        self._committed = True
        fsync_path(self.final.parent)
        _remove(self._old)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            _remove(self.tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def fsync_path(p: Path) -> None:
    """fsync one file or directory (a directory's fsync makes its entries durable)."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(p: Path) -> None:
    """fsync every file directly under p (the index, config and tokenizer files; shards are
    already synced, so this is cheap) and p itself."""
    if p.is_dir():
        for f in p.iterdir():
            if f.is_file():
                fsync_path(f)
    fsync_path(p)
