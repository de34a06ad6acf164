"""The CLI's edge, shared by every command: how a command's result and its errors reach the user.

A command returns its report (or None). Without --json its summary goes to stdout; with --json
stdout carries exactly one JSON object, the report's to_json() under {"command": ...}, and
everything meant for people (summary, progress, warnings, anything a library prints) goes to
stderr. A report whose `ok` is false (verify found a wrong tensor) exits 1.

A LoraMergeError becomes one `Error: ...` line on stderr and exit 1 (2 for usage errors),
anything else an `internal error` line (exit 3); tracebacks only with --debug. With --json an
error also prints {"command": ..., "ok": false, "error": {"type", "message", "problems",
"exit_code"}} on stdout, so a script can always parse stdout.

Ctrl-C, SIGTERM and SIGHUP stop a command the same way (writers/signals.py): the staged output is
removed, `Error: interrupted ...`, exit 128 + the signal number (130, 143, 129).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading

import click

from ..errors import LoraMergeError, UsageError
from ..writers import signals


WRITING_COMMANDS = {"apply", "unmerge", "combine", "export-onnx"}  # verify and inspect write nothing


def handle_errors(fn):
    """Run a command (see the module docstring). Adds the options --json and --debug."""

    @click.option("--json", "as_json", is_flag=True,
                  help="Print one JSON object on stdout; progress, summaries and warnings go to stderr.")
    @click.option("--debug", is_flag=True, help="Show tracebacks.")
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, as_json: bool = False, **kwargs):
        ctx = click.get_current_context(silent=True)
        command = ctx.info_name if ctx is not None else fn.__name__
        try:
            with _stdout_to_stderr(as_json), signals.handling():
                report = fn(*args, **kwargs)
        except LoraMergeError as e:
            if debug:
                raise
            _fail(command, as_json, e, str(e), 2 if isinstance(e, UsageError) else 1)
        except KeyboardInterrupt as e:
            name = f" ({e})" if isinstance(e, signals.Terminated) else ""
            done = "; the output being written was removed" if command in WRITING_COMMANDS else ""
            _fail(command, as_json, e, f"interrupted{name}{done}", signals.exit_status(e))
        except MemoryError as e:
            if debug:
                raise
            _fail(command, as_json, e, "out of memory; merge on a device with more memory (e.g. --device cpu "
                  f"instead of a small GPU) or free memory ({type(e).__name__})", 1)
        except Exception as e:  # a bug, not a user error: still no traceback unless asked
            if debug:
                raise
            _fail(command, as_json, e, f"internal error: {type(e).__name__}: {e} (rerun with --debug for a "
                  "traceback and please report it)", 3)
        emit(command, report, as_json)

    return wrapper


def emit(command: str, report, as_json: bool) -> None:
    """Print a command's result; exit 1 if the report says it failed."""
    if as_json:
        if report is not None and hasattr(report, "summary"):
            click.echo(report.summary(), err=True)
        body = report.to_json() if report is not None else {"ok": True}
        click.echo(json.dumps({"command": command, **body}, indent=2, allow_nan=False))
    elif report is not None:
        click.echo(report.summary())
    if report is not None and not report.ok:
        sys.exit(1)


def _fail(command: str, as_json: bool, e: BaseException, message: str, code: int):
    interrupted = isinstance(e, KeyboardInterrupt)
    try:
        click.echo(f"Error: {message}", err=True)
        if as_json:
            error = {"type": type(e).__name__ if isinstance(e, LoraMergeError) else
                     ("interrupted" if interrupted else "internal"),
                     "message": getattr(e, "message", message) if isinstance(e, LoraMergeError) else message,
                     "problems": list(getattr(e, "problems", [])), "exit_code": code}
            click.echo(json.dumps({"command": command, "ok": False, "error": error}, indent=2))
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # SIGHUP: the terminal may be gone
        if not interrupted:
            raise
    if interrupted and any(t.name.startswith("loramerge-") and t.is_alive() for t in threading.enumerate()):
        # engine threads still finishing a tensor are daemons of a process that is done: exit now
        # instead of waiting for them (os._exit also skips an interpreter teardown they could crash)
        os._exit(code)
    sys.exit(code)


class Group(click.Group):
    """The command group. Click reports a command line it cannot parse (a missing argument, an
    unknown option or value) itself, before handle_errors runs: with --json among the command's
    arguments that error is also the JSON error object on stdout, so stdout always parses."""

    def parse_args(self, ctx, args):
        ctx.meta["loramerge.args"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            args = ctx.meta.get("loramerge.args", [])
            args = args[:args.index("--")] if "--" in args else args
            if "--json" not in args:
                raise
            e.show()
            command = args[0] if args and args[0] in self.commands else None
            error = {"type": "UsageError", "message": e.format_message(), "problems": [], "exit_code": e.exit_code}
            click.echo(json.dumps({"command": command, "ok": False, "error": error}, indent=2))
            sys.exit(e.exit_code)


@contextlib.contextmanager
def _stdout_to_stderr(active: bool):
    """While a --json command runs, whatever it (or a library) prints goes to stderr, so stdout
    holds only the JSON. Python-level always; file-descriptor level too when stdout is the
    process's real fd 1 (native libraries write there directly)."""
    if not active:
        yield
        return
    saved = None
    try:
        if sys.stdout.fileno() == 1:
            sys.stdout.flush()
            saved = os.dup(1)
            os.dup2(2, 1)
    except (AttributeError, OSError, ValueError):  # a captured stdout (tests) has no real descriptor
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
