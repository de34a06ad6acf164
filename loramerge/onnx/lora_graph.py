"""--keep-lora: the base graph with LoRA side branches instead of folded weights.

For every node that uses a target's initializer as a weight (MatMul's right operand, Gemm's B,
Gather's table), the branch computes the adapter's contribution from the node's own input and
adds it to the node's output:

    MatMul(x, W0) -> y      becomes      MatMul(x, W0) -> y_base
                                         MatMul(MatMul(x, U), V) -> d        (U [in, R], V [R, out])
                                         Add(y_base, d) -> y

with U @ V = the delta of W0 in W0's own layout (scale and per-adapter weights folded into V),
so the graph's values and consumers are unchanged. Base weights stay unmerged. With
lora_inputs=True, U and V are also graph inputs (their initializers become defaults that
onnxruntime lets callers override), so adapters can be swapped at run time; the rank axis is
symbolic. The mapping target -> (U, V) is recorded in the model's metadata_props.
"""

from __future__ import annotations

import json

import onnx
import torch
from onnx import helper

from ..engine import deltas, tuners
from ..errors import OnnxError
from ..types import Adapter
from .datafile import tensor_bytes
from .graph import TORCH_TO_ONNX, OnnxGraph
from .targets import Match, Target

META_KEY = "loramerge.lora_branches"


