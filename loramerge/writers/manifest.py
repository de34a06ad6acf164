"""loramerge_manifest.json: what an output was made from and what it holds, so it can be checked
later without trusting the machine that made it (`loramerge verify` checks it when present).

Every output directory of apply, unmerge and combine holds one; a single-file output
(OUT.safetensors) gets a sibling, OUT.safetensors.loramerge_manifest.json, committed together with
it. Contents: the tool and its version; the inputs (paths; sha256 of every adapter file; for the
base, sha256 of its index and of each shard's safetensors header, the 8-byte length and the JSON
that names every tensor with its dtype, shape and byte range: hashing whole shards would cost a
full read of the base, which a merge that copies untouched tensors file to file never does);
per target the adapter terms (rank, alpha, scale, weight); the output dtypes; and
"files": {NAME: {"sha256", "bytes"}} for every file written. Output hashes are computed while the
bytes are written (Hasher, on a thread of its own beside the writer), never by reading the output
back; a copied tensor is hashed from its source, on the same thread, in file order. Cost:
bench/bench_manifest.py, results in bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import struct
import threading
import time
from concurrent.futures import Future
from pathlib import Path

NAME = "loramerge_manifest.json"
FORMAT = 1
CHUNK = 16 << 20
SOURCE_CHUNK = 4 << 20  # update_from's reads: one buffer per file being written, four files at a time


class Hasher:
    """sha256 and length of one file, fed in the order its bytes are written, on a thread of this
    file's own (hashlib releases the GIL): a write costs max(write, hash) instead of their sum, and
    the files of an output written side by side hash in parallel. One core hashes ~1.3 GB/s on the
    H200 machine, slower than its disk: with one thread for all files the manifest set the pace of
    an 8B merge (bench/RESULTS.md)."""

    def __init__(self, start: tuple | None = None):
        """start: (a sha256 object, n): the file's first n bytes are already hashed into it."""
        self._sha, self.bytes = start if start is not None else (hashlib.sha256(), 0)
        self.waited = 0.0  # seconds the writer waited for the hash after its own write was done
        self._thread: _HashThread | None = None
        self._last: Future | None = None  # the latest job handed to the thread (they run in order)
        self._buf: memoryview | None = None  # update_from's (used on the hashing thread only)

    def update(self, data) -> None:
        self._sha.update(data)  # hashlib releases the GIL for large buffers
        self.bytes += len(data)

    def state(self) -> tuple:
        """(a copy of the sha256 so far, bytes hashed): what Hasher(start=...) goes on from."""
        return self._sha.copy(), self.bytes

    def update_from(self, fd: int, offset: int, nbytes: int, buf: memoryview | None = None) -> None:
        """Hash bytes [offset, offset+nbytes) of an open file (the source of a copied range), read
        into one buffer reused chunk after chunk (fresh memory per chunk costs page faults): `buf`
        if given (the caller's, any size), else this hasher's own (up to SOURCE_CHUNK)."""
        if buf is None or not len(buf):
            if self._buf is None or len(self._buf) < min(nbytes, SOURCE_CHUNK):
                self._buf = memoryview(bytearray(min(max(nbytes, 1 << 16), SOURCE_CHUNK)))
            buf = self._buf
        while nbytes > 0:
            k = os.preadv(fd, [buf[: min(nbytes, len(buf))]], offset)
            if not k:
                raise OSError(f"file ended at byte {offset} while hashing a copied range")
            self.update(buf[:k])
            offset, nbytes = offset + k, nbytes - k

    def later_from(self, path, offset: int, nbytes: int) -> Future:
        """Hash bytes [offset, offset+nbytes) of the file at `path` on the hashing thread, after
        what was handed to it before, without waiting: the source of a copied tensor, whose
        bytes the writer copies into the output."""
        def hash_file():
            with open(path, "rb", buffering=0) as f:
                self.update_from(f.fileno(), offset, nbytes)
        return self._submit(hash_file)

    def _submit(self, fn, *args) -> Future:
        if self._thread is None:
            self._thread = _HashThread()
        self._last = self._thread.submit(fn, *args)
        return self._last

    def _wait(self, done: Future) -> None:
        t0 = time.perf_counter()
        error = done.result()
        self.waited += time.perf_counter() - t0
        if error is not None:
            raise error

    @contextlib.contextmanager
    def alongside(self, fn, *args):
        """Run fn(*args) (the writer passes update) on the hashing thread during the block; wait for
        it at the end, so the bytes it reads stay valid and updates keep the file's order."""
        done = self._submit(fn, *args)
        try:
            yield
        finally:
            self._wait(done)

    def later(self, data) -> Future:
        """Hash `data` on the hashing thread after what was handed to it before, without waiting:
        the caller keeps `data` valid until the returned future is done (its result is None, or
        the error, which record() raises too)."""
        return self._submit(self.update, data)

    def record(self) -> dict:
        """The file's record, once every hash handed to the thread is done."""
        if self._last is not None:
            self._wait(self._last)
        self.close()
        return {"sha256": self._sha.hexdigest(), "bytes": self.bytes}

    def close(self) -> None:
        """End the hashing thread (after the jobs already handed to it)."""
        if self._thread is not None:
            self._thread.stop()
            self._thread = None


