"""What a head start (headstart.py) leaves for the merge's writers, and how a writer takes it over.

A head start writes into staged shards before the plan exists: untouched tensors copied from the
base (EarlyRange) and the premerge worker's results (EarlyMerged), each at the place the base's
headers give it. A writer takes a shard over (adopt) only if the header it computes from the plan
is the one the head start guessed, and then only what the plan confirms: copies of the same bytes
to the same place; a premerged result where the merge's own key for the job is the worker's.
Standard library only: the head start runs before torch is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class EarlyRange:
    """One base tensor (the file identified by `src`, stat's (device, inode), at `src_offset`)
    taken for untouched: the head start hashed it from there, and wrote its output bytes
    [start, end) (whole blocks inside the tensor; none where end <= start: too small, or it
    was stopped before)."""

    src: tuple[int, int]
    src_offset: int
    nbytes: int
    start: int
    end: int

    def same(self, copy: tuple[Path, int, int] | None) -> bool:
        """Whether the plan's copy (source path, offset, nbytes) into this place is this tensor."""
        if copy is None or (copy[1], copy[2]) != (self.src_offset, self.nbytes):
            return False
        try:
            return _file_id(copy[0]) == self.src
        except OSError:
            return False


@dataclass
class EarlyMerged:
    """A target the premerge worker merged (engine/premerge.py) and the head start wrote into its
    shard (EarlyFile.merged holds it by output offset): the whole blocks [start, end) inside it
    (buffered writes: the head start's hash, or beyond its prefix the writer's, reads them back
    from the page cache), the tensor's bytes before and after them
    (`head`, `tail`), and the worker's key and float64 count. The merge moves past it only where
    its own key for the job is `key` (the same W, factors and output format); else it computes
    the job and writes over it. A tensor with no whole block inside is all `head` (start = end)."""

    name: str
    file: Path       # the head start's shard it was written into
    nbytes: int
    start: int
    end: int
    head: bytes
    tail: bytes
    key: list
    redone: int


@dataclass
class EarlyFile:
    """A shard the head start began: its guessed header and each tensor's place in it (name ->
    output offset, nbytes; none for a zero-size tensor, which has the next one's offset); the
    tensors it took for untouched, by output offset, with what it wrote of each; the premerge
    worker's results it wrote; `hashed`: (sha256 object, n), the shard's first n bytes hashed
    (its header, then whole tensors: untouched ones from the base, results from what was
    written), or None; and `marks`: the sha256 state at each tensor's start inside that prefix
    (output offset -> sha256 object), to go back to where the merge does not confirm what was
    hashed."""

    path: Path
    header: bytes
    places: dict[str, tuple[int, int]] = field(default_factory=dict)
    ranges: dict[int, EarlyRange] = field(default_factory=dict)
    merged: dict[int, EarlyMerged] = field(default_factory=dict)
    hashed: tuple | None = None
    marks: dict[int, object] = field(default_factory=dict)


@dataclass
class Adopted:
    """What a writer takes over: bytes to move past (by output offset), the hash to start from
    with the states at the premerged results inside it (to go back to one the merge does not
    confirm), and the premerge worker's results written in (each for the merge to confirm)."""

    ranges: dict[int, EarlyRange]
    hashed: tuple | None
    merged: dict[int, EarlyMerged] = field(default_factory=dict)
    marks: dict[int, object] = field(default_factory=dict)


def adopt(early: EarlyFile | None, header: bytes, path: Path,
          copies: dict[int, tuple[Path, int, int]]) -> Adopted | None:
    """Move a head-started shard to `path` if its header is `header` (the writer's own); `copies`
    are the plan's copies into the file (output offset -> source path, offset, nbytes). Keeps the
    ranges the plan copies from the same bytes, the premerged results (the merge confirms each by
    its key), and the hashed prefix up to the first tensor in it that the plan does not copy so
    (the premerged results in it are the writer's to confirm: it goes back to the state at one
    the merge writes over). None (the writer starts a fresh file) where nothing is left to take
    over. The shard is linked to `path` where there are ranges or results (not renamed: an
    existing `path` fails, as the writer's O_EXCL would); with none, or where the file system has
    no hard links, the writer starts a fresh file from the hash (and copies each confirmed result
    from the head start's file)."""
    if early is None or early.header != header:
        return None
    same = {at for at, r in early.ranges.items() if r.same(copies.get(at))}
    ranges = {at: early.ranges[at] for at in same if early.ranges[at].end > early.ranges[at].start}
    merged = dict(early.merged)
    hashed, marks = _prefix(early, same)
    if not ranges and not merged:  # nothing written to take over (the file may not exist): the hash alone
        return Adopted({}, hashed, marks=marks) if hashed is not None else None
    try:
        os.link(early.path, path)
    except FileExistsError:
        raise  # as O_EXCL: never over an existing file
    except OSError:  # a file system without hard links: the writer writes it all, as without
        return Adopted({}, hashed, marks=marks) if hashed is not None else None
    os.unlink(early.path)
    return Adopted(ranges, hashed, merged, marks)


def _prefix(early: EarlyFile, same: set[int]) -> tuple[tuple | None, dict[int, object]]:
    """The hashed prefix cut at the first tensor in it taken for a copy that the plan does not
    copy from the same bytes (the state at its start), and the marks at the premerged results
    inside what is left: where the writer may have to go back to."""
    if early.hashed is None:
        return None, {}
    sha, n = early.hashed
    wrong = [at for at in early.ranges if at < n and at not in same]
    if wrong:
        n = min(wrong)
        if n not in early.marks:
            return None, {}
        sha = early.marks[n].copy()
    return (sha, n), {at: early.marks[at] for at in early.merged if at < n and at in early.marks}


def _file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino
