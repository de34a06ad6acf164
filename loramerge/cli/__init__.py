"""Command line: parse, call one library function, print. Errors are turned into one
`Error: ...` line here, at the edge, and nowhere else."""

from __future__ import annotations

import functools
import math
import sys

import click

from .errors import LoraMergeError, UsageError


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected comma-separated numbers, e.g. 1,0.5,-1") from None
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"--weights {text!r}: weights must be finite numbers")
    return weights


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


def write_options(fn):
    """The options of the commands that write a merged checkpoint (apply, unmerge)."""
    for option in reversed([
        click.option("--device", default="auto", show_default=True,
                      help="auto, cpu, cuda, cuda:N, cuda:all, or a comma-separated list of devices."),
        click.option("--accum", default="float32", show_default=True, type=click.Choice(["float32", "float64"]),
                     help="Accumulation precision: bfloat16/float16 outputs are correctly rounded either way; "
                          "float64 makes float32 outputs correctly rounded too."),
        click.option("--shard-size", default=None,
                     help="Re-shard the output (e.g. 5GB); default mirrors the input checkpoint."),
        click.option("--overwrite", is_flag=True,
                     help="Replace OUT if it exists (only once the new output is complete)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]):
        fn = option(fn)
    return fn


def _enable_lora(text: str | None) -> tuple[bool, ...] | None:
    if text is None:
        return None
    try:
        return tuple(bool(int(x)) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--enable-lora {text!r}: expected 0/1 per row group, e.g. 1,0,1") from None


def adapter_options(fn):
    """Options that tell readers what some adapter formats do not store. The command receives
    them as one dict, `adapter_opts`, to pass on as keyword arguments (lora_alpha=..., ...)."""
    @click.option("--lora-alpha", type=float, default=None,
                  help="alpha for loralib checkpoints, which do not store it.")
    @click.option("--fan-in-fan-out/--no-fan-in-fan-out", "fan_in_fan_out", default=None,
                  help="loralib: weights stored [in, out] (GPT-2 Conv1D); only needed for square weights.")
    @click.option("--enable-lora", default=None,
                  help="loralib MergedLinear: which row groups the adapter covers, e.g. 1,0,1 (q and v of qkv).")
    @click.option("--only", default=None, help="Use only adapter targets whose name starts with this (e.g. lora_unet_).")
    @functools.wraps(fn)
    def wrapper(*args, lora_alpha, fan_in_fan_out, enable_lora, only, **kwargs):
        opts = dict(lora_alpha=lora_alpha, fan_in_fan_out=fan_in_fan_out, enable_lora=_enable_lora(enable_lora),
                    only=only)
        return fn(*args, adapter_opts=opts, **kwargs)

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
@write_options
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--verify", "run_verify", is_flag=True,
              help="Then run `loramerge verify` on OUT; exit 1 if the merged checkpoint does not check out.")
@adapter_options
@handle_errors
def apply_cmd(base, adapters, out, weights, dtype, device, accum, shard_size, dry_run, overwrite, quiet,
              run_verify, adapter_opts):
    """Merge ADAPTER(s) into BASE and write the merged checkpoint to OUT.

    ADAPTER is a PEFT adapter directory, a loralib checkpoint (needs --lora-alpha) or a kohya
    .safetensors file."""
    from .api import apply

    report = apply(base, list(adapters), out, weights=_weights(weights), dtype=dtype, device=device,
                   accum=accum, shard_size=shard_size, dry_run=dry_run, overwrite=overwrite,
                   progress=_show_progress(quiet), **adapter_opts)
    click.echo(report.summary())
    if run_verify and not dry_run:
        from .cli_verify import echo_report
        from .verify import verify

        echo_report(verify(base, list(adapters), out, weights=_weights(weights), device=device, **adapter_opts))


# Further commands register themselves here, one line each (keep this block; add, don't rewrite):
# COMMANDS-BEGIN
from .cli_algebra import register as _register_algebra; _register_algebra(main)  # noqa: E402,E702 combine, unmerge
from .cli_verify import verify_cmd; main.add_command(verify_cmd)  # noqa: E402,E702
from .cli_onnx import register as _register_onnx; _register_onnx(main)  # noqa: E402,E702 export-onnx
# COMMANDS-END

if __name__ == "__main__":
    main()
