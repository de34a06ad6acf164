"""Faults that arrive from outside (issue 14): signals, dead runs' staging, crashes between the
renames of an --overwrite, full disks. Real subprocesses receive real signals and real kills;
full disks are a fault-injecting os.write, a process file-size limit (RLIMIT_FSIZE: the kernel
refuses the write) and, where unprivileged user namespaces exist, a real tiny tmpfs.

Every test checks the same promises: a clear `Error:` line and the right exit status, no staging
left beside OUT, the inputs byte for byte as they were, and a previous OUT intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import adapter_dir, base_dir

import loramerge
from loramerge.cli import main
from loramerge.errors import OutputError
from loramerge.writers import staging

BASE, ADAPTER = base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16")


def digest_tree(p: Path, manifest: bool = True) -> dict[str, str]:
    """sha256 per file; manifest=False leaves out loramerge_manifest.json (it records when and from
    which paths an output was made, so two runs' manifests differ)."""
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                           and (manifest or f.name != "loramerge_manifest.json"))
    return {str(f.relative_to(p.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".loramerge-" in n)


@pytest.fixture
def inputs():
    before = {**digest_tree(BASE), **digest_tree(ADAPTER)}
    yield
    assert {**digest_tree(BASE), **digest_tree(ADAPTER)} == before, "an input changed"


@pytest.fixture
def previous(tmp_path):
    """A previous output at tmp_path/out, and its digests."""
    out = tmp_path / "out"
    loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), out)
    return out, digest_tree(out)


