"""Command line: parse, call one library function, print. Errors are turned into one
`Error: ...` line here, at the edge, and nowhere else."""

from __future__ import annotations

import functools
import sys

import click

from .errors import LoraMergeError, UsageError


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected comma-separated numbers, e.g. 1,0.5,-1") from None


def handle_errors(fn):
    """Run a command; user errors become `Error: ...` + exit 1 (2 for usage), no traceback
    unless --debug."""

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
            click.echo("Error: interrupted; no output was left behind", err=True)
            sys.exit(130)
        except Exception as e:  # a bug, not a user error: still no traceback unless asked
            if debug:
                raise
            click.echo(f"Error: internal error: {type(e).__name__}: {e} (rerun with --debug for a "
                       "traceback and please report it)", err=True)
            sys.exit(3)

    return wrapper


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loramerge")
def main():
    """Fold LoRA adapters into base model weights: streaming, exact, in bounded memory."""


@main.command("apply")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--weights", help="Comma-separated weight per adapter (default 1 each; negative allowed).")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Output dtype; auto keeps each base tensor's own dtype.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--accum", default="float32", show_default=True, type=click.Choice(["float32", "float64"]),
              help="Accumulation precision (half-precision outputs are correctly rounded either way).")
@click.option("--shard-size", default=None, help="Re-shard the output (e.g. 5GB); default mirrors the base.")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new output is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@handle_errors
def apply_cmd(base, adapters, out, weights, dtype, device, accum, shard_size, dry_run, overwrite, quiet):
    """Merge ADAPTER(s) into BASE and write the merged checkpoint to OUT."""
    from .api import apply

    report = apply(base, list(adapters), out, weights=_weights(weights), dtype=dtype, device=device,
                   accum=accum, shard_size=shard_size, dry_run=dry_run, overwrite=overwrite,
                   progress=_show_progress(quiet))
    click.echo(report.summary())


# Further commands register themselves here, one line each (keep this block; add, don't rewrite):
# COMMANDS-BEGIN
# COMMANDS-END

if __name__ == "__main__":
    main()