def _factors(m: Match, adapters: list[Adapter]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(U, V, bias delta or None) with U @ V = the delta of this target's part of the initializer,
    in the initializer's layout (block only, not embedded), float64."""
    t = m.target
    lefts, rights, bias = [], [], None
    for term in t.terms:
        if term.kind == "replace":
            raise OnnxError(f"{t.name}: the adapter replaces this tensor with a saved full copy "
                            "(modules_to_save); that is no side branch: fold it (drop --keep-lora)")
        if term.kind == "rows":
            raise OnnxError(f"{t.name}: the adapter replaces trained token rows of this tensor "
                            "(trainable_token_indices); that is no side branch: fold it (drop --keep-lora)")
        if term.pair is not None and term.pair.magnitude_key:
            raise OnnxError(f"{t.name}: DoRA rescales the whole weight, which is no additive side branch; "
                            "fold it instead (drop --keep-lora)")
        if term.kind == "bias":
            d = term.factor * adapters[term.adapter].tensors[term.pair.bias_key].to(torch.float64)
            bias = d if bias is None else bias + d
            continue
        if term.kind in ("delta", "scale") and not tuners.is_lowrank(term.pair):
            raise OnnxError(f"{t.name}: {term.pair.tuner} ({adapters[term.adapter].label}) is no low-rank side branch "
                            f"({'it scales the weight' if term.kind == 'scale' else 'its delta is full rank'}), so "
                            "--keep-lora (and fold --verify, which compares against it) cannot express it; fold "
                            "without --verify and check the result with `loramerge verify`")
        if term.kind == "delta":  # AdaLoRA, VeRA: B diag(e) A, e folded into the left factor
            left, right, per_rank = tuners.lowrank(adapters[term.adapter], term.pair, t.shape)
            left = left * per_rank
        else:
            left, right = deltas.factors(adapters[term.adapter], term.pair, torch.float64)
        lefts.append(left * term.factor)
        rights.append(right)
    if not lefts:
        return None, None, bias
    left, right = torch.cat(lefts, dim=1), torch.cat(rights, dim=0)
    if len(t.shape) != 2:
        raise OnnxError(f"{t.name}: --keep-lora supports 2-D weights (Linear, Conv1D, embeddings), not "
                        f"{list(t.shape)}")
    # delta2d = left @ right in W's layout; the initializer holds W or W.T
    return (right.T, left.T, bias) if m.transposed else (left, right, bias)


def _embed(m: Match, u: torch.Tensor, v: torch.Tensor, init_shape: tuple[int, ...]):
    """Place a block's U/V in the whole packed initializer's coordinates (zeros elsewhere)."""
    if m.block is None:
        return u, v
    axis, start = m.block
    if axis == 0:
        full = u.new_zeros((init_shape[0], u.shape[1]))
        full[start:start + u.shape[0]] = u
        return full, v
    full = v.new_zeros((v.shape[0], init_shape[1]))
    full[:, start:start + v.shape[1]] = v
    return u, full


def _plans(graph: OnnxGraph, matches: list[Match], adapters: list[Adapter], targets: list[Target]):
    """initializer -> (U, V, bias delta or None, matches): U @ V is the initializer's delta, in its
    layout (blocks of a packed initializer embedded), float64."""
    by_init: dict[str, list[Match]] = {}
    bias_by_module: dict[str, Match] = {}
    for t in targets:
        if all(term.kind == "bias" for term in t.terms):
            bias_by_module[t.module] = Match(t, "", False, "bias")
    for m in matches:
        if all(term.kind == "bias" for term in m.target.terms):
            continue
        by_init.setdefault(m.init, []).append(m)

    plans = {}  # init -> (U, V, bias delta in the output space)
    for init, ms in by_init.items():
        shape = graph.shape(init)
        us, vs, bias = [], [], None
        for m in ms:
            u, v, b = _factors(m, adapters)
            bm = bias_by_module.pop(m.target.module, None)
            if bm is not None:
                _, _, b2 = _factors(bm, adapters)
                b = b2 if b is None else b + b2
            if b is not None and m.block is not None:
                raise OnnxError(f"{m.target.name}: a trained LoRA bias (lora_bias) on a packed weight cannot be "
                                "kept as a branch; fold it instead (drop --keep-lora)")
            if u is None:
                continue
            u, v = _embed(m, u, v, shape)
            us.append(u)
            vs.append(v)
            if b is not None:
                bias = b if bias is None else bias + b
        if us:
            plans[init] = (torch.cat(us, dim=1), torch.cat(vs, dim=0), bias, ms)
    # biases left in bias_by_module belong to weights not in the graph: reported as missing targets
    return plans


def add_branches(graph: OnnxGraph, matches: list[Match], adapters: list[Adapter], targets: list[Target],
                 lora_inputs: bool = False) -> int:
    """Add side branches for `matches` to graph.model in place. `targets` are all targets (a
    trained bias is added on its weight's branch, whether or not the bias tensor is in the graph).
    Returns the number of branches."""
    g = graph.model.graph
    plans = _plans(graph, matches, adapters, targets)

    new_inits: list[onnx.TensorProto] = []
    new_inputs: list[onnx.ValueInfoProto] = []
    inserted: dict[int, list[onnx.NodeProto]] = {}
    meta: dict[str, list] = {}
    made: dict[tuple, tuple[str, str]] = {}
    count = 0
    for k, (init, (u, v, bias, ms)) in enumerate(plans.items()):
        dtype = graph.dtype(init)
        consumers = graph.uses(init)
        if not consumers:
            raise OnnxError(f"{graph.path}: initializer {init} is not used by any node of the main graph; "
                            "--keep-lora cannot place a branch for it")
        names_t = sorted({m.target.name for m in ms})
        tag = _safe(names_t[0].rsplit(".", 1)[0]) if len(names_t) == 1 else f"packed{k}"
        for node, idx, kind, alpha in _sites(graph, consumers, init):
            uu, vv = (v.T, u.T) if kind == "gemm_transB" else (u, v)
            if alpha != 1.0:
                vv = vv * alpha
            key = (init, kind, alpha)
            if key not in made:
                names = (f"lora_down.{tag}" + (f".{len(made)}" if len(made) else ""),
                         f"lora_up.{tag}" + (f".{len(made)}" if len(made) else ""))
                for name, val in zip(names, (uu, vv)):
                    val = val.to(dtype).contiguous()
                    new_inits.append(_tensor(name, val))
                    if lora_inputs:
                        dims = [val.shape[0], f"lora_rank_{tag}"] if name.startswith("lora_down") \
                            else [f"lora_rank_{tag}", val.shape[1]]
                        new_inputs.append(helper.make_tensor_value_info(name, TORCH_TO_ONNX[dtype], dims))
                made[key] = names
                meta.setdefault(init, []).append({"targets": names_t, "down": names[0], "up": names[1],
                                                  "usage": kind, "alpha": alpha})
            down, up = made[key]
            x = node.input[0] if kind != "gather" else node.input[1]
            y = node.output[0]
            base_out = f"{y}__lora_base"
            node.output[0] = base_out
            p = f"/lora/{tag}/{count}"
            if kind == "gather":
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                if axis != 0:
                    raise OnnxError(f"{graph.path}: {init} is used by Gather on axis {axis}; --keep-lora supports "
                                    "embedding lookups (axis 0) only")
                first = helper.make_node("Gather", [down, x], [p + "/down"], name=p + "/Gather", axis=0)
            else:
                first = helper.make_node("MatMul", [x, down], [p + "/down"], name=p + "/MatMul_down")
            nodes = [first, helper.make_node("MatMul", [p + "/down", up], [p + "/up"], name=p + "/MatMul_up")]
            delta = p + "/up"
            if bias is not None:
                if kind == "gather" or bias.shape[0] != vv.shape[1]:
                    raise OnnxError(f"{', '.join(names_t)}: the trained LoRA bias does not fit the output of node "
                                    f"{node.name!r}; fold it instead (drop --keep-lora)")
                bname = f"lora_bias.{tag}"
                if not any(t.name == bname for t in new_inits):
                    new_inits.append(_tensor(bname, bias.to(dtype)))
                nodes.append(helper.make_node("Add", [delta, bname], [p + "/bias"], name=p + "/Add_bias"))
                delta = p + "/bias"
            nodes.append(helper.make_node("Add", [base_out, delta], [y], name=p + "/Add"))
            inserted.setdefault(id(node), []).extend(nodes)
            count += 1

    all_nodes = []
    for node in g.node:
        all_nodes.append(node)
        all_nodes.extend(inserted.get(id(node), ()))
    del g.node[:]
    g.node.extend(all_nodes)
    g.initializer.extend(new_inits)
    g.input.extend(new_inputs)
    prior = [p for p in graph.model.metadata_props if p.key == META_KEY]
    for p in prior:
        graph.model.metadata_props.remove(p)
    onnx.helper.set_model_props(graph.model, {**{p.key: p.value for p in graph.model.metadata_props},
                                              META_KEY: json.dumps(meta, sort_keys=True)})
    return count


def _sites(graph: OnnxGraph, consumers, init: str):
    """(node, input index, usage, alpha) for every node whose output gets a branch. A 2-D
    Transpose in between (dynamo, for a weight shared with an embedding) is looked through."""
    for node, idx in consumers:
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
            users = graph.uses(node.output[0])
            if perm == [1, 0] and users and all(n.op_type == "MatMul" and i == 1 for n, i in users):
                for n, i in users:
                    yield n, i, "gemm_transB", 1.0
                continue
        yield (node, idx) + _usage(graph, node, idx, init)


def _usage(graph: OnnxGraph, node: onnx.NodeProto, idx: int, init: str) -> tuple[str, float]:
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "MatMul" and idx == 1:
        return "matmul", 1.0
    if node.op_type == "Gemm" and idx == 1 and not (attrs.get("transA") and attrs["transA"].i):
        alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
        return ("gemm_transB" if "transB" in attrs and attrs["transB"].i else "matmul"), alpha
    if node.op_type == "Gather" and idx == 0:
        return "gather", 1.0
    raise OnnxError(f"{graph.path}: initializer {init} is used by {node.op_type} node {node.name!r} (input {idx}); "
                    "--keep-lora places branches after MatMul (right operand, also behind a Transpose), Gemm (B, "
                    "transA=0) and Gather (embeddings) only. Fold the adapter instead (drop --keep-lora)")


def _tensor(name: str, value: torch.Tensor) -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name = name
    t.data_type = TORCH_TO_ONNX[value.dtype]
    t.dims.extend(value.shape)
    t.raw_data = tensor_bytes(value)
    return t


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name)
