"""The CLI's error edge: a LoraMergeError becomes one `Error: ...` line and exit 1 (2 for usage
errors), anything else an `internal error` line; tracebacks only with --debug."""

from __future__ import annotations

import functools
import sys

import click

from ..errors import LoraMergeError, UsageError


def handle_errors(fn):
    """Run a command; user errors become `Error: ...` + exit 1 (2 for usage), no traceback
    unless --debug (an option this decorator adds to the command)."""

    @click.option("--debug", is_flag=True, help="Show tracebacks.")
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoraMergeError as e:
            if debug:
                raise
            click.echo(f"Error: {e}", err=True)
            sys.exit(2 if isinstance(e, UsageError) else 1)
        except KeyboardInterrupt:
            click.echo("Error: interrupted; the output being written was removed", err=True)
            sys.exit(130)
        except MemoryError as e:
            if debug:
                raise
            click.echo("Error: out of memory; merge on a device with more memory (e.g. --device cpu instead "
                       f"of a small GPU) or free memory ({type(e).__name__})", err=True)
            sys.exit(1)
        except Exception as e:  # a bug, not a user error: still no traceback unless asked
            if debug:
                raise
            click.echo(f"Error: internal error: {type(e).__name__}: {e} (rerun with --debug for a "
                       "traceback and please report it)", err=True)
            sys.exit(3)

    return wrapper
