"""onnxruntime glue: which execution provider, which IR version/opset the installed runtime
loads, inputs for a smoke run, and comparing two graphs' outputs.

IR version and opset: onnxruntime has no API that says the newest IR version it reads, and a
table of releases goes stale. We ask the runtime itself: a one-node model is loaded at
decreasing IR versions (and opsets) until it is accepted (about 10 ms, once per process). An
exported model stamped newer than that is re-stamped down when it uses no type the older IR
version lacks (torch's exporters stamp the newest IR onnx knows even for plain float graphs).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import OnnxError

# Element types introduced with each IR version (a model using them cannot be re-stamped lower).
_TYPES_SINCE_IR = {
    9: {"FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ"},
    10: {"UINT4", "INT4"},
    11: {"FLOAT4E2M1"},
}


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise OnnxError("onnxruntime is not installed; install it with: pip install 'loramerge[onnx]' "
                        "(or onnxruntime-gpu for CUDA)") from e
    return onnxruntime


def cuda_available() -> bool:
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return True


def providers(device: str = "auto") -> list[str]:
    """CUDA (onnxruntime-gpu installed and a GPU present) then CPU; CPU only otherwise."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if cuda_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.startswith("cuda"):
        raise OnnxError(f"--device {device}: onnxruntime has no usable CUDAExecutionProvider here (install "
                        "onnxruntime-gpu on a machine with a GPU) ; use --device cpu")
    return ["CPUExecutionProvider"]


def session(path: str | os.PathLike, device: str = "auto", threads: int | None = None):
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), so, providers=providers(device))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxError(f"{path}: onnxruntime {ort.__version__} cannot load this model ({msg})") from e


@functools.lru_cache(maxsize=None)
def runtime_limits() -> tuple[int, int]:
    """(newest IR version, newest default-domain opset) the installed onnxruntime loads."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 4

    def loads(ir: int, opset: int) -> bool:
        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = ir
        try:
            ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return True
        except Exception:
            return False

    max_ir = next((ir for ir in range(onnx.IR_VERSION, 3, -1) if loads(ir, 13)), 7)
    max_opset = next((o for o in range(onnx.defs.onnx_opset_version(), 12, -1) if loads(max_ir, o)), 13)
    return max_ir, max_opset


def _types_used(model: onnx.ModelProto) -> set[str]:
    used = set()

    def visit(g):
        for t in g.initializer:
            used.add(TensorProto.DataType.Name(t.data_type))
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type"):
                used.add(TensorProto.DataType.Name(vi.type.tensor_type.elem_type))
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    used.add(TensorProto.DataType.Name(a.t.data_type))
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)
    visit(model.graph)
    return used


def fit_ir_version(model: onnx.ModelProto) -> str | None:
    """Lower model.ir_version to what onnxruntime loads, when nothing in it needs the newer IR.
    Returns a note when it changed something; raises when the model cannot be loaded at all."""
    max_ir, _ = runtime_limits()
    if model.ir_version <= max_ir:
        return None
    used = _types_used(model)
    needs = [t for ir, types in _TYPES_SINCE_IR.items() if ir > max_ir for t in types & used]
    if needs:
        raise OnnxError(f"the model uses {', '.join(sorted(needs))}, which needs IR version > {max_ir}, the newest "
                        f"the installed onnxruntime reads; upgrade onnxruntime")
    old = model.ir_version
    model.ir_version = max_ir
    return f"IR version {old} -> {max_ir} (the newest the installed onnxruntime loads)"


# -- running ---------------------------------------------------------------------------------

_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
       TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.BOOL: np.bool_}


def sample_inputs(path: str | os.PathLike, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible inputs for a transformer graph: token ids within the embedding table, an
    attention mask of ones with padding at the end of the last row, zero token types."""
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    vocab = {}
    for node in g.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in inits:
            vocab.setdefault(node.input[1], int(inits[node.input[0]].dims[0]))
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in g.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(batch if i == 0 else seq)
        dtype = _NP.get(tt.elem_type)
        if dtype is None:
            raise OnnxError(f"{path}: graph input {vi.name!r} has type "
                            f"{TensorProto.DataType.Name(tt.elem_type)}; pass inputs explicitly")
        name = vi.name.lower()
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
        elif "mask" in name:
            m = np.ones(dims, dtype=dtype)
            if len(dims) == 2 and dims[0] > 1 and dims[1] > 2:
                m[-1, -2:] = 0
            feeds[vi.name] = m
        elif "token_type" in name:
            feeds[vi.name] = np.zeros(dims, dtype=dtype)
        elif "position" in name:
            feeds[vi.name] = np.broadcast_to(np.arange(dims[-1], dtype=dtype), dims).copy()
        else:
            feeds[vi.name] = rng.integers(0, vocab.get(vi.name, 2), size=dims).astype(dtype)
    return feeds


@dataclass
class Comparison:
    max_abs: float
    max_rel: float                       # max |a - b| / max |b|, per output, worst
    outputs: list[str] = field(default_factory=list)
    provider: str = ""

    def ok(self, rtol: float) -> bool:
        return self.max_rel <= rtol


def compare_graphs(a: str | os.PathLike, b: str | os.PathLike, feeds: dict | None = None,
                   device: str = "auto") -> Comparison:
    """Run two graphs with the same inputs (default: sample_inputs of `b`) and compare every output."""
    feeds = feeds if feeds is not None else sample_inputs(b)
    sa, sb = session(a, device), session(b, device)
    names_a = [o.name for o in sa.get_outputs()]
    names_b = [o.name for o in sb.get_outputs()]
    if names_a != names_b:
        raise OnnxError(f"{a} and {b} have different outputs ({names_a} vs {names_b}); they are not the same model")
    in_a = {i.name for i in sa.get_inputs()}
    oa = sa.run(None, {k: v for k, v in feeds.items() if k in in_a})
    in_b = {i.name for i in sb.get_inputs()}
    ob = sb.run(None, {k: v for k, v in feeds.items() if k in in_b})
    return _compare(oa, ob, names_a, sa.get_providers()[0])


def _compare(oa, ob, names, provider="") -> Comparison:
    max_abs = max_rel = 0.0
    for x, y in zip(oa, ob):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            raise OnnxError(f"output shapes differ: {x.shape} vs {y.shape}")
        d = float(np.abs(x - y).max()) if x.size else 0.0
        scale = float(np.abs(y).max()) if y.size else 0.0
        max_abs = max(max_abs, d)
        max_rel = max(max_rel, d / scale if scale > 0 else (0.0 if d == 0 else float("inf")))
    return Comparison(max_abs, max_rel, list(names), provider)


def op_counts(path_or_model) -> dict[str, int]:
    from collections import Counter
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else \
        onnx.load(str(path_or_model), load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node))


def is_onnx_path(p: str | os.PathLike) -> bool:
    return Path(p).suffix.lower() == ".onnx"
