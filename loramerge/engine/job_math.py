"""The math of one job: the output tensor from the base tensor and the job's adapter terms.

Pure of file formats: the pipeline hands in W (or nothing, when the adapter replaces it) and an
output buffer; the math itself lives in ops (merge, DoRA, bias, cast), deltas (factor layouts)
and tuners (the other PEFT tuners' deltas and IA3's multipliers).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import LoraMergeError, NumericsError
from ..types import ST_TO_TORCH, Adapter, Job, Term
from . import coded, deltas, ops, tuners


def compute(job: Job, w: torch.Tensor | None, adapters: list[Adapter], device: torch.device,
            accum: torch.dtype, out: torch.Tensor | None = None,
            extra: tuple = ()) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], int]:
    """(the output tensor for one job on the CPU, elements recomputed in float64). `w` is the base
    tensor, or None when the adapter replaces it; `extra` the job's further inputs (job.inputs);
    `out`, if given, is a CPU buffer of the job's dtype and shape that receives the result (reused
    across tensors, pinned when a GPU is used). A job with further outputs (job.outputs) returns
    the tuple of its tensors, the main one first."""
    try:
        if job.decode is not None or job.encode is not None:
            y, fixed = coded.run(job, w, extra, adapters, device, accum, out, _plain)
        else:
            y, fixed = _math(job, w, adapters, device, accum, out)
    except torch.cuda.OutOfMemoryError:
        raise LoraMergeError(f"{job.name}: out of memory on {device} ({list(job.shape)}, {job.dtype}); use "
                             "--device cpu, or a GPU with more free memory") from None
    except ops.NonFinite as e:
        count, idx, value = e.args
        held = _nonfinite_in(w)
        if held is not None:  # the base's own: no adapter is to blame, and none can mend it
            raise NumericsError(f"{job.name}: the base tensor already holds {held[0]} non-finite value(s) (first "
                                f"at flat index {held[1]}: {held[2]}), so the merged one would too; nothing was "
                                "written: repair or re-download the base checkpoint") from None
        src = "; ".join(f"{adapters[t.adapter].label}: {t.pair.module if t.pair else t.key}"
                        for t in job.terms) or "cast only"
        hint = ""
        if job.dtype == "F16" and value in (float("inf"), float("-inf")):
            hint = "; the value overflows float16 (max 65504): use --dtype bfloat16 or float32"
        raise NumericsError(f"{job.name}: merged result has {count} non-finite value(s) (first at flat index "
                            f"{idx}: {value}) from {src}{hint}; nothing was written") from None
    if isinstance(y, tuple):
        return (_to_out(y[0], out), *(t.cpu() for t in y[1:])), fixed
    return _to_out(y, out), fixed


def _nonfinite_in(w: torch.Tensor | None) -> tuple | None:
    """(count, first flat index, value) of W's own NaN and Inf, for a float W (FP8 included: its
    NaN widened to float32); else None."""
    if w is None or not w.is_floating_point():
        return None
    try:
        ops.check_finite(w if w.element_size() > 1 else w.float())
    except ops.NonFinite as e:
        return e.args
    return None


def premergeable(job: Job) -> bool:
    """Whether a premerge worker may have the job's result (premerged): a 2-D tensor of a
    safetensors base as stored (no codec, no replacement, no trained token rows), merged with
    low-rank LoRA terms alone (no DoRA, no stacked experts): _plain's first branch."""
    return (job.decode is None and job.encode is None and job.kind != "copy" and job.source.offset is not None
            and len(job.source.shape) == 2 and job.out_shape is None and bool(job.terms)
            and all(t.kind == "lora" and t.pair is not None and not t.pair.stacked and tuners.is_lowrank(t.pair)
                    for t in job.terms))


