"""Output files written side by side, each hashed for the manifest on a thread of its own, without
the writer waiting for the hash (issue 15: one core's sha256 set the pace of an 8B merge on the
H200). What must hold: every file is still written strictly in its own order, a result's buffer is
not reused before its hash has read it, the files' hashes do run at the same time, and a failing
hash fails the run. Hashes are checked against hashlib over the files on disk."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import adapter_dir, base_dir

import loramerge
from loramerge.engine import pipeline, schedule
from loramerge.engine import threads
from loramerge.writers import manifest


def _plan(sizes: list[list[int]]):
    files = [SimpleNamespace(jobs=[SimpleNamespace(nbytes=n, tag=(fi, k)) for k, n in enumerate(js)])
             for fi, js in enumerate(sizes)]
    return SimpleNamespace(files=files)


def test_write_order_interleaves_groups_of_files_and_keeps_each_file_in_order(monkeypatch):
    sizes = [[10, 30, 30, 30], [100], [5, 5, 5, 5, 5, 5], [40, 60], [1, 2, 3], [7]]
    order = pipeline._write_order(_plan(sizes))
    tags = [job.tag for _, job in order]
    assert [fi for fi, _ in order] == [t[0] for t in tags]
    assert sorted(tags) == [(fi, k) for fi, js in enumerate(sizes) for k in range(len(js))]  # each once
    for fi in range(len(sizes)):
        assert [k for f, k in tags if f == fi] == list(range(len(sizes[fi])))  # in file order
    group = schedule.FILES_AT_ONCE
    first_of_later = min(i for i, t in enumerate(tags) if t[0] >= group)
    assert all(t[0] < group for t in tags[:first_of_later])  # a group ends before the next starts
    assert len(tags) - first_of_later == sum(len(js) for js in sizes[group:])
    assert {t[0] for t in tags[:group]} == set(range(group))  # the group's files start together
    # by how far into its file each job starts: file 0's third job (40 of 100 bytes in) comes after
    # file 2's third (10 of 30: 0.33) and, on a tie, before file 3's second (40 of 100)
    assert tags.index((2, 2)) < tags.index((0, 2)) < tags.index((3, 1))
    monkeypatch.setattr(schedule, "FILES_AT_ONCE", 1)
    assert [job.tag for _, job in pipeline._write_order(_plan(sizes))] == \
        [(fi, k) for fi, js in enumerate(sizes) for k in range(len(js))]


def test_slow_hashes_run_side_by_side_and_never_read_a_reused_buffer(tmp_path, monkeypatch):
    """A hash that starts late and runs slow: the manifest must still match the bytes on disk
    (a result buffer handed back before its hash read it would be refilled by the next merge),
    and hashes of different files must have run at the same time."""
    running, most = [0], [0]
    lock = threading.Lock()
    real = manifest.Hasher.update

    def slow(self, data):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        try:
            real(self, data)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(manifest.Hasher, "update", slow)
    out = tmp_path / "out"
    report = loramerge.apply(base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16"), out, sync=False)
    assert report.tensors_merged >= 8  # more merged results than the pool has buffers
    files = {p.name: p for p in out.glob("*.safetensors")}
    assert len(files) == 4
    recorded = json.loads(manifest.location(out).read_text())["files"]
    for name, p in files.items():
        data = p.read_bytes()
        assert recorded[name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name
    assert most[0] >= 2, "the files' hashes never ran at the same time"


def test_interleaved_output_is_the_same_bytes_as_file_after_file(tmp_path, monkeypatch):
    base, adapter = base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16")
    loramerge.apply(base, adapter, tmp_path / "a", sync=False)
    monkeypatch.setattr(schedule, "FILES_AT_ONCE", 1)
    loramerge.apply(base, adapter, tmp_path / "b", sync=False)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for n in names:
        if n != manifest.NAME:
            assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def test_a_failing_hash_fails_the_record_and_stops_that_file(monkeypatch):
    h = manifest.Hasher()
    calls = []
    real = manifest.Hasher.update

    def update(self, data):
        calls.append(bytes(data))
        if bytes(data) == b"bad":
            raise OSError("disk read error")
        real(self, data)

    monkeypatch.setattr(manifest.Hasher, "update", update)
    first = h.later(b"ok")
    second = h.later(b"bad")
    third = h.later(b"after")
    assert first.result(timeout=10) is None
    assert isinstance(second.result(timeout=10), OSError)
    assert isinstance(third.result(timeout=10), OSError)  # skipped: the hash state is unusable
    assert calls == [b"ok", b"bad"]
    with pytest.raises(OSError, match="disk read error"):
        h.record()


def test_deferred_and_waited_hashes_keep_the_file_order():
    h, ref = manifest.Hasher(), hashlib.sha256()
    parts = [bytes([i]) * (1000 + i) for i in range(50)]
    for i, p in enumerate(parts):
        ref.update(p)
        if i % 3:
            h.later(p)
        else:
            with h.alongside(h.update, p):
                pass
    assert h.record() == {"sha256": ref.hexdigest(), "bytes": sum(map(len, parts))}


def test_when_done_runs_once_after_the_last_future():
    from concurrent.futures import Future
    calls = []
    a, b = Future(), Future()
    threads.when_done([a, None, b], lambda: calls.append(1))
    a.set_result(None)
    assert calls == []
    b.set_result(None)
    assert calls == [1]
    threads.when_done([], lambda: calls.append(2))
    assert calls == [1, 2]


@pytest.mark.parametrize("direct", [True, False])
def test_a_copy_does_not_wait_for_its_hash(tmp_path, monkeypatch, direct):
    """A copied tensor is hashed from its source on the file's hashing thread while the writer goes
    on (waiting for that hash idled the disk); the record still covers every byte, in order."""
    from loramerge.writers.safetensors import SafetensorsWriter
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 40000)
    gate, real = threading.Event(), manifest.Hasher.update_from

    def slow(self, fd, offset, nbytes):
        assert gate.wait(timeout=30)
        real(self, fd, offset, nbytes)

    monkeypatch.setattr(manifest.Hasher, "update_from", slow)
    entries = [("a", "U8", (5000,), 5000), ("b", "U8", (3_000_000,), 3_000_000), ("c", "U8", (7,), 7)]
    w = SafetensorsWriter(tmp_path / "out.safetensors", entries, {"format": "pt"}, direct=direct)
    w.copy_range("a", src, 10, 5000)
    w.copy_range("b", src, 100, 3_000_000)  # returns with neither hash done
    assert not gate.is_set() and w.hasher.bytes < 5000
    gate.set()
    w.copy_range("c", src, 7, 7)
    record = w.hasher.record()
    w.close()
    data = (tmp_path / "out.safetensors").read_bytes()
    assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
