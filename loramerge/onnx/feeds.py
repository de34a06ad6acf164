"""Feeds for a graph made with --keep-lora --lora-inputs: the LoRA factors of other adapters, so
one exported graph serves many adapters at run time without re-exporting."""

from __future__ import annotations

import json

import numpy as np
import torch

from ..errors import OnnxError
from ..readers.adapters import load_adapters
from ..readers.checkpoint import open_checkpoint
from .graph import OnnxGraph
from .lora_graph import META_KEY, _plans
from .patch import locate
from .targets import collect_targets


def lora_feeds(graph_path, adapters, *, weights: list[float] | None = None, base=None,
               adapter_opts: dict | None = None) -> dict:
    """Inputs that make a --keep-lora --lora-inputs graph compute other adapters (any rank):
    {input name: numpy array}, to pass to InferenceSession.run along with the model inputs.
    Branches the adapters do not touch get rank-1 zero factors. Raises if an adapter targets a
    tensor that has no branch in this graph."""
    feeds = lora_input_values(graph_path, adapters, weights=weights, base=base, adapter_opts=adapter_opts)
    return {k: np.asarray(v.numpy() if v.dtype != torch.bfloat16 else v) for k, v in feeds.items()}


def lora_input_values(graph_path, adapters, *, weights: list[float] | None = None, base=None,
                      adapter_opts: dict | None = None) -> dict[str, torch.Tensor]:
    """lora_feeds as torch tensors in the graph's dtypes (bfloat16 included): {input name: value}
    for every LoRA input of the graph."""
    graph = OnnxGraph(graph_path)
    meta_json = next((p.value for p in graph.model.metadata_props if p.key == META_KEY), None)
    inputs = {i.name for i in graph.model.graph.input}
    if meta_json is None or not any(e["down"] in inputs for es in json.loads(meta_json).values() for e in es):
        raise OnnxError(f"{graph_path}: not a graph made with --keep-lora --lora-inputs (no LoRA inputs recorded "
                        f"in its metadata); re-create it with both options")
    meta = json.loads(meta_json)
    loaded = load_adapters([adapters] if isinstance(adapters, (str, bytes)) else adapters, **(adapter_opts or {}))
    ck = open_checkpoint(base) if base is not None else None
    try:
        targets = collect_targets(loaded, weights, ck)
        result = locate(graph, targets, ck)
        if result.unmatched:
            raise OnnxError(f"{graph_path}: adapter target(s) not found in the graph",
                            [f"{t.name}: {why}" for t, why in result.unmatched])
        plans = _plans(graph, result.matches, loaded, targets)
    finally:
        if ck is not None:
            ck.close()
    feeds = {}
    for init, entries in meta.items():
        u, v, bias, ms = plans.pop(init, (None, None, None, None))
        if bias is not None:
            raise OnnxError(f"{', '.join(m.target.name for m in ms)}: a trained LoRA bias is a constant of this graph, "
                            "not an input; it cannot be swapped at run time")
        dtype = graph.dtype(init)
        for e in entries:
            down_shape, up_shape = graph.shape(e["down"]), graph.shape(e["up"])
            if u is None:
                dd, uu = torch.zeros(down_shape[0], 1), torch.zeros(1, up_shape[1])
            else:
                dd, uu = (v.T, u.T) if e["usage"] == "gemm_transB" else (u, v)
                uu = uu * e["alpha"]
            feeds[e["down"]] = dd.to(dtype).contiguous()
            feeds[e["up"]] = uu.to(dtype).contiguous()
    if plans:
        names = sorted(m.target.name for _, _, _, ms in plans.values() for m in ms)
        raise OnnxError(f"{graph_path}: the adapter(s) change {', '.join(names[:6])}, which have no LoRA branch in this "
                        "graph; make the --keep-lora graph with an adapter that targets them")
    return feeds
