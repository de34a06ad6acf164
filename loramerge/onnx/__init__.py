"""ONNX: fold adapters into an existing graph, or export a (merged) checkpoint with torch.onnx.

Needs the `onnx` extra (onnx, onnxruntime, onnxscript); export also needs `hf` (transformers).
Importing loramerge does not import onnx: the submodules are loaded when used.

Modules: graph (reading/writing one .onnx file and its external data), match (which initializer
holds which base tensor), patch (fold), lora_graph (--keep-lora side branches), export
(torch.onnx + validation), runtime (onnxruntime providers, IR/opset limits, comparisons).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LoraMergeError, UsageError


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise LoraMergeError("the onnx package is not installed; install it with: pip install 'loramerge[onnx]'") from e


def export_onnx(src: str | os.PathLike, out: str | os.PathLike, adapters=(), **options):
    """One entry point for both ways into ONNX Runtime.

    src is a .onnx file: fold `adapters` into that graph (only initializer values change); options:
    weights, base (checkpoint for content matching), strict, keep_lora, lora_inputs, device,
    overwrite, verify, adapter_opts.
    src is a model directory: export it (merged with `adapters` first, if any) with torch.onnx and
    validate with onnxruntime; options: weights, dtype, opset, exporter, keep_lora, lora_inputs,
    validate, atol, rtol, device, overwrite, adapter_opts.
    Returns an OnnxReport.
    """
    _require_onnx()
    src = Path(src)
    if src.is_dir():
        from .export import export_model
        return export_model(src, out, adapters, **options)
    if src.suffix.lower() == ".onnx" or src.is_file():
        from .patch import fold
        return fold(src, out, adapters, **options)
    if not src.exists():
        raise UsageError(f"{src}: not found; pass a base .onnx graph (to fold into) or a model directory (to export)")
    raise UsageError(f"{src}: expected a .onnx file or a model directory")


def __getattr__(name):  # lazy re-exports: loramerge.onnx.fold, .export_model, .compare_graphs, ...
    table = {"fold": "patch", "OnnxReport": "patch", "export_model": "export", "compare_graphs": "runtime",
             "sample_inputs": "runtime", "runtime_limits": "runtime", "lora_feeds": "lora_graph"}
    if name in table:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{table[name]}"), name)
    raise AttributeError(name)