def _to_out(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return y.cpu()
    if y.data_ptr() != out.data_ptr():
        out.copy_(y)  # device -> pinned host copy on GPU; already in place for the CPU kernel
    return out


def _math(job: Job, w: torch.Tensor | None, adapters: list[Adapter], device: torch.device,
          accum: torch.dtype, out: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The merged tensor (on `device`, or in `out`) and its float64 fix-up count; raises
    ops.NonFinite for a non-finite result."""
    if job.kind == "copy":  # an untouched tensor from a pickled .bin: written as it is
        return w, 0
    return _plain(job, w, adapters, device, accum, out, ST_TO_TORCH[job.dtype])


def _plain(job: Job, w: torch.Tensor | None, adapters: list[Adapter], device: torch.device,
           accum: torch.dtype, out: torch.Tensor | None, out_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """The float math of a job into `out_dtype`: W (decoded, where a codec stores it) plus the
    terms, rounded once."""
    if any(t.pair is not None and t.pair.stacked for t in job.terms):
        return _stacked(job, w, adapters, device, accum, out, out_dtype)
    rep = job.replacement
    if rep is not None:  # a full tensor saved in the adapter stands in for the base tensor
        w = adapters[rep.adapter].tensors[rep.key]
    w = with_rows(job, w.to(device, non_blocking=True), adapters)
    lora = [t for t in job.terms if t.kind in ("lora", "delta")]
    bias = [t for t in job.terms if t.kind == "bias"]
    scales = [t for t in job.terms if t.kind == "scale"]
    if lora and not scales and all(tuners.is_lowrank(t.pair) for t in lora):
        w2 = w.reshape(w.shape[0], -1)
        a, b, f = _lowrank_terms(lora, adapters, tuple(w.shape), device)
        y, fixed = ops.merge_weight(w2, a, b, f, out_dtype, accum=accum,
                                    out=None if out is None else out.view(w2.shape), check=True)
        return y.reshape(w.shape), fixed
    dora = bool(lora) and lora[0].pair.magnitude_key is not None
    if scales or (lora and not dora):
        y = _general(job, w, adapters, device, out_dtype, out)  # LoHa/LoKr (+ LoRA-like terms), or IA3
    elif dora:  # the plan allows DoRA only alone on its tensor
        t = lora[0]
        left, right = deltas.factors(adapters[t.adapter], t.pair, torch.float64, device)
        y = ops.dora_merge(w, left, right, t.pair.scale, adapters[t.adapter].tensors[t.pair.magnitude_key],
                           t.pair.layout == "transposed", out_dtype)
    elif bias:
        y = ops.merge_bias(w, [(t.factor, adapters[t.adapter].tensors[t.pair.bias_key]) for t in bias], out_dtype)
    else:  # a replacement or a plain cast: one rounding to the output dtype
        y = ops.cast(w, out_dtype)
    ops.check_finite(y)
    return y, 0


def _stacked(job: Job, w: torch.Tensor | None, adapters: list[Adapter], device: torch.device, accum: torch.dtype,
             out: torch.Tensor | None, out_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """A fused experts tensor [E, ...]: each expert's slice is merged as a tensor of its own, with
    the terms that land in it (the plan gives each expert's delta its own term)."""
    rep = job.replacement
    if rep is not None:
        w = adapters[rep.adapter].tensors[rep.key]
    dst = out if out is not None and device.type == "cpu" else torch.empty(job.shape, dtype=out_dtype, device=device)
    fixed = 0
    for e in range(job.shape[0]):
        # each of them, unstacked: a term on the 2-D slice
        terms = tuple(replace(t, pair=replace(t.pair, stacked=False)) for t in job.terms
                      if t.pair is not None and t.pair.expert == e)
        sub = replace(job, terms=terms, out_shape=tuple(job.shape[1:]))
        try:
            y, f = _plain(sub, w[e], adapters, device, accum, dst[e], out_dtype)
        except ops.NonFinite as err:  # the index in the whole tensor, not in the expert's slice
            count, idx, value = err.args
            raise ops.NonFinite(count, idx + e * dst[e].numel(), value) from None
        if y.data_ptr() != dst[e].data_ptr():
            dst[e].copy_(y)
        fixed += f
    return dst, fixed


def _lowrank_terms(lora: list[Term], adapters: list[Adapter], shape: tuple[int, ...], device):
    """(A, B, factors) of all adapters' low-rank terms for one tensor, as one product: [B1 B2 ..]
    @ [A1; A2; ..], each rank column carrying its own factor (c_i * s_i; AdaLoRA's E and VeRA's
    lambda_d fold in here), so that the sum is rounded once."""
    lefts, rights, factors = zip(*(_factored(t, adapters, shape, device) for t in lora))
    if len({x.dtype for x in lefts}) > 1:  # LoRA float32 beside a tuner's float64 factors
        lefts, rights = [x.double() for x in lefts], [x.double() for x in rights]
    return _joined(rights, 0), _joined(lefts, 1), _joined(factors, 0)


def premerged_key(job: Job, adapters: list[Adapter]) -> list | None:
    """The key the premerge worker's result for a premergeable job must carry to be compute's
    result (premerge.result_key of the A, B and factors _plain would feed the kernel)."""
    from .premerge import result_key
    a, b, f = _lowrank_terms(list(job.terms), adapters, tuple(job.source.shape), torch.device("cpu"))
    return result_key(job, a, b, f, ST_TO_TORCH[job.dtype])


def take_premerged(job: Job, adapters: list[Adapter], out: torch.Tensor, worker) -> tuple[torch.Tensor, int] | None:
    """compute's result for a premergeable job taken from a premerge worker (premerge.py), into
    `out`, where the worker's is the same tensor (the same W, and the same A, B and factors as
    _plain would feed the kernel); else None, and compute does the job."""
    a, b, f = _lowrank_terms(list(job.terms), adapters, tuple(job.source.shape), torch.device("cpu"))
    got = worker.take(job, a, b, f, ST_TO_TORCH[job.dtype], out.view(job.source.shape[0], -1))
    return None if got is None else (out, got[1])


def _joined(parts: tuple[torch.Tensor, ...], dim: int) -> torch.Tensor:
    """torch.cat, except that one part is passed as it is: the usual single adapter's factors are
    not copied (a torch copy is a parallel region per tensor, which a busy machine makes wait)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _factored(t: Term, adapters: list[Adapter], shape: tuple[int, ...], device):
    """(left, right, per-rank factors) of a low-rank term in W's 2-D view, weight and scale folded
    into the factors (float64): LoRA in float32 (float64 if stored so), AdaLoRA/VeRA in float64 (their per-rank vectors
    and VeRA's lambda_b are applied exactly; ops.merge_weight rounds the result once)."""
    if t.kind == "lora":
        # the stored values, exactly: float32 holds bf16/fp16/float32 factors, a float64 adapter
        # stays float64 (the exact sum ops.merge_weight rounds is of the values as stored)
        stored = adapters[t.adapter].tensors
        wide = torch.float64 in (stored[t.pair.a_key].dtype, stored[t.pair.b_key].dtype)
        left, right = deltas.factors(adapters[t.adapter], t.pair, torch.float64 if wide else torch.float32, device)
        return left, right, torch.full((t.pair.rank,), t.factor, dtype=torch.float64)
    left, right, per_rank = tuners.lowrank(adapters[t.adapter], t.pair, shape, device)
    return left, right, (per_rank * t.factor).cpu()


def _general(job: Job, w: torch.Tensor, adapters: list[Adapter], device: torch.device, out_dtype: torch.dtype,
             out: torch.Tensor | None) -> torch.Tensor:
    """Terms no single low-rank product holds (LoHa, LoKr, beside any LoRA-like terms; or IA3's
    multipliers): float64 row blocks of W's 2-D view, each rounded once to the output dtype.
    float64 carries ~1e-16 relative error, so the rounding is the correct one except for values
    within that of a midpoint (as ops.dora_merge)."""
    shape = tuple(w.shape)
    mults, lows, dense = [], [], []
    for t in job.terms:
        a = adapters[t.adapter]
        if t.kind == "scale":
            mults.append((tuners.ia3_multiplier(a, t.pair, shape, device), t.weight))
        elif t.kind == "lora":
            left, right = deltas.factors(a, t.pair, torch.float64, device)
            lows.append((left, right, torch.full((t.pair.rank,), t.factor, dtype=torch.float64, device=device)))
        elif t.kind == "delta" and tuners.is_lowrank(t.pair):
            left, right, per_rank = tuners.lowrank(a, t.pair, shape, device)
            lows.append((left, right, per_rank * t.factor))
        elif t.kind == "delta":
            dense.append((tuners.dense(a, t.pair, shape, device), t.factor))
    rows, cols = tuners.view2d(shape)
    y = out.view(rows, cols) if out is not None and device.type == "cpu" else \
        torch.empty((rows, cols), dtype=out_dtype, device=device)
    step = max(1, (ops.BLOCK_ELEMS_GPU if device.type == "cuda" else ops.BLOCK_ELEMS_CPU) // max(cols, 1))
    for i in range(0, rows, step):
        j = min(rows, i + step)
        y[i:j] = ops.round_to(tuners.merge_rows(w, i, j, mults, lows, dense), out_dtype)
    return y.reshape(shape)


def with_rows(job: Job, w: torch.Tensor, adapters: list[Adapter]) -> torch.Tensor:
    """W with the job's trained token rows written in (PEFT's index_copy), before any LoRA of the
    same adapter adds to them (PEFT's LoRA wraps the token layer). W is widened to hold the rows
    exactly (float32 rows in a float16 W), so that they are rounded once, with the rest, to the
    output dtype. Always a copy: W may be a saved replacement, or a .bin checkpoint's cached
    tensor that a tied twin (an untied lm_head) reads again."""
    rows = [t for t in job.terms if t.kind == "rows"]
    if not rows:
        return w
    dtype = w.dtype
    for t in rows:
        dtype = torch.promote_types(dtype, adapters[t.adapter].tensors[t.key].dtype)
    w = w.to(dtype, copy=True)
    for t in rows:
        w[torch.tensor(t.rows, device=w.device)] = adapters[t.adapter].tensors[t.key].to(w.device, dtype)
    return w
