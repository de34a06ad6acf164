"""ONNX: fold adapters into an existing graph, or export a (merged) checkpoint with torch.onnx.

Needs the `onnx` extra (onnx, onnxruntime, onnxscript); export also needs `hf` (transformers).
Importing loramerge does not import onnx: the submodules are loaded when used.

Modules: graph (reading/writing one .onnx file and its external data), targets (what a fold works
on), match (which initializer holds which base tensor: one function per strategy), content
(whether an initializer holds a tensor's values), shared (initializers several modules use),
patch (fold), lora_graph (--keep-lora side branches), feeds (inputs for those), export
(torch.onnx + validation), runtime (onnxruntime providers, IR/opset limits, comparisons),
ort_adapter (onnxruntime .onnx_adapter files for --keep-lora --lora-inputs graphs).
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


def export_onnx(src: str | os.PathLike, out: str | os.PathLike, adapters=(), *, revision: str | None = None,
                **options):
    """One entry point for every way into ONNX Runtime.

    src is a .onnx file: fold `adapters` into that graph (only initializer values change); options:
    weights, base (checkpoint for content matching), strict, keep_lora, lora_inputs, device,
    overwrite, verify, adapter_opts.
    src is a model directory: export it (merged with `adapters`, if any) with torch.onnx and
    validate with onnxruntime; options: weights, dtype, opset, exporter, keep_lora, lora_inputs,
    validate, atol, rtol, device, overwrite, adapter_opts.
    With keep_lora and lora_inputs, each adapter is also written as an onnxruntime adapter file
    next to `out` (<out stem>.<adapter name>.onnx_adapter; see ort_adapter.py).
    out ends in .onnx_adapter: write `adapters` as one onnxruntime adapter file for src, a graph
    made with keep_lora and lora_inputs; options: weights, base, adapter_opts, overwrite.
    src, base and adapters may be Hugging Face Hub ids (`revision` for those without @REV).
    Returns an OnnxReport.
    """
    from ..engine.precision import exact_matmul

    with exact_matmul():  # IEEE float32 matmuls for all the merge math below (engine/precision.py)
        return _export(src, out, adapters, revision, options)


def _export(src, out, adapters, revision, options):
    import time

    from ..readers import hub

    t0 = time.perf_counter()
    _require_onnx()
    specs = [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
    src = hub.resolve(src, "auto", revision)
    adapters = hub.resolve_all(specs, "adapter", revision)
    if options.get("base") is not None:
        options["base"] = hub.resolve(options["base"], "base", revision)
    out = Path(out)
    if out.suffix == ".onnx_adapter":
        return _adapter_file(src, out, adapters, options, t0)
    per_adapter = []
    if options.get("keep_lora") and options.get("lora_inputs"):
        from ..writers.output import check_output_path
        from .ort_adapter import adapter_file_paths

        per_adapter = adapter_file_paths(out, specs)
        guarded = [src, *adapters] + ([options["base"]] if options.get("base") is not None else [])
        for p in per_adapter:  # before anything is written
            check_output_path(p, guarded, bool(options.get("overwrite")))
    if src.is_dir():
        from .export import export_model
        report = export_model(src, out, adapters, **options)
    elif src.suffix.lower() == ".onnx" or src.is_file():
        from .patch import fold
        report = fold(src, out, adapters, **options)
    elif not src.exists():
        raise UsageError(f"{src}: not found; pass a base .onnx graph (to fold into) or a model directory (to export)")
    else:
        raise UsageError(f"{src}: expected a .onnx file or a model directory")
    if per_adapter:
        from .ort_adapter import write_adapter_files

        base = options.get("base") if not src.is_dir() else src
        write_adapter_files(out, specs, adapters, weights=options.get("weights"), base=base,
                            adapter_opts=options.get("adapter_opts"), overwrite=bool(options.get("overwrite")))
        report.adapter_files = [p.name for p in per_adapter]
        report.seconds = time.perf_counter() - t0
    return report


def _adapter_file(src: Path, out: Path, adapters, options: dict, t0: float):
    import time

    from .ort_adapter import write_adapter
    from .patch import OnnxReport

    unused = sorted(k for k, v in options.items() if k not in ("weights", "base", "adapter_opts", "overwrite", "device")
                    and v not in (None, False))
    if unused:
        raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in unused)}: not used when writing an "
                         f"onnxruntime adapter file ({out.name})")
    write_adapter(src, out, adapters, weights=options.get("weights"), base=options.get("base"),
                  adapter_opts=options.get("adapter_opts"), overwrite=bool(options.get("overwrite")))
    return OnnxReport(out=out, mode="onnx-adapter", files=[out.name], adapter_files=[out.name],
                      notes=[f"for {src.name}: activate with RunOptions.add_active_adapter"],
                      seconds=time.perf_counter() - t0)


def __getattr__(name):  # lazy re-exports: loramerge.onnx.fold, .export_model, .compare_graphs, ...
    table = {"fold": "patch", "OnnxReport": "patch", "export_model": "export", "compare_graphs": "runtime",
             "sample_inputs": "runtime", "runtime_limits": "runtime", "lora_feeds": "feeds"}
    if name in table:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{table[name]}"), name)
    raise AttributeError(name)
