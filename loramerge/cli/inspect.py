"""`loramerge inspect`: what a checkpoint, adapter, ONNX graph or .onnx_adapter file is."""

from __future__ import annotations

import click

from .errors import handle_errors
from .options import adapter_options, revision_option


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--base", type=click.Path(),
              help="For an adapter: the checkpoint to match its targets against (which base tensor each hits, "
                   "and what would not match), exactly as apply would.")
@adapter_options
@revision_option
@handle_errors
def inspect_cmd(path, base, adapter_opts, revision):
    """Describe PATH: a base checkpoint (dtypes, shards, tensors, bytes, quantization), a LoRA adapter
    (PEFT, loralib, kohya: every target with module, rank, alpha, scale), an ONNX graph, or an
    onnxruntime .onnx_adapter file. PATH and --base may be Hugging Face Hub ids (OWNER/NAME[@REV])."""
    from ..inspector import inspect

    return inspect(path, base=base, revision=revision, **adapter_opts)