def cli(*args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loramerge", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kw)


def wait_for_staging(parent: Path, proc: subprocess.Popen, shards: int = 1, timeout: float = 60) -> None:
    """Until the staging directory holds `shards` files (the merge is well under way)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        tmp = [parent / n for n in os.listdir(parent) if ".loramerge-tmp-" in n]
        if tmp and tmp[0].is_dir() and sum(f.suffix == ".safetensors" for f in tmp[0].iterdir()) >= shards:
            return
        time.sleep(0.02)
    raise AssertionError("the merge never got under way")


# -- signals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_mid_merge_removes_staging_and_keeps_previous_output(sig, inputs, previous, tmp_path):
    out, before = previous
    # a slow disk (0.3 s per tensor): the merge of 4 shards is under way for seconds
    proc = cli("apply", BASE, ADAPTER, out, "--overwrite", env={"LORAMERGE_TEST_WRITE_DELAY": "0.3"})
    wait_for_staging(tmp_path, proc, shards=2)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - sent
    assert proc.returncode == 128 + sig, err
    assert err.startswith("Error: interrupted") and "Traceback" not in err, err
    if sig != signal.SIGINT:
        assert signal.Signals(sig).name in err
    assert leftovers(tmp_path) == [] and digest_tree(out) == before
    assert took < 5, f"took {took:.1f} s to stop"  # bench/bench_interrupt.py measures it properly


SLOW_IMPORT = """
import time
# an extension module's initialisation that swallows an exception raised inside it (torch's C
# init did: a SIGTERM during the CLI's import of torch was lost)
end = time.monotonic() + 1.5
while time.monotonic() < end:
    try:
        time.sleep(0.01)
    except BaseException:
        pass
DONE = True
"""

UNDER_HANDLING = """
import os, signal, sys, threading, time
directory, module, hold, name, times = sys.argv[1:]
sys.path.insert(0, directory)
from loramerge.writers import signals
signals.MAX_HOLD_SECONDS = float(hold)
def send():
    for _ in range(int(times)):  # 0.3 s apart, the first at 0.3 s
        time.sleep(0.3)
        os.kill(os.getpid(), getattr(signal, name))
threading.Thread(target=send, daemon=True).start()
t0 = time.monotonic()
try:
    with signals.handling():
        __import__(module)
        time.sleep(5)
    print("not interrupted", flush=True)
except KeyboardInterrupt as e:
    print("interrupted", type(e).__name__, getattr(sys.modules.get("slowmod"), "DONE", None),
          round(time.monotonic() - t0, 2), flush=True)
"""


def under_handling(tmp_path, module: str, hold: float, name: str, times: int) -> list[str]:
    """UNDER_HANDLING's words: `times` signals `name` while `module` (in tmp_path) is imported."""
    run = subprocess.run([sys.executable, "-c", UNDER_HANDLING, str(tmp_path), module, str(hold), name, str(times)],
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.startswith("interrupted"), run.stdout + run.stderr
    return run.stdout.split()


def test_a_signal_during_an_import_waits_for_it_and_is_not_lost(tmp_path):
    """A signal raised inside an import can be swallowed there (or leave the module half-imported):
    it is held until the import ends, then raised."""
    (tmp_path / "slowmod.py").write_text(SLOW_IMPORT)
    words = under_handling(tmp_path, "slowmod", 10, "SIGTERM", 1)
    assert words[1:3] == ["Terminated", "True"], words
    assert 1.4 < float(words[3]) < 3.0, words  # after the import (1.5 s), long before the 5 s sleep


HELD_TO_THE_END = """
import os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
from loramerge.writers import signals
signals.REDELIVER_SECONDS = 30  # no second delivery: only the block's end can raise it
threading.Thread(target=lambda: (time.sleep(0.3), os.kill(os.getpid(), signal.SIGTERM)), daemon=True).start()
try:
    with signals.handling():
        import slowmod  # the whole command is this import (an inspect that imports lazily)
    print("not interrupted", flush=True)
except KeyboardInterrupt as e:
    print("interrupted", type(e).__name__, flush=True)
"""

def test_a_signal_an_import_holds_to_the_end_of_the_command_is_raised_there(tmp_path):
    (tmp_path / "slowmod.py").write_text(SLOW_IMPORT)
    run = subprocess.run([sys.executable, "-c", HELD_TO_THE_END, str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert run.stdout.split() == ["interrupted", "Terminated"], run.stdout + run.stderr


def test_a_second_signal_during_an_import_is_held_too(tmp_path):
    """A scheduler's second SIGTERM (or a second Ctrl-C) during torch's import: raised there, it
    crashed the process (std::terminate) or was swallowed like the first."""
    (tmp_path / "slowmod.py").write_text(SLOW_IMPORT)
    words = under_handling(tmp_path, "slowmod", 10, "SIGINT", 2)
    assert words[1:3] == ["KeyboardInterrupt", "True"], words
    assert 1.4 < float(words[3]) < 3.0, words


def test_an_import_holds_a_signal_no_longer_than_max_hold(tmp_path):
    """A hung import (a dead network disk) does not hold a signal for ever."""
    (tmp_path / "hangs.py").write_text("import time\ntime.sleep(5)\n")
    words = under_handling(tmp_path, "hangs", 0.5, "SIGINT", 2)
    assert words[1] == "KeyboardInterrupt" and 0.7 < float(words[3]) < 3.0, words  # the hold, not the 5 s


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (Linux: SigCgt in its status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("after", [0.0, 0.2, 0.5])
def test_a_signal_in_the_first_second_stops_apply(after, inputs, tmp_path):
    """A SIGTERM just after the CLI installs its handlers (then it imports torch, for 1-5 s) stops
    the run as one later does: 143, nothing left. It was lost, or an internal error."""
    out = tmp_path / "out"
    proc = cli("apply", BASE, ADAPTER, out, "-q")
    end = time.monotonic() + 30
    while not _catches(proc.pid, signal.SIGTERM):  # not before: Python's default would just kill it
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.002)
    time.sleep(after)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.startswith("Error: interrupted (SIGTERM)") and "Traceback" not in err, err
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_signal_while_the_staging_is_set_up_leaves_nothing(tmp_path, monkeypatch):
    """A signal just after the lock file is made (inside Staged.__enter__, where no __exit__ runs)
    removes the lock file and the staging directory on its way out."""
    from loramerge.writers import signals
    from loramerge.writers.output import Staged

    acquire = staging.Lock.acquire

    def acquire_then_signal(self):
        acquire(self)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # where an undeferred handler runs (and raises)

    monkeypatch.setattr(staging.Lock, "acquire", acquire_then_signal)
    with pytest.raises(signals.Terminated), signals.handling():
        with Staged(tmp_path / "out", is_dir=True, overwrite=False):
            pass
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_a_live_runs_staging_is_never_touched_and_dead_ones_are_swept(inputs, tmp_path):
    slow = cli("apply", BASE, ADAPTER, tmp_path / "a", env={"LORAMERGE_TEST_WRITE_DELAY": "0.2"})
    wait_for_staging(tmp_path, slow)
    killed = cli("apply", BASE, ADAPTER, tmp_path / "b", env={"LORAMERGE_TEST_WRITE_DELAY": "0.2"})
    while not any(n.startswith(".b.loramerge-tmp-") for n in os.listdir(tmp_path)):
        time.sleep(0.02)
    killed.kill()  # SIGKILL: nothing can clean up; the kernel drops its lock
    killed.wait()
    stale = [n for n in leftovers(tmp_path) if n.startswith(".b.")]
    assert any(".loramerge-tmp-" in n for n in stale) and any(".loramerge-lock-" in n for n in stale)
    live = [n for n in leftovers(tmp_path) if n.startswith(".a.")]
    # a third run into the same directory sweeps b's staging and leaves a's alone
    report = loramerge.apply(BASE, ADAPTER, tmp_path / "c")
    assert any(f"left by process {killed.pid}" in w for w in report.warnings), report.warnings
    now = leftovers(tmp_path)
    assert not any(n.startswith(".b.") for n in now) and set(live) <= set(now)
    assert slow.wait(timeout=60) == 0, slow.communicate()
    assert leftovers(tmp_path) == [] and digest_tree(tmp_path / "a", False) == {
        k.replace("c/", "a/", 1): v for k, v in digest_tree(tmp_path / "c", False).items()}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _stage(parent: Path, name: str, tag: str, record: dict | None, kinds=("tmp",)) -> None:
    for kind in kinds:
        p = parent / f".{name}.loramerge-{kind}-{tag}"
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    if record is not None:
        (parent / f".{name}.loramerge-lock-{tag}").write_text(json.dumps(record))


def test_sweep_guards_against_pid_reuse_and_other_hosts(tmp_path):
    me = staging.identity()
    dead = _dead_pid()
    # lock files whose flock is free, written by processes that could not lock (locked: False),
    # so the record decides: a pid now used by a later process (us, started at another time) is
    # stale; our own live identity is not; another host's is not ours to judge
    _stage(tmp_path, "reused", f"{os.getpid()}-aaaaaaaaaaaa", {**me, "start": (me["start"] or 0) + 1, "locked": False})
    _stage(tmp_path, "alive", f"{os.getpid()}-bbbbbbbbbbbb", {**me, "locked": False})
    _stage(tmp_path, "remote", f"{dead}-cccccccccccc", {**me, "pid": dead, "host": "elsewhere", "locked": False})
    _stage(tmp_path, "gone", f"{dead}-dddddddddddd", {**me, "pid": dead, "locked": False})
    _stage(tmp_path, "oldboot", f"{os.getpid()}-eeeeeeeeeeee", {**me, "boot_id": "another-boot", "locked": False})
    # a lock file whose owner held the flock (locked: True) and is gone: the free flock decides,
    # whatever its pid says now
    _stage(tmp_path, "flocked", f"{os.getpid()}-ffffffffffff", {**me, "locked": True})
    # entries of versions without lock files (TAG = pid-hex8): their pid decides
    _stage(tmp_path, "v0dead", f"{dead}-0123abcd", None)
    _stage(tmp_path, "v0live", f"{os.getpid()}-0123abcd", None)
    done = staging.sweep(tmp_path)
    left = {n.split(".loramerge-")[0].lstrip(".") for n in leftovers(tmp_path)}
    assert left == {"alive", "remote", "v0live"}, (left, done)
    assert len([d for d in done if d.startswith("removed")]) == 5


def test_a_held_lock_means_alive(tmp_path):
    """The flock is the truth while it is held, whatever the record says."""
    final = tmp_path / "x"
    with staging_lock(final) as tag:
        _stage(tmp_path, "x", tag, None)
        assert staging.sweep(tmp_path) == []
        assert (tmp_path / f".x.loramerge-tmp-{tag}").is_dir()
    assert len(staging.sweep(tmp_path)) == 1 and leftovers(tmp_path) == []


class staging_lock:
    def __init__(self, final: Path):
        self.tag = staging.new_tag()
        self.lock = staging.Lock(final, self.tag)

    def __enter__(self):
        self.lock.acquire()
        # keep the lock file after release() so the sweep judges the entry by its free flock
        self.keep = self.lock.path.read_bytes()
        return self.tag

    def __exit__(self, *exc):
        self.lock.release()
        self.lock.path.write_bytes(self.keep)


# -- --overwrite: crash points -------------------------------------------------------------------

@pytest.mark.parametrize("exchange", [True, False])
def test_crash_during_overwrite_never_leaves_no_output(exchange, inputs, previous, tmp_path):
    out, before = previous
    expected = tmp_path / "expected"
    loramerge.apply(BASE, ADAPTER, expected)
    point = "after-commit" if exchange else "between-renames"
    env = {"LORAMERGE_TEST_CRASH": point, **({} if exchange else {"LORAMERGE_NO_EXCHANGE": "1"})}
    proc = cli("apply", BASE, ADAPTER, out, "--overwrite", env=env)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    if exchange:  # one atomic step: OUT is already the new output; the old one waits at the staging name
        assert digest_tree(out, False) == _as(digest_tree(expected, False), "out")
        assert any(".loramerge-tmp-" in n for n in leftovers(tmp_path))
    else:  # between the two renames: OUT is gone, the old and the complete new output are beside it
        assert not out.exists()
        kinds = {n.split(".loramerge-")[1].split("-")[0] for n in leftovers(tmp_path)}
        assert kinds == {"old", "tmp", "lock"}, leftovers(tmp_path)
    # the next run into this directory (here a dry run into another OUT) finishes the swap
    report = loramerge.apply(BASE, ADAPTER, tmp_path / "other", dry_run=True)
    assert leftovers(tmp_path) == []
    assert digest_tree(out, False) == _as(digest_tree(expected, False), "out")
    if not exchange:
        assert any("finished replacing it" in w for w in report.warnings), report.warnings


def test_crash_between_renames_before_the_new_output_is_in_place_puts_the_old_back(previous, tmp_path):
    """If only the moved-aside old output is left (the new one gone too), it goes back."""
    out, before = previous
    tag = f"{_dead_pid()}-0123456789ab"
    os.rename(out, tmp_path / f".out.loramerge-old-{tag}")
    (tmp_path / f".out.loramerge-lock-{tag}").write_text(json.dumps({**staging.identity(), "locked": True}))
    staging.sweep(tmp_path)
    assert digest_tree(out) == before and leftovers(tmp_path) == []


def _as(digests: dict, name: str) -> dict:
    return {name + "/" + k.split("/", 1)[1]: v for k, v in digests.items()}


# -- full disks ------------------------------------------------------------------------------------

class _Disk:
    """os.write / os.copy_file_range that fail with `err` once `budget` bytes went to files under
    `root` (other writes, e.g. pytest's, are untouched)."""

    def __init__(self, monkeypatch, root: Path, budget: int, err: int = errno.ENOSPC):
        self.root, self.budget, self.err = str(root), budget, err
        self.written = 0
        self._write, self._cfr = os.write, os.copy_file_range
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "copy_file_range", self.copy_file_range)

    def _mine(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self.root)
        except OSError:
            return False

    def _take(self, fd: int, n: int) -> None:
        if self._mine(fd):
            if self.written + n > self.budget:
                raise OSError(self.err, os.strerror(self.err))
            self.written += n

    def write(self, fd, data):
        self._take(fd, len(data))
        return self._write(fd, data)

    def copy_file_range(self, src, dst, count, offset_src=None, offset_dst=None):
        self._take(dst, count)
        return self._cfr(src, dst, count, offset_src, offset_dst)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_mid_write(err, inputs, previous, tmp_path, monkeypatch):
    out, before = previous
    disk = _Disk(monkeypatch, tmp_path, budget=BASE_BYTES() // 2, err=err)
    res = CliRunner().invoke(main, ["apply", str(BASE), str(ADAPTER), str(out), "--overwrite"])
    assert disk.written > 0
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: ") and "Traceback" not in res.output
    assert os.strerror(err) in res.output
    # named after OUT (not the staging), with the hint for this error, and not a guess
    assert res.output.startswith(f"Error: {out}: writing the output failed"), res.output
    assert ("the disk is full" if err == errno.ENOSPC else "quota is exhausted") in res.output, res.output
    assert leftovers(tmp_path) == [] and digest_tree(out) == before


def test_fsync_failing_at_close_is_a_write_error(inputs, tmp_path, monkeypatch):
    """Delayed allocation: write() succeeded, the disk says no at fsync."""
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".safetensors"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OutputError, match="Input/output error"):
        loramerge.apply(BASE, ADAPTER, tmp_path / "out")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def BASE_BYTES() -> int:
    return sum(f.stat().st_size for f in BASE.glob("*.safetensors"))


def test_file_size_limit_is_a_clear_error(inputs, previous, tmp_path):
    """The kernel refuses the write (EFBIG) past RLIMIT_FSIZE, mid-shard: no injection involved."""
    import resource

    out, before = previous
    limit = min(f.stat().st_size for f in BASE.glob("*.safetensors")) // 2

    def limit_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = cli("apply", BASE, ADAPTER, out, "--overwrite", preexec_fn=limit_size)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert err.startswith("Error: ") and "File too large" in err and "Traceback" not in err, err
    assert "ulimit -f" in err and "disk is full" not in err, err
    assert leftovers(tmp_path) == [] and digest_tree(out) == before


def _userns_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _userns_tmpfs(), reason="no unprivileged user namespaces to mount a small tmpfs")
def test_real_tiny_filesystem_fills_mid_write(inputs, tmp_path):
    """A 2 MiB tmpfs, mounted in a user namespace, with a previous output on it and ballast that
    leaves room for the tensors (so the free-space check passes) but not for all of the output."""
    script = tmp_path / "inside.py"
    script.write_text(f"""
import hashlib, json, os, subprocess, sys
from pathlib import Path
d = Path(sys.argv[1])
def tree(p):
    return {{str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.rglob("*")) if f.is_file()}}
subprocess.run([sys.executable, "-m", "loramerge", "apply", {str(base_dir("llama-fp32"))!r},
                {str(adapter_dir("llama-basic"))!r}, str(d / "out")], check=True, capture_output=True)
before = tree(d / "out")
need = sum(f.stat().st_size for f in Path({str(BASE)!r}).glob("*.safetensors"))
free = os.statvfs(d).f_bavail * os.statvfs(d).f_frsize
(d / "ballast").write_bytes(b"0" * max(0, free - need - 4096))
r = subprocess.run([sys.executable, "-m", "loramerge", "apply", {str(BASE)!r}, {str(ADAPTER)!r}, str(d / "out"),
                    "--overwrite"], capture_output=True, text=True)
print(json.dumps({{"rc": r.returncode, "err": r.stderr, "left": sorted(os.listdir(d)),
                   "same": tree(d / "out") == before}}))
""")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=2m tmpfs {mnt} && "
                        f"{sys.executable} {script} {mnt}"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(loramerge.__file__).parent.parent)})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 1 and res["err"].startswith("Error: ") and "No space left on device" in res["err"], res
    assert res["left"] == ["ballast", "out"] and res["same"], res


