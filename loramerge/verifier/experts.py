"""verify for MoE experts adapted through PEFT target_parameters.

Weights (checks 1-3): a fused experts tensor [E, ...] is checked one expert slice at a time, each
slice exactly as a tensor of its own (weights.check_read), and reported as one tensor: the
largest errors and fidelity loss of any expert, the sum of bad elements, problems prefixed with
the expert. Per-expert checkpoint tensors need nothing of this: each is a plain LoRA target.

Model outputs (check 4): transformers loads BASE and converts the experts to its fused in-memory
parameters itself. The adapter is applied there, to the parameter PEFT adapted, by PEFT's
ParamWrapper formula computed here from the raw factors (delta[e] = s B_e A_e with
A.reshape(E, r, in) and B.reshape(out, r, E), turned to [E, in, out] where the module says
is_transposed). That path never uses the plan's checkpoint mapping, so the merged checkpoint,
loaded and converted by transformers, must agree with it: a wrong expert or gate/up order fails.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..types import Adapter, Job, ParamTarget, TensorRef
from .report import TensorCheck
from .weights import check_tensor


def is_stacked(job: Job) -> bool:
    return any(t.pair is not None and t.pair.stacked for t in job.terms)


def check_stacked(job: Job, mref: TensorRef, w: torch.Tensor | None, m: torch.Tensor, adapters: list[Adapter],
                  dev: torch.device, layer: bool) -> TensorCheck:
    """Checks 1-3 of a fused experts tensor, W (None when replaced) and M read: each expert's slice
    as a tensor of its own, with that expert's terms."""
    tc = TensorCheck(job.name, "merge", dtype=mref.dtype, shape=mref.shape)
    if mref.shape != job.shape:
        tc.problems.append(f"shape {list(mref.shape)} in MERGED, expected {list(job.shape)}")
        return tc
    rep = job.replacement
    if rep is not None:
        w = adapters[rep.adapter].tensors[rep.key]
    inner = tuple(job.shape[1:])
    slices = []
    for e in range(job.shape[0]):
        terms = tuple(replace(t, pair=replace(t.pair, stacked=False)) for t in job.terms
                      if t.pair is not None and t.pair.expert == e)
        sub = replace(job, terms=terms, out_shape=inner)
        te = check_tensor(sub, replace(mref, shape=inner), w[e], m[e], adapters, dev, layer)
        te.name = f"{job.name}[{e}]"
        slices.append(te)
    _gather(tc, slices)
    return tc


def _gather(tc: TensorCheck, slices: list[TensorCheck]) -> None:
    """One report for the tensor: the worst expert's figures (fidelity loss too: the largest share
    any expert lost), the sum of bad elements, every expert's problems."""
    def top(field):
        values = [getattr(s, field) for s in slices if getattr(s, field) is not None]
        return max(values) if values else None

    tc.max_ulps, tc.max_rel, tc.layer_rel = top("max_ulps"), top("max_rel"), top("layer_rel")
    tc.bad_elements = sum(s.bad_elements for s in slices)
    lossy = max(slices, key=lambda s: -1.0 if s.delta_loss is None else s.delta_loss)
    tc.delta_loss, tc.delta_ratio = lossy.delta_loss, lossy.delta_ratio
    worst_e, worst = max(enumerate(slices), key=lambda es: (es[1].max_ulps or 0.0, es[1].max_rel or 0.0))
    if worst.worst is not None:
        tc.worst = {**worst.worst, "index": [worst_e, *worst.worst["index"]]}
    for e, s in enumerate(slices):
        tc.problems += [f"expert {e}: {p}" for p in s.problems]
    tc.note = f"{len(slices)} experts" + (f", {slices[0].note}" if slices and slices[0].note else "")


def apply_params(model, jobs: list[Job], adapters: list[Adapter]) -> str | None:
    """Add every target_parameters delta the plan merges to the model's own (fused) parameter, as
    PEFT's unmerged ParamWrapper computes it; the reason when a parameter is not the model's."""
    weights = {}
    for job in jobs:
        for t in job.terms:
            if t.pair is not None and t.pair.experts:
                weights.setdefault((t.adapter, t.pair.a_key), t.weight)
    params = dict(model.named_parameters(remove_duplicate=False))
    for ai, adapter in enumerate(adapters):
        for rec in adapter.pairs:
            c = weights.get((ai, rec.a_key)) if isinstance(rec, ParamTarget) else None
            if c is None:
                continue
            hits = [n for n in params if n == rec.module or n.endswith("." + rec.module) or rec.module.endswith("." + n)]
            if len(hits) != 1:
                return f"{rec.module} (target_parameters) is not a parameter of the transformers model"
            param = params[hits[0]]
            a = adapter.tensors[rec.a_key].to(torch.float64)
            b = adapter.tensors[rec.b_key].to(torch.float64)
            if param.dim() == 2:
                delta = b @ a
            else:
                a3, b3 = a.reshape(rec.experts, rec.rank, -1), b.reshape(b.shape[0], rec.rank, rec.experts)
                delta = torch.einsum("ore,eri->eoi", b3, a3)
                if getattr(model.get_submodule(hits[0].rpartition(".")[0]), "is_transposed", False):
                    delta = delta.transpose(1, 2)
            if delta.shape != param.shape:
                return (f"{hits[0]}: the model's parameter is {list(param.shape)}, the adapter's delta "
                        f"{list(delta.shape)}")
            with torch.no_grad():
                param.add_((c * rec.scale * delta).to(param.device, param.dtype))
    return None
