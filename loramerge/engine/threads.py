"""The pipeline's thread plumbing, apart from what it runs: stage threads that keep their error,
daemon workers, bounded queue put/get that give up when the pipeline stops or a stage failed,
reusable buffer pools (what bounds the pipeline's memory), and the GIL switch interval for a run.
Used by engine/pipeline.py, Workers by row_threads.py too, and BufferPool by the ONNX folder and
verify's stream."""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Stage(threading.Thread):
    """A daemon thread that keeps its exception in `error` for the other stages to re-raise."""

    def __init__(self, target, name):
        super().__init__(name=name, daemon=True)
        self._fn = target
        self.error: BaseException | None = None

    def run(self):
        try:
            self._fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e


class Workers:
    """Daemon threads running submitted calls in submission order (like a ThreadPoolExecutor).
    Daemons, because an interrupted run must not wait for the tensor being computed: the
    executor's threads would hold up the interpreter's exit until it is done (seconds for a big
    tensor on a CPU)."""

    def __init__(self, n: int, name: str, initializer=None):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, args=(initializer,), name=f"{name}_{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def _loop(self, initializer) -> None:
        broken = None
        if initializer is not None:
            try:
                initializer()
            except BaseException as e:  # noqa: BLE001 - every call then fails with it
                broken = e
        while True:
            item = self._q.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            if broken is not None:
                future.set_exception(broken)
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._q.put((future, fn, args))
        return future

    def shutdown(self, wait: bool) -> None:
        """wait: finish every call submitted, then stop. Otherwise cancel what has not started and
        return at once (a call that runs finishes in the background)."""
        while not wait:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._q.put(None)
        if wait:
            for t in self._threads:
                t.join()


def put_or_stop(q: queue.Queue, item, stop: threading.Event, *others: Stage) -> bool:
    """Put unless the pipeline stopped; re-raise a failed stage's error instead of waiting forever
    for a consumer that is gone."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            for t in others:
                if t.error is not None:
                    raise t.error
    return False


def get_or_stop(q: queue.Queue, stop: threading.Event, *others: Stage):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            for t in others:
                if t.error is not None:
                    raise t.error
            if stop.is_set():
                raise RuntimeError("pipeline stopped")


class BufferPool:
    """A few reusable byte buffers, each large enough for the largest tensor that needs one.
    Reusing them avoids a page fault per 4 KiB of every tensor; pinned (page-locked) buffers make
    host<->GPU copies run at full speed. get() blocks when all are in use, which is what bounds
    the memory of the whole pipeline."""

    def __init__(self, nbytes: int, count: int, pin: bool):
        self._free: queue.Queue = queue.Queue()
        # Buffers are made on first need, by the thread that needs one: the reader starts at once
        # instead of waiting for all of them to be allocated (page-locking is slow).
        self._left = count if nbytes else 0
        self._nbytes, self._pin = nbytes, pin
        self._lock = threading.Lock()

    def get(self, stop: threading.Event) -> torch.Tensor:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            make = self._left > 0
            self._left -= make
        if make:
            import torch  # here, not at the top: row_threads' Workers run in the torch-free premerge worker
            return torch.empty(self._nbytes, dtype=torch.uint8, pin_memory=self._pin)
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    raise RuntimeError("pipeline stopped") from None

    def put(self, buf: torch.Tensor | None) -> None:
        if buf is not None:
            self._free.put(buf)


def when_done(futures: list, fn) -> None:
    """fn() once every future in the list (None for none) is done: at once, or on the thread that
    finishes the last."""
    futures = [f for f in futures if f is not None]
    left, lock = [len(futures)], threading.Lock()

    def one(_=None):
        with lock:
            left[0] -= 1
            last = left[0] <= 0
        if last:
            fn()

    if not futures:
        fn()
    for f in futures:
        f.add_done_callback(one)


@contextlib.contextmanager
def switch_interval(seconds: float | None):
    """sys.setswitchinterval(seconds) for the block (None: unchanged), then the caller's back: it is
    process-wide, and a library caller's setting is theirs."""
    before = sys.getswitchinterval()
    if seconds is not None and seconds < before:
        sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)
