"""Options and argument parsing shared by several commands."""

from __future__ import annotations

import functools
import math
import sys

import click

from ..errors import UsageError


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected comma-separated numbers, e.g. 1,0.5,-1") from None
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"--weights {text!r}: weights must be finite numbers")
    return weights


def write_options(fn):
    """The options of the commands that write a merged checkpoint (apply, unmerge)."""
    for option in reversed([
        click.option("--device", default="auto", show_default=True,
                      help="auto, cpu, cuda, cuda:N, cuda:all, or a comma-separated list of devices."),
        click.option("--accum", default="float32", show_default=True, type=click.Choice(["float32", "float64"]),
                     help="Precision of the first pass of the merge math. bfloat16/float16 outputs are correctly "
                          "rounded either way (what the first pass cannot decide is redone in float64, then "
                          "exactly); float64 makes float32 outputs correctly rounded too."),
        click.option("--shard-size", default=None,
                     help="Re-shard the output (e.g. 5GB); default mirrors the input checkpoint."),
        click.option("--overwrite", is_flag=True,
                     help="Replace OUT if it exists (only once the new output is complete)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]):
        fn = option(fn)
    return fn


def parse_enable_lora(ctx, param, text: str | None) -> tuple[bool, ...] | None:
    """--enable-lora's value (a click callback: a bad one is a usage error like any option's, one
    line with --json's error object too, not an exception from outside the command)."""
    if text is None:
        return None
    parts = [x.strip() for x in text.split(",")]
    if not all(x in ("0", "1") for x in parts):
        raise click.BadParameter(f"{text!r}: expected 0 or 1 per row group, comma-separated, e.g. 1,0,1")
    return tuple(x == "1" for x in parts)


def adapter_options(fn):
    """Options that tell readers what some adapter formats do not store. The command receives
    them as one dict, `adapter_opts`, to pass on as keyword arguments (lora_alpha=..., ...)."""
    @click.option("--lora-alpha", type=float, default=None,
                  help="alpha for loralib checkpoints, which do not store it.")
    @click.option("--fan-in-fan-out/--no-fan-in-fan-out", "fan_in_fan_out", default=None,
                  help="loralib: weights stored [in, out] (GPT-2 Conv1D); only needed for square weights.")
    @click.option("--enable-lora", default=None, callback=parse_enable_lora,
                  help="loralib MergedLinear: which row groups the adapter covers, e.g. 1,0,1 (q and v of qkv).")
    @click.option("--only", default=None, help="Use only adapter targets whose name starts with this (e.g. lora_unet_).")
    @functools.wraps(fn)
    def wrapper(*args, lora_alpha, fan_in_fan_out, enable_lora, only, **kwargs):
        opts = dict(lora_alpha=lora_alpha, fan_in_fan_out=fan_in_fan_out, enable_lora=enable_lora,
                    only=only)
        return fn(*args, adapter_opts=opts, **kwargs)

    return wrapper


def revision_option(fn):
    """--revision: for the arguments that are Hugging Face Hub ids (readers/hub.py)."""
    return click.option(
        "--revision", default=None,
        help="Branch, tag or commit of the arguments that are Hugging Face Hub ids (OWNER/NAME) and have no "
             "@REV of their own. A local path always wins over a Hub id of the same spelling.")(fn)


def qlora_options(fn):
    """--qlora and its two modifiers; the command receives them as one dict, `qlora_opts` (apply's and
    verify's keyword arguments qlora=, qlora_double_quant=, qlora_kernel=)."""
    @click.option("--qlora", type=click.Choice(["nf4", "fp4"]), default=None,
                  help="The adapter was trained with QLoRA: merge into the bitsandbytes 4-bit round trip of the "
                       "base (what the adapter saw), not the base itself.")
    @click.option("--no-qlora-double-quant", "qlora_double_quant", is_flag=True, flag_value=False, default=True,
                  help="With --qlora: the training config had bnb_4bit_use_double_quant=False.")
    @click.option("--qlora-kernel", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
                  help="With --qlora: reproduce bitsandbytes' CUDA kernels (where QLoRA trains) or its CPU ones; "
                       "they differ in rare roundings.")
    @functools.wraps(fn)
    def wrapper(*args, qlora, qlora_double_quant, qlora_kernel, **kwargs):
        opts = dict(qlora=qlora, qlora_double_quant=qlora_double_quant, qlora_kernel=qlora_kernel)
        return fn(*args, qlora_opts=opts, **kwargs)

    return wrapper


def show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()
