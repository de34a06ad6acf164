"""CLI command `export-onnx`: fold adapters into an existing ONNX graph, or export a checkpoint.
The first argument decides the mode: a .onnx file -> fold; a directory
-> export with torch.onnx."""

from __future__ import annotations

import click

from ..errors import UsageError
from .errors import handle_errors
from .options import adapter_options, parse_weights, revision_option

FOLD_ONLY = ("base", "strict", "verify")
EXPORT_ONLY = ("dtype", "opset", "exporter", "atol", "rtol", "no_validate")


@click.command("export-onnx")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--adapter", "-a", "adapters", multiple=True, type=click.Path(),
              help="LoRA adapter to fold in (repeatable; export mode: optional).")
@click.option("--weights", help="Comma-separated weight per adapter (default 1 each; negative allowed).")
@click.option("--base", type=click.Path(),
              help="Fold mode: the checkpoint the graph was exported from. Finds renamed/transposed weights "
                   "(onnx::MatMul_N, val_N) by content and merges from its exact values.")
@click.option("--strict", is_flag=True, help="Fold mode: an adapter target missing from the graph is an error, not a warning.")
@click.option("--keep-lora", is_flag=True,
              help="Do not fold: emit the graph with LoRA side branches (x·Aᵀ·Bᵀ·s added after each target MatMul).")
@click.option("--lora-inputs", is_flag=True,
              help="With --keep-lora: the LoRA factors are also graph inputs (defaults = the adapters), to swap at run "
                   "time; each adapter is also written as OUT_STEM.NAME.onnx_adapter for onnxruntime's multi-LoRA.")
@click.option("--verify", is_flag=True,
              help="Fold mode: also build the other variant (--keep-lora or folded) and compare outputs with onnxruntime.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Export mode: dtype to trace in (default float32).")
@click.option("--opset", type=int, help="Export mode: ONNX opset (default: the exporter's, capped at what onnxruntime loads).")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]),
              help="Export mode: torch.onnx exporter (default dynamo).")
@click.option("--atol", type=float, help="Export mode: absolute tolerance of the onnxruntime-vs-PyTorch check.")
@click.option("--rtol", type=float, help="Export mode: relative tolerance of the onnxruntime-vs-PyTorch check.")
@click.option("--no-validate", is_flag=True, help="Export mode: skip the onnxruntime-vs-PyTorch check.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (merge math; onnxruntime checks).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new model is complete).")
@adapter_options
@revision_option
@handle_errors
def export_onnx_cmd(src, out, adapters, weights, base, strict, keep_lora, lora_inputs, verify, dtype, opset,
                    exporter, atol, rtol, no_validate, device, overwrite, adapter_opts, revision):
    """Fold ADAPTERs into the ONNX graph SRC (a .onnx file), changing only initializer values, or
    export the model directory SRC (merged with the ADAPTERs) with torch.onnx; write OUT (.onnx).

    OUT ending in .onnx_adapter: write the ADAPTERs as one onnxruntime LoRA adapter file for SRC, a
    graph made with --keep-lora --lora-inputs. SRC, --base and ADAPTERs may be Hugging Face Hub ids."""
    from ..onnx import export_onnx
    from ..readers import hub

    given = {"base": base, "strict": strict, "verify": verify, "dtype": dtype, "opset": opset,
             "exporter": exporter, "atol": atol, "rtol": rtol, "no_validate": no_validate}
    src = hub.resolve(src, "auto", revision)  # a Hub id: the mode follows what it resolves to
    export_mode = src.is_dir()
    wrong = [k for k in (FOLD_ONLY if export_mode else EXPORT_ONLY) if given[k] not in (None, False)]
    if wrong:
        opts = ", ".join("--" + k.replace("_", "-") for k in wrong)
        mode = "exporting a model directory" if export_mode else "folding into an .onnx graph"
        raise UsageError(f"{opts}: not used when {mode} (SRC {src} is a {'directory' if export_mode else 'file'})")
    common = dict(weights=parse_weights(weights), keep_lora=keep_lora, lora_inputs=lora_inputs, device=device,
                  overwrite=overwrite, adapter_opts=adapter_opts, revision=revision)
    if export_mode:
        report = export_onnx(src, out, list(adapters), dtype=dtype or "float32", opset=opset,
                             exporter=exporter or "dynamo", validate=not no_validate, atol=atol, rtol=rtol, **common)
    else:
        report = export_onnx(src, out, list(adapters), base=base, strict=strict, verify=verify, **common)
    return report
