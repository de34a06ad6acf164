"""onnxruntime's multi-LoRA adapter files (`.onnx_adapter`, written with onnxruntime.AdapterFormat)
for graphs made with `--keep-lora --lora-inputs`: one graph, many adapters, switched per request.

Such a graph takes every LoRA branch's factors as inputs (lora_down.<tag> [in, r], lora_up.<tag>
[r, out], r symbolic) whose defaults are initializers. An adapter file holds a value for EVERY
one of those inputs: the adapter's own factors (scale and weight folded into lora_up) where it
has a target, rank-1 zeros on branches it does not touch. So activating a file gives exactly
that adapter, never a leftover default on some other branch:

    adapter = onnxruntime.LoraAdapter(); adapter.Load("served.style.onnx_adapter")
    options = onnxruntime.RunOptions(); options.add_active_adapter(adapter)
    session.run(None, inputs, options)

One file is active per run (onnxruntime refuses two active adapters that set the same input).
The values are feeds.lora_input_values', the same ones lora_feeds gives as numpy arrays.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import OnnxError, UsageError
from ..writers.output import Staged, check_output_path
from .feeds import lora_input_values

SUFFIX = ".onnx_adapter"
_BF16 = 16  # onnx.TensorProto.BFLOAT16


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise OnnxError("writing .onnx_adapter files needs onnxruntime: pip install 'loramerge[onnx]'") from e
    if not hasattr(onnxruntime, "AdapterFormat"):
        raise OnnxError(f"onnxruntime {onnxruntime.__version__} has no AdapterFormat (multi-LoRA adapters came in "
                        "onnxruntime 1.20); upgrade it: pip install -U onnxruntime")
    return onnxruntime


def _ortvalue(ort, t: torch.Tensor):
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: pass the bits with onnx's type code
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.uint16).numpy(), _BF16)
    return ort.OrtValue.ortvalue_from_numpy(t.numpy())


def write_adapter(graph, out, adapters, *, weights: list[float] | None = None, base=None,
                  adapter_opts: dict | None = None, overwrite: bool = False, inputs: list | None = None) -> Path:
    """Write `adapters` (times `weights`, summed) as one .onnx_adapter file for the --keep-lora
    --lora-inputs graph `graph`. `inputs`: paths the output must not clobber (default: graph,
    adapters, base)."""
    ort = _ort()
    out = Path(out)
    if out.suffix != SUFFIX:
        raise UsageError(f"{out}: name the adapter file *{SUFFIX} (onnxruntime's LoRA adapter format)")
    adapter_list = [adapters] if isinstance(adapters, (str, Path)) else list(adapters)
    if not adapter_list:
        raise UsageError(f"no adapter given: pass --adapter ADAPTER to write {out.name}")
    guarded = inputs if inputs is not None else [Path(graph), *map(Path, adapter_list)] + \
        ([Path(base)] if base is not None else [])
    check_output_path(out, guarded, overwrite)
    values = lora_input_values(graph, adapter_list, weights=weights, base=base, adapter_opts=adapter_opts)
    fmt = ort.AdapterFormat()
    fmt.set_parameters({name: _ortvalue(ort, v) for name, v in values.items()})
    staged = Staged(out, is_dir=False, overwrite=overwrite)
    with staged as tmp:
        fmt.export_adapter(str(tmp))
        staged.commit()
    return out


def adapter_file_paths(graph_out: Path, specs) -> list[Path]:
    """One .onnx_adapter path per adapter next to the graph: <graph stem>.<adapter name>.onnx_adapter,
    the name taken from the adapter as the user named it (folder, file stem or Hub repo name)."""
    graph_out = Path(graph_out)
    seen: dict[str, int] = {}
    paths = []
    for spec in specs:
        name = Path(str(spec).rstrip("/")).name
        for suffix in (".safetensors", ".bin", ".pt", ".pth"):
            name = name.removesuffix(suffix)
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name.split("@")[0]) or "adapter"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        paths.append(graph_out.with_name(f"{graph_out.stem}.{name}{SUFFIX}"))
    return paths


def write_adapter_files(graph_out: Path, specs, adapter_paths, *, weights: list[float] | None = None, base=None,
                        adapter_opts: dict | None = None, overwrite: bool = False) -> list[Path]:
    """Each adapter (with its own weight) as its own .onnx_adapter file for the graph just written."""
    weights = list(weights) if weights is not None else [1.0] * len(adapter_paths)
    outs = adapter_file_paths(graph_out, specs)
    guarded = [Path(graph_out), *map(Path, adapter_paths)] + ([Path(base)] if base is not None else [])
    for out in outs:
        check_output_path(out, guarded, overwrite)
    for out, adapter, w in zip(outs, adapter_paths, weights):
        write_adapter(graph_out, out, [adapter], weights=[w], base=base, adapter_opts=adapter_opts,
                      overwrite=overwrite, inputs=guarded)
    return outs
