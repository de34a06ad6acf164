"""CLI command `verify`: check a merged checkpoint against its inputs."""

from __future__ import annotations

import click

from .. import import_heavy
from .errors import handle_errors
from .options import adapter_options, parse_weights, qlora_options, revision_option


@click.command("verify")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.argument("merged", type=click.Path())
@click.option("--weights", help="The weights the merge used, comma-separated (default 1 each).")
@click.option("--outputs/--no-outputs", default=True, show_default=True,
              help="Also compare layer outputs and (with transformers) model outputs against the unmerged adapter.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--oracle", type=click.Choice(["peft"]), default=None,
              help="Also compare every tensor with PEFT's own merge (merge_and_unload in float64); needs peft "
                   "and transformers, and the model in memory.")
@qlora_options
@adapter_options
@revision_option
@handle_errors
def verify_cmd(base, adapters, merged, weights, outputs, device, oracle, qlora_opts, adapter_opts, revision):
    """Check that MERGED is BASE with ADAPTER(s) merged in: every tensor against the float64
    expected value (dtype-aware tolerance), how much of each delta the output dtype kept, and
    layer/model outputs against the adapter applied unmerged. Exit 0 when everything is within
    tolerance, 1 otherwise (the failing lines name the tensor and the numbers). --json prints the
    report as JSON instead of the table. BASE may be FP8 or bitsandbytes 4-bit (read through their
    codecs); an FP8 MERGED is checked against the nearest FP8 values; --qlora checks a QLoRA merge
    and says how far a plain merge would be from it. Expected values come from verify's own
    reading of the adapter files, cross-checked with apply's; --oracle peft adds PEFT's merge."""
    verify = import_heavy("loramerge.verifier").verify

    return verify(base, list(adapters), merged, weights=parse_weights(weights), outputs=outputs, device=device,
                  revision=revision, oracle=oracle, **qlora_opts, **adapter_opts)
