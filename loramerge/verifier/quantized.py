"""verify for jobs with codecs: a quantized base (FP8, bitsandbytes 4-bit), an FP8 output, and
QLoRA merges. The base values come from the codec (FP8 exactly, in float64; bitsandbytes in the
dtype it dequantizes to; --qlora: the 4-bit round trip of W), then the checks of weights.py.

An FP8 output is held to its own rule. With s the merged block's scale and E the exact expected
value: every scale must be float32(amax_block(E) / 448) within 2^-23 (1.0, with all values 0, for
an all-zero block), and every value q * s within half an e4m3 step (at E / s) of E: the nearest
value the grid has. A correct requantization is exactly that; a wrong one (a stale scale, a
delta added twice, truncation) is not. How much of the delta survived is reported as for any
dtype (delta lost), plus the share of elements where the delta did not survive at all: the stored
FP8 value is the one W alone would get at the new scale. FP8's 4 significant bits drop a delta far
below the weight's magnitude altogether.
"""

from __future__ import annotations

import math

import torch

from .. import codecs
from ..codecs import fp8
from ..engine.ops import round_to
from ..readers.checkpoint import Checkpoint
from ..types import FLOAT_CODES, Adapter, Job, TensorRef
from .report import FP8_SCALE_TOL_REL, FP8_TOL_ULPS, TensorCheck
from .weights import LayerOutputs, _blocks, _check_values, _index, _lin, _prepare


def check_coded(job: Job, mref: TensorRef, base_ck: Checkpoint, merged_ck: Checkpoint,
                adapters: list[Adapter], dev: torch.device, layer: bool, ref=None) -> TensorCheck:
    tc = TensorCheck(job.name, "merge" if job.terms else "cast", dtype=mref.dtype, shape=mref.shape)
    if mref.shape != job.shape:
        tc.problems.append(f"shape {list(mref.shape)} in MERGED, expected {list(job.shape)}")
        return tc
    scale_m = None
    if job.encode is not None:
        sname = job.outputs[0].name
        sref = merged_ck.tensors.get(sname)
        if mref.dtype != "F8_E4M3" or sref is None or sref.dtype != "F32" or sref.shape != job.outputs[0].shape:
            found = "missing" if sref is None else f"{sref.dtype} {list(sref.shape)}"
            tc.problems.append(f"an FP8 merge writes F8_E4M3 with float32 scales {sname} "
                               f"{list(job.outputs[0].shape)}; MERGED has {mref.dtype} and scales {found}")
            return tc
        scale_m = merged_ck.read(sref).to(dev)
    elif mref.dtype not in FLOAT_CODES:
        tc.problems.append(f"dtype {mref.dtype} in MERGED; a dequantized weight is a float tensor")
        return tc
    rep = job.replacement
    if rep is not None:
        w = adapters[rep.adapter].tensors[rep.key]
    else:
        stored = [base_ck.read(job.source), *(base_ck.read(r) for r in job.inputs)]
        w = codecs.decode(job.decode, stored, job.shape, dev) if job.decode is not None else stored[0]
    tg = _prepare(job, w, adapters, dev, ref)
    if isinstance(tg, str):
        tc.problems.append(tg)
        return tc
    labels = {"fp8": "from fp8", "bnb4": f"from bnb {getattr(job.decode, 'quant_type', '')}",
              "qlora": f"QLoRA {getattr(job.decode, 'quant_type', '')}"}
    tc.note = ", ".join(x for x in (labels.get(job.decode.kind) if job.decode else None,
                                    "fp8 out" if scale_m is not None else None, tg.note) if x)
    m = merged_ck.read(mref)
    if scale_m is not None:
        _check_fp8(tc, tg, m.to(dev), scale_m, job.encode.block, dev, layer and bool(tg.branches))
    else:
        _check_values(tc, tg, m, dev, layer and bool(tg.branches))
    if job.decode is not None and job.decode.kind == "qlora" and tg.effects:
        tc.qlora_shift = _shift(tg, base_ck.read(job.source), dev)
    return tc


def _shift(tg, w_plain: torch.Tensor, dev: torch.device) -> float:
    """||W_q - W|| / ||dW||: what merging into the unquantized base would change, relative to the
    adapter's own change."""
    plain = _lin(w_plain, tg.transposed)
    sq_shift = sq_delta = 0.0
    for sl, wb, _, e, *_ in _blocks(tg, plain, dev):  # plain stands in for M: only W and E are used
        sq_shift += float(((wb - plain[sl].to(dev, torch.float64)) ** 2).sum())
        sq_delta += float(((e - wb) ** 2).sum())
    return math.sqrt(sq_shift / sq_delta) if sq_delta > 0 else math.inf


