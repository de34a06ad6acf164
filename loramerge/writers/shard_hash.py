"""The head start's sha256 of an output shard, in file order, as far as the shard can be hashed
before the merge has planned (writers/headstart.py: its hashing threads): the header, then each
tensor whole while there is one to hash, keeping the state at each tensor's start
(EarlyFile.marks) and after the last whole one (EarlyFile.hashed). The writer goes on from there,
or back to a result's mark where the merge writes over that result (writers/safetensors.py).
Standard library only: it runs before torch is imported.
"""

from __future__ import annotations

import threading
from pathlib import Path

from .early import EarlyFile
from .manifest import Hasher

# Bytes per read and sha256 update of a hashing thread, between looks at the stop flag: large,
# because each read ends with the thread taking the GIL back from torch's import (see
# headstart.CHUNK); one such buffer per hashing thread, shared by its shards.
HASH_CHUNK = 64 << 20


class ShardHash:
    """One shard's hash in file order: its header, then each tensor whole while there is one to
    hash: a tensor taken for untouched, from the base (`sources`: by output offset, the base file
    and offset of each); a result, from what the head start wrote of it (head, blocks read back
    from the page cache, tail)."""

    def __init__(self, shard: EarlyFile, sources: dict[int, tuple[Path, int]]):
        self.shard, self._sources = shard, sources
        self.places = sorted(shard.places.values())
        self._i = 0
        self._hasher = Hasher()
        self._hasher.update(shard.header)

    @property
    def finished(self) -> bool:
        return self._i == len(self.places)

    def advance(self, stop: threading.Event, buf: memoryview) -> bool | None:
        """Hash the tensors that can be, reading into `buf` (the hashing thread's, shared by its
        shards); whether any was (None: stopped midway)."""
        shard, moved = self.shard, False
        while not self.finished:
            at, nbytes = self.places[self._i]
            src = self._sources.get(at)
            m = shard.merged.get(at) if src is None else None
            if src is None and m is None:
                break  # a target not (yet) written
            start = self._hasher.state()[0]
            if src is not None:
                parts = [(*src, nbytes)]
            else:
                parts = [m.head, (m.file, m.start, m.end - m.start), m.tail]
            for part in parts:
                if isinstance(part, bytes):
                    self._hasher.update(part)
                    continue
                with open(part[0], "rb", buffering=0) as f:
                    for done in range(0, part[2], HASH_CHUNK):
                        if stop.is_set():
                            return None
                        self._hasher.update_from(f.fileno(), part[1] + done, min(HASH_CHUNK, part[2] - done), buf)
            shard.marks[at] = start
            shard.hashed = self._hasher.state()  # at a tensor's end: a stop midway keeps it
            self._i += 1
            moved = True
        return moved
