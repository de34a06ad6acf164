"""Staging entries beside an output, who owns them, and cleaning up after runs that died.

A run writes OUT as `.OUT.loramerge-tmp-TAG` next to it (TAG = pid-random) and, while it runs,
holds an exclusive flock on `.OUT.loramerge-lock-TAG`, taken before the staging entry exists and
released by the kernel when the process ends, however it ends (SIGKILL, OOM killer, power loss:
the lock file survives, the lock does not). An `--overwrite` without an atomic exchange moves
the old OUT aside as `.OUT.loramerge-old-TAG` for the instant between two renames.

Every run sweeps the directory it writes into (sweep()): a TAG whose lock can be taken belongs
to a process that no longer exists. Its staging is removed; an interrupted swap is finished
(the new output is complete once `old` exists, so it goes into place; without it the old output
goes back). A lock that is held means a live run: never touched. Where flock is not available
(some network filesystems) the lock file's record decides instead: same host, and a process with
that pid and the same start time (since boot, from /proc) alive on this boot means alive; a pid
that is gone, or reused by a later process, means dead; anything that cannot be told (another
host, no /proc) is left alone. Entries from versions without lock files (TAG = pid-hex8) are
judged by their pid on this host.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the lock file's record decides
    fcntl = None

_ENTRY = re.compile(r"^\.(?P<name>.+)\.loramerge-(?P<kind>tmp|old|lock|trash|commit)-(?P<pid>\d+)-"
                    r"(?P<rand>[0-9a-f]{8,})$")


def new_tag() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def entry(final: Path, kind: str, tag: str) -> Path:
    return final.parent / f".{final.name}.loramerge-{kind}-{tag}"


# -- who is running -------------------------------------------------------------------------

def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def identity(pid: int | None = None) -> dict:
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "start": _start_time(pid)}


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _recorded_owner_alive(record: dict) -> bool | None:
    """From a lock file's record: True/False, or None when this machine cannot tell."""
    if record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int):
        return None
    if not _pid_exists(pid):
        return False
    boot = _boot_id()
    if record.get("boot_id") and boot and record["boot_id"] != boot:
        return False  # written before this machine last booted: that process is gone
    now, then = _start_time(pid), record.get("start")
    if now is None or then is None:
        return True  # the pid exists and we cannot tell whether it is the same process
    return now == then  # a different start time: the pid was reused


class Lock:
    """The flock a running output holds on its lock file for as long as it is staged."""

    def __init__(self, final: Path, tag: str):
        self.path = entry(final, "lock", tag)
        self.fd: int | None = None

    def acquire(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        locked = False
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError:
                pass  # e.g. ENOLCK on a filesystem without locks: the record below decides
        os.write(self.fd, json.dumps({**identity(), "locked": locked}).encode())

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def _owner_gone(parent: Path, tag: str, locks: list[Path], starting: bool) -> tuple[bool, list[int]]:
    """(whether the run that staged TAG has ended, the fds of its lock files, held by us to keep
    other sweepers out while we clean up). `starting`: nothing but a lock file is left, so it may
    be a run that is just starting: only a taken flock proves it gone."""
    if not locks:  # an older version's entry (or the owner removed its lock meanwhile)
        return not _pid_exists(int(tag.split("-")[0])), []
    fds = []
    for lock in locks:
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            break
        fds.append(fd)
        try:
            record = json.loads(os.read(fd, 4096) or b"{}")
        except ValueError:
            record = {}
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                break  # held: a live run
            except OSError:
                pass  # no locks here: fall back to the record
            else:
                if record.get("locked"):
                    continue
        if starting or _recorded_owner_alive(record) is not False:
            break
    else:
        return True, fds
    for fd in fds:
        os.close(fd)
    return False, []


def sweep(directory: Path) -> list[str]:
    """Clean up after runs into `directory` that ended without finishing (see module docstring).
    Returns one line per thing done."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    tags: dict[str, dict[str, set[str]]] = {}   # tag -> output name -> kinds of entry
    for n in names:
        m = _ENTRY.match(n)
        if m:
            tags.setdefault(f"{m['pid']}-{m['rand']}", {}).setdefault(m["name"], set()).add(m["kind"])
    done = []
    for tag, members in sorted(tags.items()):
        locks = [entry(directory / name, "lock", tag) for name, kinds in members.items() if "lock" in kinds]
        gone, fds = _owner_gone(directory, tag, locks, all(k == {"lock"} for k in members.values()))
        if not gone:
            continue
        committing = any("commit" in kinds for kinds in members.values())
        try:
            for name, kinds in sorted(members.items()):
                done += _finish(directory / name, tag, kinds, committing)
        except OSError as e:
            done.append(f"could not clean up after process {tag.split('-')[0]}: {e}")
        finally:
            for name, kinds in members.items():
                for kind in ("commit", "lock"):
                    if kind in kinds:
                        entry(directory / name, kind, tag).unlink(missing_ok=True)
            for fd in fds:
                os.close(fd)
    return done


def _finish(final: Path, tag: str, kinds: set[str], committing: bool) -> list[str]:
    tmp, old = entry(final, "tmp", tag), entry(final, "old", tag)
    pid = tag.split("-")[0]
    done = []
    if "tmp" in kinds and committing:
        # the run had finished every file of the output and was putting them in place
        install(tmp, final)
        done.append(f"{final}: put the complete output of process {pid} in place (it was interrupted while "
                    "committing it)")
    elif "old" in kinds and not (final.exists() or final.is_symlink()):
        # the crash came between moving the old output aside and moving the new one in
        if tmp.exists():
            os.rename(tmp, final)
            done.append(f"{final}: finished replacing it with the complete output of process {pid}, which "
                        "was interrupted between its two renames")
        else:
            os.rename(old, final)
            done.append(f"{final}: put back the previous output, which process {pid} had moved aside")
    for p in (old, tmp, entry(final, "trash", tag)):
        if p.exists() or p.is_symlink():
            remove(p)
            done.append(f"removed {p.name}, left by process {pid}, which is no longer running")
    return done


def install(new: Path, final: Path) -> None:
    """Put `new` at `final` in one atomic step where one exists: rename() replaces a file
    atomically; a directory (or a file where a directory is) needs an exchange. The previous
    output, if any, ends at `new`'s name, for the caller to remove."""
    if not (final.exists() or final.is_symlink()) or (not final.is_dir() and not new.is_dir()):
        os.replace(new, final)
    elif not exchange(new, final):
        raise OSError(errno.EOPNOTSUPP, "cannot replace a directory atomically here", str(final))


# -- atomic exchange -------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None
if sys.platform.startswith("linux"):
    try:
        _renameat2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).renameat2
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        _renameat2.restype = ctypes.c_int
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        _renameat2 = None


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step. False where the kernel, C library or
    filesystem cannot (the caller falls back to two renames); other failures raise."""
    if _renameat2 is None or os.environ.get("LORAMERGE_NO_EXCHANGE"):
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove(p: Path, trash: Path | None = None) -> None:
    """Remove a staging entry. A directory is first renamed to `trash`, so a writer thread that is
    still winding down cannot create files in it while it is being deleted."""
    if p.is_dir() and not p.is_symlink():
        doomed = p
        if trash is not None:
            try:
                os.rename(p, trash)
                doomed = trash
            except OSError:
                pass
        shutil.rmtree(doomed, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()
