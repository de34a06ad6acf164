"""CLI commands for adapter arithmetic: `combine` and `unmerge`."""

from __future__ import annotations

import click

from .. import import_heavy
from .errors import handle_errors
from .options import adapter_options, parse_weights, revision_option, show_progress, write_options

METHOD_HELP = ("cat/linear: exact weighted sum (rank = sum of ranks); svd: optimal rank-R approximation; "
               "ties, dare_linear, dare_ties: the papers' merges, re-factored to rank R.")


@click.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--weights", help="Comma-separated weight per adapter (default 1 each; negative allowed).")
@click.option("--method", default="cat", show_default=True,
              type=click.Choice(["cat", "linear", "svd", "ties", "dare_linear", "dare_ties"]), help=METHOD_HELP)
@click.option("--rank", type=click.IntRange(min=1), help="Rank of the result (svd, ties, dare_*; required there).")
@click.option("--density", type=float, help="Fraction of entries each task vector keeps (ties, dare_*; required there).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for dare_* (the same seed gives the same adapter).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new adapter is complete).")
@revision_option
@handle_errors
def combine_cmd(adapters, out, weights, method, rank, density, seed, overwrite, revision):
    """Combine ADAPTER(s) into one PEFT LoRA adapter at OUT (loadable by PEFT and `apply`)."""
    combine = import_heavy("loramerge.arithmetic").combine

    report = combine(list(adapters), out, weights=parse_weights(weights), method=method, rank=rank,
                     density=density, seed=seed, overwrite=overwrite, revision=revision)
    return report


@click.command("unmerge")
@click.argument("merged", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--weights", help="The weights the merge used, comma-separated (default 1 each).")
@write_options
@click.option("--dry-run", is_flag=True, help="Print the plan and the recovery bounds; write nothing.")
@adapter_options
@revision_option
@handle_errors
def unmerge_cmd(merged, adapters, out, weights, device, accum, shard_size, dry_run, overwrite, quiet,
                adapter_opts, revision):
    """Subtract ADAPTER(s) from the MERGED checkpoint and write the result to OUT; prints what can
    and cannot be recovered."""
    from ..readers.prefetch import prefetch
    from ..writers import headstart

    prefetch(merged, adapters)  # the disk reads ahead while the next line imports torch
    # and untouched tensors are written meanwhile (writers/headstart.py; apply's dtype: auto)
    with headstart.running(merged, adapters, out, shard_size=shard_size, dry_run=dry_run,
                           overwrite=overwrite, revision=revision) as head:
        unmerge = import_heavy("loramerge.api").unmerge
        report = unmerge(merged, list(adapters), out, weights=parse_weights(weights), device=device, accum=accum,
                         shard_size=shard_size, dry_run=dry_run, overwrite=overwrite, progress=show_progress(quiet),
                         revision=revision, _head_start=head, **adapter_opts)
    return report
