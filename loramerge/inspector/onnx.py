"""inspect: ONNX graphs (read without their external data) and onnxruntime .onnx_adapter files."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import OnnxError
from ..report import human_bytes
from .kinds import Kind, counts

# ONNX TensorProto data type -> bytes per element (the types initializers use)
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 17: 1, 18: 1,
             19: 1, 20: 1}


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise OnnxError("inspecting an ONNX graph needs the onnx package: pip install 'loramerge[onnx]'") from e
    return onnx


def _value_info(onnx, vi) -> dict:
    t = vi.type.tensor_type
    shape = [d.dim_param or d.dim_value for d in t.shape.dim] if t.HasField("shape") else None
    return {"name": vi.name, "type": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": shape}


def describe_onnx(path: Path, fmt: str, options: dict) -> dict:
    onnx = _onnx()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for a broken file
        raise OnnxError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    g = model.graph
    inits = {t.name for t in g.initializer}
    external = sorted({e.value for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                       for e in t.external_data if e.key == "location"})
    nbytes = 0
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= d
        nbytes += n * _ITEMSIZE.get(t.data_type, 0)
    meta = {p.key: p.value for p in model.metadata_props}
    ours = {}
    for key, value in meta.items():
        if key.startswith("loramerge."):
            try:
                ours[key[len("loramerge."):]] = json.loads(value)
            except ValueError:
                ours[key[len("loramerge."):]] = value
    branches = ours.get("lora_branches")
    lora_inputs = sorted(i.name for i in g.input if i.name.startswith(("lora_down.", "lora_up.")))
    return {
        "ir_version": model.ir_version,
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x) or None,
        "inputs": [_value_info(onnx, i) for i in g.input if i.name not in inits],
        "outputs": [_value_info(onnx, o) for o in g.output],
        "nodes": len(g.node),
        "ops": counts(n.op_type for n in g.node),
        "initializers": len(g.initializer),
        "initializer_bytes": nbytes,
        "external_data": external,
        "lora_branches": sum(len(v) for v in branches.values()) if isinstance(branches, dict) else 0,
        "lora_inputs": lora_inputs,
        "loramerge": ours,
    }


def text_onnx(d: dict) -> list[str]:
    opset = ", ".join(f"{k} {v}" for k, v in d["opset"].items())
    lines = [f"IR {d['ir_version']}, opset {opset}" + (f", by {d['producer']}" if d["producer"] else ""),
             f"{d['nodes']} nodes, {d['initializers']} initializers ({human_bytes(d['initializer_bytes'])}"
             + (f" in {', '.join(d['external_data'])}" if d["external_data"] else "") + ")"]
    for io in ("inputs", "outputs"):
        shown = [f"{v['name']} {v['type']}{v['shape']}" for v in d[io] if not v["name"].startswith("lora_")]
        lines.append(f"{io}: " + ", ".join(shown))
    if d["lora_branches"]:
        lines.append(f"LoRA side branches (--keep-lora): {d['lora_branches']}"
                     + (f", factors as inputs ({len(d['lora_inputs'])}): serve .onnx_adapter files"
                        if d["lora_inputs"] else ""))
    if "folded" in d["loramerge"]:
        lines.append(f"adapters folded in by loramerge: {d['loramerge']['folded']}")
    return lines


def describe_adapter_file(path: Path, fmt: str, options: dict) -> dict:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise OnnxError("inspecting an .onnx_adapter file needs onnxruntime: pip install 'loramerge[onnx]'") from e
    try:
        a = ort.AdapterFormat.read_adapter(str(path))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        raise OnnxError(f"{path}: not a readable onnxruntime adapter file ({type(e).__name__}: {e})") from e
    params = a.get_parameters()
    return {
        "format_version": a.get_format_version(),
        "adapter_version": a.get_adapter_version(),
        "model_version": a.get_model_version(),
        "parameters": [{"name": k, "type": v.data_type(), "shape": list(v.shape())} for k, v in sorted(params.items())],
        "bytes": path.stat().st_size,
    }


def text_adapter_file(d: dict) -> list[str]:
    nonzero = [p for p in d["parameters"] if p["shape"] and p["name"].startswith("lora_down.")]
    return [f"{len(d['parameters'])} parameters ({human_bytes(d['bytes'])}), {len(nonzero)} LoRA branches; "
            "activate with onnxruntime RunOptions.add_active_adapter"]


ONNX_ADAPTER = Kind("onnx_adapter", lambda p: "onnx_adapter" if p.is_file() and p.suffix == ".onnx_adapter" else None,
                    describe_adapter_file, text_adapter_file, noun="file (onnxruntime LoRA adapter)")
ONNX = Kind("onnx", lambda p: "onnx" if p.is_file() and p.suffix.lower() == ".onnx" else None,
            describe_onnx, text_onnx, noun="graph")
