"""Where a cold CLI's first seconds go: the premerge worker's messages, the head start's writes
and the merge's takes on one timeline (seconds since this process started).

trace_pipeline.py traces a merge in a process that has imported torch already; this one runs the
CLI itself, cold, as users do, with the premerge worker's and the head start's methods wrapped to
log when each result came, was written early or taken, and when the plan sent its order. Those
modules are the standard-library ones the CLI imports before torch, so the wrapping changes no
order of imports. (`copies_done` and `results_end` come only where a premerge worker runs: they
mark the head start's turn from its copies to the worker's results.)

  python bench/trace_cold.py TRACE.json apply BASE ADAPTER OUT [apply's options]
"""

from __future__ import annotations

import atexit
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loramerge.engine import premerge, timeline  # noqa: E402  (standard library only)
from loramerge.writers import headstart  # noqa: E402

EVENTS: list[tuple[float, str, str]] = []


def _log(kind: str, name: str = "") -> None:
    EVENTS.append((round(timeline.since_start(), 3), kind, name))  # list.append: atomic under the GIL


def _wrap(cls, attr: str, before=None, after=None) -> None:
    orig = getattr(cls, attr)

    def wrapped(self, *args, **kwargs):
        if before:
            before(self, *args)
        out = orig(self, *args, **kwargs)
        if after:
            after(self, out, *args)
        return out
    setattr(cls, attr, wrapped)


def _on_message(self, msg):
    kind = next(iter(msg), "")
    _log("worker:" + kind, msg[kind] if isinstance(msg.get(kind), str) else "")


_wrap(premerge.Premerge, "_on", before=_on_message)
_wrap(premerge.Premerge, "want", before=lambda self, names: _log("order"))
_wrap(premerge.Premerge, "written_early", after=lambda self, out, name, got: _log("written_early", name))
_wrap(premerge.Premerge, "take", after=lambda self, out, job, *a: _log("taken" if out else "not_taken", job.name))
_wrap(headstart.HeadStart, "_write_premerged", before=lambda self: _log("copies_done"),
      after=lambda self, out: _log("results_end"))
_wrap(headstart.HeadStart, "stop", before=lambda self: _log("head_stop"))


def _dump(path: Path) -> None:
    path.write_text(json.dumps(EVENTS))
    first = {}
    for t, kind, _ in EVENTS:
        first.setdefault(kind, [t, 0])[1] += 1
    last = {kind: t for t, kind, _ in EVENTS}
    for kind, (t, n) in sorted(first.items(), key=lambda kv: kv[1][0]):
        print(f"trace: {kind:24s} x{n:4d}  first {t:7.3f} s  last {last[kind]:7.3f} s", file=sys.stderr)


if __name__ == "__main__":
    atexit.register(_dump, Path(sys.argv[1]))
    sys.argv = ["loramerge", *sys.argv[2:]]
    from loramerge.cli import run
    run()