def _check_fp8(tc: TensorCheck, tg, m: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               dev: torch.device, layer: bool) -> None:
    """The FP8 rule (module docstring) for a 2-D weight; stacked weights [..., R, C] go matrix by
    matrix."""
    rows, cols = m.shape[-2:]
    m64 = fp8.dequantize(m, scale, block)
    per_elem = fp8.expand(scale.to(torch.float64), rows, cols, block).reshape(m64.shape)
    m_lin = _lin(m64, tg.transposed)
    s_lin = _lin(per_elem, tg.transposed)
    amax = torch.zeros(scale.reshape(-1, *scale.shape[-2:]).shape, dtype=torch.float64, device=dev)
    amax_rows = amax.reshape(-1, amax.shape[-1])
    bad = 0
    max_ulps = max_err = max_e = sq_err = sq_delta = dot = 0.0
    dropped = changed = 0
    worst = None
    outs = LayerOutputs(tg, m_lin, dev) if layer else None
    for sl, wb, mb, e, dora_scale, ub in _blocks(tg, m_lin, dev):
        s = s_lin[sl]
        ulp = fp8.grid_ulp(e / s) * s
        err = (mb - e).abs()
        ulps = err / ulp
        bad += int((ulps > FP8_TOL_ULPS).sum())
        if worst is None or float(ulps.max()) > worst[0]:
            r, c = divmod(int(ulps.argmax()), ulps.shape[1])
            worst = (float(ulps.max()), sl.start + r, c, float(mb[r, c]), float(e[r, c]), float(wb[r, c]))
        max_ulps, max_err = max(max_ulps, float(ulps.max())), max(max_err, float(err.max()))
        max_e = max(max_e, float(e.abs().max()))
        delta = e - wb
        sq_err += float(((mb - e) ** 2).sum())
        sq_delta += float((delta ** 2).sum())
        dot += float(((mb - wb) * delta).sum())
        moved = delta != 0
        # the FP8 code W alone would get at this scale: where it is M's, the delta changed nothing
        q_w = round_to((wb / s).clamp_(-fp8.E4M3_MAX, fp8.E4M3_MAX), fp8.FP8).to(torch.float64)
        dropped += int((q_w == mb / s).logical_and_(moved).sum())
        changed += int(moved.sum())
        if not tg.transposed:  # per-block amax of E, for the scale rule (FP8 weights are [out, in])
            a = torch.nn.functional.pad(e.abs(), (0, amax.shape[-1] * block[1] - cols))
            a = a.reshape(e.shape[0], amax.shape[-1], block[1]).amax(dim=2)
            for b in range(sl.start // block[0], -(-sl.stop // block[0])):
                lo, hi = max(b * block[0], sl.start) - sl.start, min((b + 1) * block[0], sl.stop) - sl.start
                amax_rows[b] = torch.maximum(amax_rows[b], a[lo:hi].amax(dim=0))
        if outs is not None:
            outs.add(sl, ub, mb, dora_scale, FP8_TOL_ULPS * ulp)
    n = m_lin.numel()
    tc.max_ulps, tc.bad_elements = max_ulps, bad
    tc.max_rel = max_err / max_e if max_e > 0 else (0.0 if max_err == 0 else math.inf)
    tc.delta_dropped = dropped / changed if changed else None
    if sq_delta > 0 and tc.kind == "merge":
        tc.delta_loss, tc.delta_ratio = math.sqrt(sq_err / sq_delta), dot / sq_delta
    _, r, c, mv, ev, wv = worst
    tc.worst = {"index": _index(r, c, tuple(m.shape), tg.transposed), "merged": mv, "expected": ev, "base": wv}
    if bad:
        tc.problems.append(f"{bad} of {n} elements are not the nearest FP8 value to the exact result at their "
                           f"block's scale (max {max_ulps:.3g} e4m3 steps off, {FP8_TOL_ULPS:g} allowed); worst at "
                           f"{tc.worst['index']}: merged {mv:.6g}, expected {ev:.6g}, base {wv:.6g}")
    if not tg.transposed:
        want = torch.where(amax > 0, (amax / fp8.E4M3_MAX).to(torch.float32).to(torch.float64), 1.0)
        s64 = scale.reshape(amax.shape).to(torch.float64)
        off = ((s64 - want).abs() > FP8_SCALE_TOL_REL * want).logical_or_(~torch.isfinite(s64) | (s64 <= 0))
        off &= amax > 0  # an all-zero block may carry any scale: its values are checked above
        if bool(off.any()):
            i = int(off.reshape(-1).nonzero()[0])
            tc.problems.append(f"{int(off.sum())} of {off.numel()} scales are not amax/448 of their block's exact "
                               f"values (first: block {i}, scale {float(s64.reshape(-1)[i]):.6g}, expected "
                               f"{float(want.reshape(-1)[i]):.6g}): stale or wrongly computed scales")
    if outs is not None:
        outs.finish(tc)

