"""Write the untouched tensors while torch is still being imported.

Why. A cold `loramerge apply` spends its first seconds importing torch (2.5 s of an 8B merge's
11 s on the H200 machine), and the disk idles until then, while the floor (copying the files)
writes from its first millisecond. Tensors no adapter touches are copied into the output bit for
bit and need no torch: in an LLM the embedding and the lm_head, 2.1 GB of an 8B model's 16 GB.

How. start() runs before torch is imported, on the standard library alone. It predicts the output
from the base's safetensors headers and the adapters' tensor names: the output mirrors the base's
shards, every tensor in its own dtype and shape, and a tensor whose module name appears in no
adapter key is untouched. It then takes the output's staging directory (writers/output.py) and
starts a child process, a fresh interpreter (so neither the GIL nor torch's import slows it),
which copies the block-aligned middle of each large predicted-untouched tensor to its place in
the staged files.

The prediction is only a guess; the plan decides. Once the plan is built, adopt() holds every
copied range against it: the same files, byte for byte the same headers, and each range inside a
tensor the plan copies bit for bit, from the same bytes of the same source file. If anything
differs, the child is stopped, its files are removed, and the merge writes everything as if it
had never run. Otherwise the engine writes each such tensor's unaligned head and tail, moves past
its middle, and hashes the whole tensor from the source for the manifest; before it fsyncs a file
it calls settle(), which waits for the child and writes itself any range the child did not report
done (a child that failed costs time, never bytes).

The child is `python -m loramerge.writers.early`: it reads the ranges as JSON on stdin and
prints `done I` once range I is written. It dies with the parent (PR_SET_PDEATHSIG) and ends
quietly on Ctrl-C; the parent kills it before it removes the staging.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .direct import ALIGN, direct_wanted
from .header import build_header, data_offsets

MIN_BYTES = 16 << 20   # smaller tensors are not worth a range: their few ms of disk time is lost in the noise
METADATA = {"format": "pt"}  # what the engine writes into every output header
CHUNK = 8 << 20        # the child's reads and writes
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class Range:
    """The middle [out_offset, out_offset + nbytes) of tensor `tensor` in output file `file`,
    block-aligned at both ends, copied from `src` at `src_offset`. `start` is the tensor's first
    byte in the output file."""

    file: str
    tensor: str
    src: str
    src_offset: int
    out_offset: int
    nbytes: int
    start: int


@dataclass
class Layout:
    """The predicted output: per file, its header bytes and, per tensor, (source file, absolute
    source offset, nbytes)."""

    headers: dict[str, bytes] = field(default_factory=dict)
    sources: dict[str, dict[str, tuple[str, int, int]]] = field(default_factory=dict)
    ranges: list[Range] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(len(h) + sum(n for *_, n in self.sources[f].values()) for f, h in self.headers.items())


def _header(path: Path) -> tuple[int, dict]:
    """(first data byte, header dict) of a safetensors file; raises ValueError/OSError if it is not one."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > 100 << 20:
            raise ValueError("not a safetensors header")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors header")
    header.pop("__metadata__", None)
    return 8 + n, header


