"""`loramerge apply`: merge adapters into a base checkpoint."""

from __future__ import annotations

import click

from .. import import_heavy
from .errors import handle_errors
from .options import (adapter_options, parse_weights, qlora_options, revision_option, show_progress,
                      write_options)


@click.command("apply")
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
@qlora_options
@adapter_options
@revision_option
@handle_errors
def apply_cmd(base, adapters, out, weights, dtype, device, accum, shard_size, dry_run, overwrite, quiet,
              run_verify, qlora_opts, adapter_opts, revision):
    """Merge ADAPTER(s) into BASE and write the merged checkpoint to OUT.

    ADAPTER is a PEFT adapter directory, a loralib checkpoint (needs --lora-alpha) or a kohya
    .safetensors file. BASE and ADAPTER may be Hugging Face Hub ids (OWNER/NAME[@REV]). BASE may be
    an FP8 block-scaled checkpoint (kept FP8 with --dtype auto: requantized with fresh scales) or a
    bitsandbytes 4-bit one (dequantized)."""
    from ..engine import premerge
    from ..readers.prefetch import prefetch
    from ..writers import headstart

    weights = parse_weights(weights)
    prefetch(base, adapters)  # the disk reads ahead while the next line imports torch
    # and writes: a process without torch merges ahead on the CPU (engine/premerge.py), and the
    # tensors no adapter touches, then that process's results, go to the output meanwhile
    # (writers/headstart.py)
    with premerge.running(base, adapters, weights=weights, dtype=dtype, device=device, accum=accum,
                          dry_run=dry_run or bool(qlora_opts.get("qlora")), revision=revision) as pre, \
            headstart.running(base, adapters, out, dtype=dtype, shard_size=shard_size, dry_run=dry_run,
                              overwrite=overwrite, revision=revision, premerge=pre) as head:
        apply = import_heavy("loramerge.api").apply
        report = apply(base, list(adapters), out, weights=weights, dtype=dtype, device=device,
                       accum=accum, shard_size=shard_size, dry_run=dry_run, overwrite=overwrite,
                       progress=show_progress(quiet), revision=revision, _head_start=head, _premerge=pre,
                       **qlora_opts, **adapter_opts)
    if run_verify and not dry_run:
        verify = import_heavy("loramerge.verifier").verify

        report.verification = verify(base, list(adapters), out, weights=weights, device=device,
                                     revision=revision, **qlora_opts, **adapter_opts)
    return report