def test_crash_between_the_files_of_an_onnx_output_is_finished_by_the_next_run(tmp_path):
    """A folded graph with external data is two files, committed together: a crash after the
    first rename leaves a marker that makes the next run put the second in place too."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import onnx

    from test_onnx import _load, export_graph

    g = export_graph(_load("llama-fp32"), "logits", "torchscript", tmp_path / "g0.onnx")
    src = tmp_path / "ext.onnx"
    onnx.save(onnx.load(str(g)), str(src), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    out, ref = tmp_path / "out" / "f.onnx", tmp_path / "ref" / "f.onnx"
    for d in (out.parent, ref.parent):
        d.mkdir()
    args = [src, "-a", adapter_dir("llama-basic"), "--base", base_dir("llama-fp32")]
    loramerge.export_onnx(src, out, [adapter_dir("llama-rslora")], base=base_dir("llama-fp32"))  # the previous
    subprocess.run([sys.executable, "-m", "loramerge", "export-onnx", src, ref, *args[1:]], check=True)
    proc = cli("export-onnx", src, out, *args[1:], "--overwrite", env={"LORAMERGE_TEST_CRASH": "after-commit"})
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    # the data file is the new one, the model still the previous one: an inconsistent pair...
    assert (out.parent / "f.onnx.data").read_bytes() == (ref.parent / "f.onnx.data").read_bytes()
    assert out.read_bytes() != ref.read_bytes()
    assert {n.split(".loramerge-")[1].split("-")[0] for n in leftovers(out.parent)} == {"commit", "tmp", "lock"}
    # ...until the next run into that directory finishes the commit
    staging.sweep(out.parent)
    assert out.read_bytes() == ref.read_bytes() and leftovers(out.parent) == []


def test_a_signal_to_a_command_that_writes_nothing_says_only_interrupted(tmp_path):
    """verify and inspect write no output: their interrupt line does not claim to have removed one."""
    merged = tmp_path / "m"
    loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), merged)
    stall = ("import sys, time, loramerge.verifier as v\n"
             "def slow(*a, **k):\n    print('ready', file=sys.stderr, flush=True); time.sleep(60)\n"
             "v.verify = slow\n"
             "from loramerge.cli import main\nmain()")
    proc = subprocess.Popen([sys.executable, "-c", stall, "verify", str(base_dir("llama-fp32")),
                             str(adapter_dir("llama-basic")), str(merged), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert err.strip() == "Error: interrupted (SIGTERM)", err
    assert json.loads(out)["error"] == {"type": "interrupted", "message": "interrupted (SIGTERM)", "problems": [],
                                        "exit_code": 143}


def test_too_little_space_says_how_much_in_units_that_show_it(tmp_path, monkeypatch):
    """A small output on a nearly full disk: the figures are readable (it said 0.00 GB against 0.00 GB)."""
    import collections

    from loramerge.writers import output
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 286_720, 286_720))
    with pytest.raises(OutputError) as e:
        output.check_disk_space(tmp_path / "out", 578_312)
    assert str(e.value) == (f"{tmp_path}: the output needs 578.31 KB but only 286.72 KB is free (291.59 KB short); "
                            "free space or choose another disk")
    output.check_disk_space(tmp_path / "out", 286_720)  # exactly enough