def _base_files(base: Path) -> list[Path] | None:
    """The base's safetensors shards in the order readers/checkpoint.py lists them (None for
    anything else: .bin bases, several files without an index)."""
    if base.is_file():
        return [base] if base.suffix == ".safetensors" else None
    index = base / "model.safetensors.index.json"
    if index.is_file():
        return [base / n for n in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    found = [base / "model.safetensors"] if (base / "model.safetensors").is_file() else sorted(base.glob("*.safetensors"))
    return found if len(found) == 1 else None


def _adapter_names(adapters: list[Path]) -> str | None:
    """Every tensor name of every adapter, one per line (None if one is not a safetensors file)."""
    names = []
    for a in adapters:
        f = a / ADAPTER_WEIGHTS if a.is_dir() else a
        if f.suffix != ".safetensors" or not f.is_file():
            return None
        names += _header(f)[1]
    return "\n".join(names)


def predict(base: Path, adapters: list[Path], min_bytes: int | None = None) -> Layout | None:
    """The output layout a plain merge (dtype auto, the base's shards) would write, and the
    ranges worth copying now: the aligned middles of tensors of at least `min_bytes` whose module
    (the name less its last part, e.g. `embed_tokens` of `model.embed_tokens.weight`) appears
    nowhere in the adapters' tensor names. A substring test, so it errs towards "touched"."""
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    files = _base_files(base)
    names = _adapter_names(adapters)
    if not files or names is None:
        return None
    layout = Layout()
    for path in files:
        start, header = _header(path)
        spans = sorted((info["data_offsets"][0], name, info) for name, info in header.items())
        entries = [(name, info["dtype"], tuple(info["shape"]), info["data_offsets"][1] - begin)
                   for begin, name, info in spans]
        layout.headers[path.name] = build_header(entries, METADATA)
        layout.sources[path.name] = {name: (str(path), start + begin, n)
                                     for (begin, name, _), (*_, n) in zip(spans, entries)}
        for (name, _, _, n), at in zip(entries, data_offsets(entries, METADATA)):
            module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            if n < min_bytes or module in names:
                continue
            lo, hi = -(-at // ALIGN) * ALIGN, (at + n) // ALIGN * ALIGN
            if hi - lo < min_bytes // 2:
                continue
            src, src_at, _ = layout.sources[path.name][name]
            layout.ranges.append(Range(path.name, name, src, src_at + lo - at, lo, hi - lo, at))
    return layout


class EarlyCopy:
    """The child copying untouched tensors into the staged output, and what the engine needs to
    know of it. A context manager around the rest of apply: on leaving, the child is stopped and
    waited for and the staging released (removed, unless apply committed it)."""

    def __init__(self, staged, layout: Layout, warnings: list[str]):
        self.staged = staged
        self.tmp: Path = staged.tmp
        self.layout = layout
        self.warnings = warnings          # what the output check's sweep did (apply reports them)
        self.adopted: dict[str, dict[str, Range]] = {}
        self._done: set[int] = set()
        self._settled = False
        self._lock = threading.Lock()
        self.made = sorted({r.file for r in layout.ranges})
        for name in self.made:
            os.close(os.open(self.tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        job = {"direct": direct_wanted(),
               "ranges": [(r.src, r.src_offset, str(self.tmp / r.file), r.out_offset, r.nbytes) for r in layout.ranges]}
        try:
            self._proc.stdin.write(json.dumps(job).encode())
            self._proc.stdin.close()
        except OSError:  # the child died at once: settle() writes every range itself
            pass

    @property
    def bytes_adopted(self) -> int:
        return sum(r.nbytes for rs in self.adopted.values() for r in rs.values())

    def adopt(self, plan) -> bool:
        """Hold the copied ranges against the plan; keep them only if every one of them is right
        (see the module's docstring). Otherwise stop the child and remove its files."""
        if self._matches(plan):
            for r in self.layout.ranges:
                self.adopted.setdefault(r.file, {})[r.tensor] = r
            return True
        self._stop()
        for name in self.made:
            (self.tmp / name).unlink(missing_ok=True)
        self.made = []
        return False

    def _matches(self, plan) -> bool:
        if [f.name for f in plan.files] != list(self.layout.headers):
            return False
        jobs = {}
        for f in plan.files:
            entries = [e for j in f.jobs for e in j.entries]
            if build_header(entries, METADATA) != self.layout.headers[f.name]:
                return False
            jobs[f.name] = {j.name: j for j in f.jobs}
        for r in self.layout.ranges:
            job = jobs[r.file].get(r.tensor)
            src, src_at, n = self.layout.sources[r.file][r.tensor]
            if (job is None or job.kind != "copy" or job.outputs or job.source.offset != src_at
                    or job.main_nbytes != n or Path(job.source.file).resolve() != Path(src).resolve()):
                return False
        return True

    def written(self, file: str, tensor: str) -> tuple[int, int] | None:
        """The part [lo, hi) of the tensor's bytes that is the child's to write (None: all the engine's)."""
        r = self.adopted.get(file, {}).get(tensor)
        return None if r is None else (r.out_offset - r.start, r.out_offset - r.start + r.nbytes)

    def settle(self, file: str) -> None:
        """Before `file` is fsynced: wait for the child, then write any of the file's ranges it did
        not report done (from a failed or killed child) here."""
        self._wait()
        missing = [(i, r) for i, r in enumerate(self.layout.ranges)
                   if r.file == file and i not in self._done and r.tensor in self.adopted.get(file, {})]
        if missing:
            fd = os.open(self.tmp / file, os.O_WRONLY)
            try:
                for _, r in missing:
                    _copy(r.src, r.src_offset, fd, r.out_offset, r.nbytes)
            finally:
                os.close(fd)

    def _wait(self, kill: bool = False) -> None:
        """Wait for the child to end (kill: end it now) and collect the ranges it reported done."""
        with self._lock:
            if self._settled:
                return
            if kill:
                self._proc.kill()
            out = self._proc.stdout.read()  # its report, up to its end
            self._proc.stdout.close()
            self._proc.wait()
            self._done = {int(line.split()[1]) for line in out.decode().splitlines() if line.startswith("done ")}
            self._settled = True  # nothing more will be written by it

    def _stop(self) -> None:
        self._wait(kill=True)

    def __enter__(self) -> EarlyCopy:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._stop()
        finally:
            self.staged.__exit__(exc_type, exc, tb)


def start(base, adapters, out, *, dry_run: bool = False, dtype: str = "auto", shard_size=None,
          qlora=None, overwrite: bool = False, **_) -> EarlyCopy | None:
    """Start copying untouched tensors into OUT's staging, or None where this cannot help: the
    options change the layout or the dtypes, an input is not a local safetensors file, the output
    check fails (apply then says why), LORAMERGE_EARLY_COPY=0, or nothing is worth copying."""
    if (os.environ.get("LORAMERGE_EARLY_COPY") == "0" or dry_run or dtype != "auto" or shard_size is not None
            or qlora or not sys.executable):
        return None
    from .output import Staged, check_disk_space, check_output_path

    out = Path(out)
    adapter_paths = [Path(a) for a in ([adapters] if isinstance(adapters, (str, os.PathLike)) else adapters)]
    if out.suffix == ".safetensors" or not adapter_paths:
        return None
    try:
        layout = predict(Path(base), adapter_paths)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None  # not a checkpoint this can read; the reader will say what is wrong
    if layout is None or not layout.ranges:
        return None
    try:
        warnings = check_output_path(out, [Path(base), *adapter_paths], overwrite)
        check_disk_space(out, layout.nbytes)
    except Exception:  # noqa: BLE001 - apply repeats the check and reports it
        return None
    staged = Staged(out, is_dir=True, overwrite=overwrite)
    try:
        staged.__enter__()
        return EarlyCopy(staged, layout, warnings)
    except BaseException:
        staged.__exit__(None, None, None)
        raise


# -- the child -------------------------------------------------------------------------------

def _copy(src: str, src_offset: int, fd: int, out_offset: int, nbytes: int) -> None:
    """Copy nbytes of `src` from src_offset to out_offset of `fd`: a thread reads into one of two
    aligned buffers (O_DIRECT takes aligned memory) while the other is written."""
    free: queue.Queue = queue.Queue()
    filled: queue.Queue = queue.Queue()
    for _ in range(2):
        free.put(memoryview(mmap.mmap(-1, CHUNK)))

    def read():
        try:
            with open(src, "rb", buffering=0) as f:
                for at in range(0, nbytes, CHUNK):
                    buf = free.get()
                    if buf is None:  # the writing side failed
                        return
                    n, got = min(CHUNK, nbytes - at), 0
                    while got < n:
                        k = os.preadv(f.fileno(), [buf[got:n]], src_offset + at + got)
                        if k == 0:
                            raise OSError(f"{src}: file ended while copying")
                        got += k
                    filled.put((at, buf, n))
            filled.put(None)
        except BaseException as e:  # noqa: BLE001 - raised by the writing side
            filled.put(e)

    threading.Thread(target=read, name="loramerge-early-read", daemon=True).start()
    try:
        while (item := filled.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            at, buf, n = item
            view = buf[:n]
            while view:
                k = os.pwrite(fd, view, out_offset + at)
                view, at = view[k:], at + k
            free.put(buf)
    except BaseException:
        free.put(None)
        raise


def _child() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it quietly; the parent cleans up
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:
        return
    job = json.loads(sys.stdin.buffer.read())
    if os.environ.get("LORAMERGE_TEST_EARLY_FAIL"):  # test hook: a child that writes nothing
        sys.exit(1)
    fds: dict[str, tuple[int, bool]] = {}
    for i, (src, src_offset, path, out_offset, nbytes) in enumerate(job["ranges"]):
        if path not in fds:
            direct = job["direct"] and hasattr(os, "O_DIRECT")
            fds[path] = (os.open(path, os.O_WRONLY | (os.O_DIRECT if direct else 0)), direct)
        fd, direct = fds[path]
        try:
            _copy(src, src_offset, fd, out_offset, nbytes)
        except OSError as e:
            if not direct or e.errno != errno.EINVAL:
                raise
            os.close(fd)  # the file system refused O_DIRECT: this file goes buffered
            fds[path] = (fd := os.open(path, os.O_WRONLY), False)
            _copy(src, src_offset, fd, out_offset, nbytes)
        print(f"done {i}", flush=True)


if __name__ == "__main__":
    _child()
