"""engine/row_threads.py: every range of rows done exactly once by the caller and the helpers,
also when a caller asking for more threads replaces the pool while another caller's helpers wait
in it (they are cancelled; their caller takes the ranges itself)."""

import threading
import time

import numpy as np

from loramerge.engine import row_threads


def _mark(seen, delay, lo, hi):
    for i in range(lo, hi):
        seen[i] += 1
        time.sleep(delay)


def test_every_row_once_on_any_number_of_threads():
    for threads in (1, 2, 3, 8):
        seen = np.zeros(1000, np.int64)
        row_threads.on_threads(_mark, (seen, 0.0), 10, 990, 1 << 15, threads)
        assert (seen[10:990] == 1).all() and not seen[:10].any() and not seen[990:].any(), threads


def test_a_pool_replaced_under_a_waiting_caller(monkeypatch):
    monkeypatch.setattr(row_threads, "_pool", None)  # (earlier tests made a larger one)
    monkeypatch.setattr(row_threads, "_pool_size", 0)
    row_threads.on_threads(_mark, (np.zeros(64, np.int64), 0.0), 0, 64, 1 << 15, 2)  # a pool of 1
    busy = row_threads._pool.submit(time.sleep, 0.2)  # its one thread busy: the next helper waits queued
    slow = np.zeros(64, np.int64)
    errors = []

    def caller():
        try:
            row_threads.on_threads(_mark, (slow, 0.002), 0, 64, 1 << 15, 2)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=caller)
    t.start()
    time.sleep(0.01)
    old = row_threads._pool
    big = np.zeros(500, np.int64)
    row_threads.on_threads(_mark, (big, 0.0), 0, 500, 1 << 15, 6)  # replaces the pool
    t.join()
    assert row_threads._pool is not old and row_threads._pool_size == 5
    assert not errors, errors
    assert busy.result(timeout=5) is None  # what the old pool ran, it finished (not cancelled)
    assert (slow == 1).all() and (big == 1).all()
