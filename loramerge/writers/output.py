"""Where outputs land: always a temporary sibling, renamed into place only when complete.

A failed or interrupted run leaves nothing at OUT (and no stale temporary); an existing OUT is
replaced only with overwrite=True, and only after the new output is complete. The replacement is
atomic: rename() for a file, an exchange of the two names (renameat2 RENAME_EXCHANGE) for a
directory where the filesystem has it; elsewhere the old directory is moved aside and the new one
moved in, and a crash between the two renames is finished by the next run (staging.py), as is a
crash in the middle of committing an output of several files (a model and its external data).
Staging left by runs that died is swept away by every run into the same directory; a live run's
staging is never touched. A write that fails (a full disk, a quota, a file size limit) is one
OutputError line, with the staging removed.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ..errors import OutputError
from ..report import human_bytes
from . import signals, staging


def check_output_path(out: Path, inputs: list[Path], overwrite: bool) -> list[str]:
    """Refuse outputs that would write into, over, or around an input, or clobber data. First
    finishes or removes what runs into the same directory left behind when they died (returns
    one line per thing done), so that OUT is what those runs committed."""
    done = staging.sweep(out.parent) if out.parent.is_dir() else []
    refuse_paths(out, inputs, overwrite)
    return done


def refuse_paths(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """check_output_path's refusals alone, without the sweep (the head start asks before it stages)."""
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
        raise OutputError(f"{out.parent}: the output needs {human_bytes(nbytes)} but only {human_bytes(free)} is "
                          f"free ({human_bytes(nbytes - free)} short); free space or choose another disk")


class Staged:
    """Context manager: yields a temporary path next to `final`; commit() moves it into place.
    While it is open, the run holds the lock that tells other runs its staging is alive.
    Outputs of several files (a model and its external data) are staged with one `group` (the
    first Staged) and committed together by commit_all()."""

    def __init__(self, final: Path, is_dir: bool, overwrite: bool, group: Staged | None = None):
        self.final = final
        self.is_dir = is_dir
        self.overwrite = overwrite
        self.tag = group.tag if group is not None else staging.new_tag()
        self.tmp = staging.entry(final, "tmp", self.tag)
        self._old = staging.entry(final, "old", self.tag)
        self._lock = staging.Lock(final, self.tag) if group is None else None
        self._committed = False

    def __enter__(self) -> Path:
        try:
            # signals held back: one landing between the lock file's creation and its fd's
            # assignment (or after it, on the way out of here, where no __exit__ runs) left the
            # lock file behind for good
            with signals.deferred():
                if self._lock is not None:
                    self._lock.acquire()  # before the staging exists: a sweep never sees it unowned
                if self.is_dir:
                    self.tmp.mkdir()
        except BaseException as e:  # an error, or a signal held back above: nothing stays behind
            if self.is_dir and self.tmp.is_dir():
                self.tmp.rmdir()  # made just now: empty
            self._release()
            if isinstance(e, OSError):
                raise _write_error(self.final, e) from e
            raise
        return self.tmp

    def commit(self) -> None:
        commit_all(self)

    def _check_replace(self) -> None:
        if (self.final.exists() or self.final.is_symlink()) and not self.overwrite and \
                not (self.final.is_dir() and not any(self.final.iterdir())):
            keep = self.final.with_name(f"{self.final.name}.new-{self.tag}")
            os.rename(self.tmp, keep)
            self._committed = True  # keep the finished result: it may have taken hours
            raise OutputError(f"{self.final}: appeared while merging; not replaced. The result is at {keep}")

    def _install(self) -> None:
        """Atomic where the filesystem allows (staging.install); otherwise the old output is moved
        aside first and a crash before the second rename is finished by the next run."""
        exists = self.final.exists() or self.final.is_symlink()
        if not exists or not (self.final.is_dir() or self.is_dir):
            os.replace(self.tmp, self.final)  # a new name, or a file over a file: one atomic rename
        elif staging.exchange(self.tmp, self.final):
            self._old = self.tmp  # the previous output is now at the staging name
        else:
            os.rename(self.final, self._old)
            _hook("between-renames")
            os.rename(self.tmp, self.final)
        self._committed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self._committed:
                with signals.deferred():
                    staging.remove(self.tmp, staging.entry(self.final, "trash", self.tag))
        finally:
            self._release()
        if isinstance(exc, OSError) and (exc.errno in _WRITE_ERRORS
                                         or str(exc.filename or "").startswith(str(self.tmp))):
            raise _write_error(self.final, exc) from exc

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()


def commit_all(*outputs: Staged) -> None:
    """Move staged outputs into place: everything durable first, then the renames, with signals
    held back. Several outputs are one commit: a marker written before the first rename tells
    the next run to finish the others if this process dies midway (staging.sweep)."""
    for s in outputs:
        _fsync_tree(s.tmp)  # data and directory entries on disk before a rename makes them visible
    marker = staging.entry(outputs[0].final, "commit", outputs[0].tag) if len(outputs) > 1 else None
    with signals.deferred():  # a signal now would land between renames: it waits for them
        for s in outputs:
            s._check_replace()
        if marker is not None:
            marker.touch()
            fsync_path(marker.parent)
        for s in outputs:
            s._install()
            _hook("after-commit")
        if marker is not None:
            marker.unlink()
    fsync_path(outputs[0].final.parent)
    for s in outputs:
        if s._old.exists() or s._old.is_symlink():
            staging.remove(s._old)


_WRITE_ERRORS = {errno.ENOSPC: "the disk is full: free space or choose another disk",
                 errno.EDQUOT: "the disk quota is exhausted: free space or choose another disk",
                 errno.EFBIG: "the file is larger than this filesystem or process allows (ulimit -f)",
                 errno.EROFS: "the filesystem is read-only",
                 errno.EIO: "the disk reported an I/O error"}


def _write_error(final: Path, e: OSError) -> OutputError:
    hint = _WRITE_ERRORS.get(e.errno, "check the disk and permissions")
    where = f" ({e.filename})" if e.filename else ""
    return OutputError(f"{final}: writing the output failed: {e.strerror or e}{where}; {hint}. Nothing was "
                       f"written to {final}: the partial output was removed")


def _hook(point: str) -> None:
    """Test hook: LORAMERGE_TEST_CRASH=POINT kills this process at that point, as a power cut
    or SIGKILL would, to test what the next run finds."""
    if os.environ.get("LORAMERGE_TEST_CRASH") == point:
        os.kill(os.getpid(), 9)


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