class _HashThread:
    """A daemon thread that runs one file's hashing jobs in order. An error is the job's result
    (handed to whoever waits), and every later job of the same file is skipped with it."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="loramerge-hash", daemon=True).start()

    def submit(self, fn, *args) -> Future:
        done: Future = Future()
        self._queue.put((done, fn, args))
        return done

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        failed = None
        while (job := self._queue.get()) is not None:
            done, fn, args = job
            try:
                if failed is None:
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed back to the writer that waits
                failed = e
            done.set_result(failed)


def write_hashed(path: Path, data: bytes) -> dict:
    """Write a small file whole; its record."""
    h = Hasher()
    h.update(data)
    path.write_bytes(data)
    return h.record()


def copy_hashed(src: Path, dst: Path) -> dict:
    """Copy a file (contents and permission bits/times), hashing what is written."""
    import shutil

    h = Hasher()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            h.update(chunk)
    shutil.copystat(src, dst)
    return h.record()


def hash_file(path: Path) -> dict:
    h = Hasher()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.record()


def _hash_many(paths: list[Path], workers: int = 8) -> dict[Path, str]:
    """sha256 of each file, several files at once (hashlib releases the GIL: a checkpoint's shards
    hash in parallel); on daemon threads, so an interrupted verify does not wait for them."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for p in paths:
        todo.put(p)
    done: dict[Path, str] = {}
    errors: list[BaseException] = []

    def work():
        while True:
            try:
                p = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done[p] = hash_file(p)["sha256"]
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

    threads = [threading.Thread(target=work, name="loramerge-hash", daemon=True)
               for _ in range(min(workers, len(paths), os.cpu_count() or 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return done


# -- inputs -----------------------------------------------------------------------------------

def _header_record(path: Path) -> dict:
    """sha256 of a safetensors file's 8-byte length and JSON header; its size."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = f.read(n)
    return {"header_sha256": hashlib.sha256(head + header).hexdigest(), "header_bytes": len(head) + len(header),
            "bytes": path.stat().st_size}


def base_inputs(ck) -> dict:
    """The base checkpoint as a manifest records it (see the module docstring for why headers)."""
    out = {"path": str(Path(ck.path).resolve()), "format": ck.format, "files": {}}
    if ck.index_file is not None:
        out["files"][ck.index_file.name] = hash_file(ck.index_file)
    for f in ck.files:
        if f.suffix == ".safetensors":
            out["files"][f.name] = _header_record(f)
        else:  # a pickle has no header to hash apart from its data
            out["files"][f.name] = {"bytes": f.stat().st_size, "hashed": "no (pickled .bin: no separate header)"}
    return out


def adapter_files(ap: Path) -> list[Path]:
    """The files of an adapter that a manifest records: a single file itself; a directory's
    adapter_* files (PEFT's config and weights)."""
    if ap.is_file():
        return [ap]
    return sorted(p for p in ap.iterdir() if p.is_file() and p.name.startswith("adapter_")) if ap.is_dir() else []


def adapter_inputs(adapters, weights) -> list[dict]:
    """Each adapter: path, format, weight and sha256 of its files (small: hashed whole)."""
    out = []
    for i, a in enumerate(adapters):
        root = Path(a.path)
        out.append({"path": str(root.resolve()), "format": a.format,
                    "weight": weights[i] if weights is not None else 1.0,
                    "files": {p.name: hash_file(p) for p in adapter_files(root)}})
    return out


def adapter_inputs_later(adapters, weights) -> Future:
    """adapter_inputs on a daemon thread: the adapters' sha256 (0.13 s of an 8B rank-16 adapter's
    170 MB on one core) is needed only for the manifest, once the tensors are written, so the
    merge need not wait for it (hashlib releases the GIL). The Future's result() re-raises."""
    done: Future = Future()

    def run():
        try:
            done.set_result(adapter_inputs(adapters, weights))
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            done.set_exception(e)

    threading.Thread(target=run, name="loramerge-hash-adapters", daemon=True).start()
    return done


def output_dtypes(plan) -> dict[str, int]:
    """Tensors written, per dtype (a quantized output's packed weights and their scales count
    apart)."""
    counts: dict[str, int] = {}
    for j in plan.jobs:
        for _, dtype, _, _ in j.entries:
            counts[dtype] = counts.get(dtype, 0) + 1
    return dict(sorted(counts.items()))


def build(command: str, inputs: dict, files: dict[str, dict], **details) -> dict:
    """The manifest: `details` (targets, output_dtypes, options, ...) go in as they are."""
    return {"manifest_version": FORMAT, "tool": {"name": "loramerge", "version": _version()},
            "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": inputs, **details,
            "hashing": ("sha256 of every output file, computed while it was written; inputs: adapter files "
                        "whole, the base's index and each safetensors shard's header (length + JSON), not its "
                        "tensor data, which would cost a full read of the base"),
            "files": dict(sorted(files.items()))}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loramerge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode()


def sibling(out: Path) -> Path:
    """The manifest of a single-file output OUT.safetensors: OUT.safetensors.loramerge_manifest.json."""
    return out.with_name(out.name + "." + NAME)


def location(out: Path) -> Path:
    """Where OUT's manifest lives: inside a directory, beside a single file."""
    return out / NAME if out.is_dir() else sibling(out)


def recorded_options(out: Path) -> dict:
    """The options OUT's manifest records (weights, dtype, accum, ...); {} without a readable one."""
    try:
        options = json.loads(location(out).read_text()).get("options")
    except (OSError, ValueError, AttributeError):
        return {}
    return options if isinstance(options, dict) else {}


# -- checking ---------------------------------------------------------------------------------

def check(out: Path, adapter_paths=None, options: dict | None = None) -> dict | None:
    """Compare OUT with its manifest: {"manifest": path, "files": n checked, "problems": [...],
    "notes": [...]}, or None without a manifest. A problem names a file whose bytes changed (or
    that is missing); notes name inputs that differ from the ones recorded, unlisted files, and
    merge options (`options`: weights, qlora...) that differ from the ones the output was made with."""
    path = location(out)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise ValueError("files is not an object")
    except (ValueError, KeyError, TypeError, OSError) as e:
        return {"manifest": str(path), "files": 0, "notes": [],
                "problems": [f"{path.name}: unreadable manifest ({e}); it was damaged or edited"]}
    root = out if out.is_dir() else out.parent
    problems, notes = [], []
    digests = _hash_many([root / name for name, rec in files.items() if isinstance(rec, dict)
                          and Path(name).name == name and (root / name).is_file()
                          and (root / name).stat().st_size == rec.get("bytes")])
    for name, rec in files.items():
        p = root / name
        if not isinstance(rec, dict) or Path(name).name != name:
            problems.append(f"{path.name}: malformed entry for {name!r}")
            continue
        if not p.is_file():
            problems.append(f"{name}: missing (the manifest lists it)")
            continue
        size = p.stat().st_size
        if size != rec.get("bytes"):
            problems.append(f"{name}: {size} bytes, the manifest says {rec.get('bytes')}: the file changed after "
                            "loramerge wrote it (truncated, replaced or edited)")
            continue
        got = digests[p]
        if got != rec.get("sha256"):
            problems.append(f"{name}: its bytes changed after loramerge wrote it (sha256 {got[:16]}..., the "
                            f"manifest says {str(rec.get('sha256'))[:16]}...)")
    if out.is_dir():
        extra = sorted(p.name for p in out.iterdir() if p.name not in files and p.name != NAME)
        if extra:
            notes.append(f"not listed in {NAME} (added later?): {', '.join(extra)}")
    if adapter_paths is not None:
        try:
            recorded = [a for a in (manifest.get("inputs") or {}).get("adapters") or [] if isinstance(a, dict)]
            notes += _adapter_notes(recorded, list(adapter_paths), (options or {}).get("weights"))
        except OSError as e:  # an adapter file unreadable here: the tensor checks report it
            notes.append(f"the adapters could not be compared with {NAME}'s record ({e})")
        except (TypeError, ValueError, AttributeError):  # an edited manifest: no traceback from verify
            notes.append(f"{NAME}: its record of the adapters is unreadable")
    if options is not None and isinstance(manifest.get("options"), dict):
        try:
            notes += _option_notes(manifest["options"], options)
        except (TypeError, ValueError):  # an edited manifest: its options say nothing reliable
            notes.append(f"{NAME}: its recorded options are unreadable")
    return {"manifest": str(path), "files": len(files), "problems": problems, "notes": notes}


def _adapter_notes(recorded: list[dict], given: list, weights) -> list[str]:
    """The adapters (and weights) a check is given against those the merge recorded: an adapter
    found by its path whose files changed, one the merge did not use (found by neither its path
    nor its files' sha256: a moved copy is the same adapter), one the merge used that is not
    given, and weights that differ from the merge's (each recorded with its adapter)."""
    notes, used = [], set()

    def digests(r: dict) -> set:
        files = r.get("files")
        return {fr.get("sha256") for fr in files.values() if isinstance(fr, dict) and isinstance(fr.get("sha256"), str)
                } if isinstance(files, dict) else set()

    match: list[int | None] = []
    for ap in map(Path, given):
        if ap.is_file() and ap.name.startswith("adapter_") and (ap.parent / "adapter_config.json").is_file():
            ap = ap.parent  # a PEFT directory's weights file given for it: recorded as the directory
        where = str(ap.resolve())
        i = next((k for k, r in enumerate(recorded) if k not in used and r.get("path") == where), None)
        if i is not None:
            files = recorded[i].get("files")
            for fname, frec in (files.items() if isinstance(files, dict) else ()):
                f = (ap if ap.is_dir() else ap.parent) / str(fname)
                if f.is_file() and isinstance(frec, dict) and hash_file(f)["sha256"] != frec.get("sha256"):
                    notes.append(f"{f}: differs from the adapter file this output was made from (sha256 in {NAME})")
        elif len(used) < len(recorded):  # (nothing left to match: no need to hash it)
            have = {hash_file(f)["sha256"] for f in adapter_files(ap)}
            i = next((k for k, r in enumerate(recorded) if k not in used and have and have == digests(r)), None)
        if i is None:
            notes.append(f"{ap}: not an adapter this output was made from ({NAME} lists "
                         f"{', '.join(str(r.get('path')) for r in recorded) or 'none'})")
        else:
            used.add(i)
        match.append(i)
    missing = [str(r.get("path")) for k, r in enumerate(recorded) if k not in used]
    if missing:
        notes.append(f"this output was also made from {', '.join(missing)} ({NAME}), not given here")
    if None not in match and not missing:
        rec_w = [recorded[i].get("weight", 1.0) for i in match]
        giv_w = list(weights) if weights is not None else [1.0] * len(match)
        try:
            differ = len(rec_w) == len(giv_w) and any(float(a) != float(b) and not (math.isnan(float(a)) and math.isnan(
                float(b))) for a, b in zip(rec_w, giv_w))
        except (TypeError, ValueError):  # an edited manifest
            return notes + [f"{NAME}: its recorded weights are unreadable"]
        if differ:
            notes.append(f"this output was made with --weights {','.join(f'{float(w):g}' for w in rec_w)} ({NAME}), "
                         f"checked here with {','.join(f'{float(w):g}' for w in giv_w)}: pass the merge's weights")
    return notes


def _option_notes(recorded: dict, given: dict) -> list[str]:
    """Where the checker's options differ from the merge's: its failures are then expected."""
    def flag(opts: dict) -> str:
        if not opts.get("qlora"):
            return "no --qlora"
        return f"--qlora {opts['qlora']}" + ("" if opts.get("qlora_double_quant", True) else " --no-qlora-double-quant")

    if flag(recorded) != flag(given):
        return [f"this output was made with {flag(recorded)} ({NAME}), checked here with {flag(given)}: "
                "pass the merge's options"]
    return []
