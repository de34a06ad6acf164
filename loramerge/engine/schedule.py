"""The order in which a merge reads, computes and writes its jobs. Standard library only: the
premerge worker (engine/premerge_worker.py) predicts it before the plan exists."""

from __future__ import annotations

# Output files written side by side (their jobs interleaved), each hashed on its own thread: one
# core's sha256 (~1.3 GB/s on the H200 machine) is slower than the disk, so a manifest hashed file
# after file would set the pace. More files at once would mean more open sinks and threads for
# little: four cores of hashing outrun the disks this runs on.
FILES_AT_ONCE = 4


def write_order(sizes: list[list[int]]) -> list[tuple[int, int]]:
    """(file index, job index) for files whose jobs have the given byte sizes, in the order they
    are read, computed and written: the files in groups of FILES_AT_ONCE, and within a group the
    jobs of its files interleaved by how far into its file each starts, so the group's files
    advance together (each still strictly in its own order)."""
    order = []
    for g in range(0, len(sizes), FILES_AT_ONCE):
        keyed = []
        for fi in range(g, min(g + FILES_AT_ONCE, len(sizes))):
            total, done = max(1, sum(sizes[fi])), 0
            for k, n in enumerate(sizes[fi]):
                keyed.append((done / total, fi, k))
                done += n
        keyed.sort()
        order += [(fi, k) for _, fi, k in keyed]
    return order
