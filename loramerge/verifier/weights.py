"""verify's checks 1-3 for one tensor: weights against the float64 expected value, delta
fidelity, and layer outputs through the unmerged LoRA branch (see check.py for the rules)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..engine import deltas, tuners
from ..engine.ops import BLOCK_ELEMS_CPU, BLOCK_ELEMS_GPU, round_to
from ..types import FLOAT_CODES, ST_TO_TORCH, Adapter, Job, LoraPair, TensorRef
from . import compare
from .compare import Tally, off, ulp
from .reference import JobRef
from .report import FLOAT_TOL_REL, HALF_CODES, HALF_TOL_ULPS, LAYER_ROWS, SEED, TensorCheck


def _lin(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The tensor in linear orientation [out, in] (y = x @ t^T): conv kernels flattened to im2col
    columns, transposed layouts (Conv1D, embeddings: W is [in, out]) turned around. A view."""
    t2 = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
    return t2.T if transposed else t2


def lin_factors(adapter: Adapter, pair: LoraPair, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """deltas.factors in linear orientation: delta_lin = pair.scale * left @ right, left [out, r]."""
    left, right = deltas.factors(adapter, pair, dtype, device)
    return (right.T, left.T) if pair.layout == "transposed" else (left, right)


def lora_branch(x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor], factor: float) -> torch.Tensor:
    """The unmerged LoRA path factor * (x @ A^T) @ B^T for x [..., in] in linear orientation, with
    (B, A) = lin_factors: a rank-r detour that never forms the dense delta."""
    left, right = factors
    return (x @ right.T) @ left.T * factor


@dataclass
class _Target:
    """A job's expected value, ready for row blocks in linear orientation."""

    start: torch.Tensor                 # what the terms apply to: W, or the adapter's replacement
    transposed: bool
    effects: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (left, right) on device
    branches: list[tuple[tuple[torch.Tensor, torch.Tensor], float]] = field(default_factory=list)  # LoRA terms
    magnitude: torch.Tensor | None = None   # DoRA m [out] on device
    multiplier: torch.Tensor | None = None  # IA3: E = W * multiplier (broadcast, linear orientation)
    dense: list = field(default_factory=list)  # LoHa/LoKr: (rows function, factor)
    note: str = ""


def _prepare(job: Job, w: torch.Tensor, adapters: list[Adapter], dev: torch.device,
             ref: JobRef | None = None) -> _Target | str:
    """The expected-value recipe for a job (float64, on the device), or why it cannot be checked.
    `ref` (crosscheck.py): verify's own reading of the adapters in ref.covered, used for their LoRA
    and bias terms instead of apply's."""
    own = ref.covered if ref is not None else set()
    for t in job.terms:
        if t.kind not in ("lora", "bias", "replace", "delta", "scale", "rows"):
            return (f"term of kind {t.kind!r} from {adapters[t.adapter].label}: verify does not know its math, "
                    "so this tensor cannot be checked; update loramerge")
    lora = [t for t in job.terms if t.kind in ("lora", "delta", "scale")]
    transposed = bool(lora) and lora[0].pair.layout == "transposed" and w.dim() > 1
    if ref is not None and ref.transposed is not None and w.dim() > 1:
        transposed = ref.transposed
        lora = [t for t in lora if t.adapter not in own or t.pair.experts]
    if any((t.pair.layout == "transposed") != transposed for t in lora if w.dim() > 1):
        return "adapters disagree on the layout of this tensor (transposed and not); cannot check it"
    rows = [t for t in job.terms if t.kind == "rows"]
    if rows:  # trained token rows are the start's values there (PEFT's index_copy); deltas add to them
        w = w.to(torch.float64, copy=True)
        for t in rows:
            w[list(t.rows)] = adapters[t.adapter].tensors[t.key].to(torch.float64)
    tg = _Target(_lin(w, transposed), transposed)
    if not _prepare_tuners(tg, job, tuple(w.shape), adapters, dev):
        return "a LoHa/LoKr delta on a transposed (Conv1D) weight: PEFT has no such layer; cannot check it"
    # apply's reading: adapters verify does not read itself, and target_parameters (MoE experts)
    lora = [t for t in lora if t.kind == "lora" and (t.adapter not in own or t.pair.experts)]
    for t in lora:
        fl = lin_factors(adapters[t.adapter], t.pair, torch.float64, dev)
        tg.effects.append((fl[0] * t.factor, fl[1]))
        tg.branches.append((fl, t.factor))
        if t.pair.magnitude_key is not None:  # the plan allows DoRA only alone on its tensor
            tg.magnitude = adapters[t.adapter].tensors[t.pair.magnitude_key].to(dev, torch.float64).reshape(-1)
            tg.note = "DoRA"
    for (left, right), factor in (ref.lora if ref is not None else []):
        fl = (left.to(dev, torch.float64), right.to(dev, torch.float64))
        tg.effects.append((fl[0] * factor, fl[1]))
        tg.branches.append((fl, factor))
    if ref is not None and ref.magnitude is not None:
        tg.magnitude, tg.note = ref.magnitude.to(dev), "DoRA"
    bias = [deltas.bias_delta(adapters[t.adapter], t.pair) * t.weight for t in job.terms
            if t.kind == "bias" and t.adapter not in own] + (ref.bias if ref is not None else [])
    for d in bias:  # a bias is a [out, 1] tensor; its delta a rank-1 effect with right = [[1]]
        tg.effects.append((d.to(dev).reshape(-1, 1), torch.ones((1, 1), dtype=torch.float64, device=dev)))
    if rows:
        tg.note = f"{sum(len(t.rows) for t in rows)} token rows" + (" + " + tg.note if tg.note else "")
    if job.replacement is not None:
        tg.note = "replaced" + (" + " + tg.note if tg.note else "")
    return tg


def _prepare_tuners(tg: _Target, job: Job, shape: tuple[int, ...], adapters: list[Adapter], dev) -> bool:
    """The other tuners' part of the recipe (engine/tuners.py's math, in linear orientation):
    low-rank deltas join the LoRA effects and branches, LoHa/LoKr become dense row functions,
    IA3 a multiplier. False if a term cannot be put in linear orientation."""
    for t in job.terms:
        a = adapters[t.adapter]
        if t.kind == "scale":
            m = tuners.ia3_multiplier(a, t.pair, shape, dev)
            m = m.reshape(-1, 1) if m.dim() == 1 else m.expand(shape).reshape(shape[0], -1) if m.dim() > 2 else m
            m = m.T if tg.transposed else m
            m = m if t.weight == 1 else 1 / m
            tg.multiplier = m if tg.multiplier is None else tg.multiplier * m
        elif t.kind == "delta" and tuners.is_lowrank(t.pair):
            left, right, per_rank = tuners.lowrank(a, t.pair, shape, dev)
            fl = (right.T * per_rank, left.T) if tg.transposed else (left * per_rank, right)
            tg.effects.append((fl[0] * t.factor, fl[1]))
            tg.branches.append((fl, t.factor))
        elif t.kind == "delta":
            if tg.transposed:
                return False
            tg.dense.append((tuners.dense(a, t.pair, shape, dev), t.factor))
    return True


def _blocks(tg: _Target, m_lin: torch.Tensor, dev: torch.device):
    """Yield (row slice, W, M, E, dora_scale, U) in float64 on the device: E is the exact expected
    value, dora_scale DoRA's per-row factor m / ||W + dW|| (None without DoRA), U the weight the
    unmerged layer applies besides its LoRA branches (W, times IA3's vector, plus LoHa/LoKr's
    dense delta)."""
    rows, cols = m_lin.shape
    step = max(1, (BLOCK_ELEMS_GPU if dev.type == "cuda" else BLOCK_ELEMS_CPU) // max(cols, 1))
    for i in range(0, rows, step):
        sl = slice(i, min(i + step, rows))
        w = tg.start[sl].to(dev, torch.float64)
        u = w
        if tg.multiplier is not None:
            u = u * (tg.multiplier[sl] if tg.multiplier.shape[0] > 1 else tg.multiplier)
        for rows_of, factor in tg.dense:
            u = u + factor * rows_of(sl.start, sl.stop)
        e = u.clone()
        for left, right in tg.effects:
            e.addmm_(left[sl], right)
        scale = None
        if tg.magnitude is not None:
            # PEFT's DoRA: each output row of W + dW rescaled to the learned magnitude
            scale = tg.magnitude[sl] / torch.linalg.vector_norm(e, dim=1)
            e.mul_(scale.unsqueeze(1))
        yield sl, w, m_lin[sl].to(dev).to(torch.float64), e, scale, u


def check_tensor(job: Job, mref: TensorRef, w: torch.Tensor | None, m: torch.Tensor, adapters: list[Adapter],
                 dev: torch.device, layer: bool, ref: JobRef | None = None) -> TensorCheck:
    """Checks 1-3 for a plain job: `w` is the base tensor as read (None when the adapter replaces
    it), `m` MERGED's tensor, both on the CPU."""
    src = job.source
    kind = "merge" if job.terms else ("copy" if mref.dtype == src.dtype else "cast")
    tc = TensorCheck(job.name, kind, dtype=mref.dtype, shape=mref.shape)
    if mref.shape != job.shape:
        tc.problems.append(f"shape {list(mref.shape)} in MERGED, expected {list(job.shape)}")
        return tc
    if kind != "copy" and (src.dtype not in FLOAT_CODES or mref.dtype not in FLOAT_CODES):
        tc.problems.append(f"dtype {mref.dtype} in MERGED, the base's is {src.dtype}; only floating-point "
                           "tensors may change dtype in a merge")
        return tc
    rep = job.replacement
    # A replaced tensor starts from the adapter's saved copy (its shape may differ from the base's).
    if rep is not None:
        w = adapters[rep.adapter].tensors[rep.key]
    if kind == "copy":
        check_copy(tc, w, m)
        return tc
    if m.numel() == 0:  # (an empty tensor, cast: nothing to compare)
        tc.max_ulps = tc.max_rel = 0.0
        return tc
    tg = _prepare(job, w, adapters, dev, ref)
    if isinstance(tg, str):
        tc.problems.append(tg)
        return tc
    tc.note = tg.note
    layer = layer and bool(tg.branches or tg.dense or tg.multiplier is not None)
    if layer or not _check_fast(tc, tg, m, dev):
        _check_values(tc, tg, m, dev, layer)
    return tc


def _stored(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)


def _check_fast(tc: TensorCheck, tg: _Target, m: torch.Tensor, dev: torch.device) -> bool:
    """Rule 1 and the fidelity sums by compare.py (float32 under a proven bound), for the recipes it
    covers: low-rank effects on W into a half-precision output. False if it does not apply."""
    if tg.magnitude is not None or tg.multiplier is not None or tg.dense:
        return False
    # E = W + P @ Q in the stored view: the linear-orientation effects, turned around if transposed
    cols = tg.start.shape[1]
    lefts = [left for left, _ in tg.effects] or [torch.zeros((tg.start.shape[0], 0), dtype=torch.float64, device=dev)]
    rights = [right for _, right in tg.effects] or [torch.zeros((0, cols), dtype=torch.float64, device=dev)]
    p, q = torch.cat(lefts, dim=1), torch.cat(rights)
    w2 = tg.start.T if tg.transposed else tg.start
    if tg.transposed:
        p, q = q.T, p.T
    if not compare.eligible(tc.dtype, w2, p, q):
        return False
    m2 = _stored(m)
    t = compare.compare(w2, m2, p, q, tc.dtype, tg.transposed, dev)
    r, c = t.worst
    i, j = (c, r) if tg.transposed else (r, c)
    _record(tc, t, m2.numel(), tuple(m.shape), tg.transposed,
            (float(m2[i, j]), compare.expected_at(w2, p, q, i, j), float(w2[i, j])))
    return True


def check_copy(tc: TensorCheck, w: torch.Tensor, m: torch.Tensor) -> None:
    wb, mb = w.contiguous().reshape(-1), m.contiguous().reshape(-1)
    if torch.equal(wb.view(torch.uint8), mb.view(torch.uint8)):
        tc.max_ulps = tc.max_rel = 0.0
        return
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[wb.element_size()]
    tc.bad_elements = int((wb.view(ints) != mb.view(ints)).sum())
    diff = ""
    if wb.is_floating_point():
        diff = f", max abs difference {float((mb.double() - wb.double()).abs().max()):.3g}"
    tc.problems.append(f"no adapter touches this tensor, so it must equal the base bit for bit, but "
                       f"{tc.bad_elements} of {wb.numel()} elements differ{diff}")


def _check_values(tc: TensorCheck, tg: _Target, m: torch.Tensor, dev: torch.device, layer: bool) -> None:
    code = tc.dtype
    half = code in HALF_CODES
    out_dtype = ST_TO_TORCH[code]
    m_lin = _lin(m, tg.transposed)
    max_err = max_e = max_ulps = 0.0
    bad = 0
    sq_err = sq_delta = dot = 0.0
    worst = None                        # (score, row, col, merged, expected, base)
    outs = LayerOutputs(tg, m_lin, dev) if layer else None
    for sl, wb, mb, e, dora_scale, ub in _blocks(tg, m_lin, dev):
        # The element's magnitude: W, E, or the delta's terms s * sum_k |B_ik A_kj| when they are larger
        # (a tool that rounds the factors or the delta to the output dtype errs relative to those).
        mag = torch.maximum(e.abs(), wb.abs())
        if tg.effects:
            mag = torch.maximum(mag, sum(left[sl].abs() @ right.abs() for left, right in tg.effects))
        if tg.dense:
            mag = torch.maximum(mag, (ub - wb).abs())
        tol_ulp = ulp(mag, code)
        # half: compare with E correctly rounded (a correct merge is 0 ulp off); float: with E itself
        ref = round_to(e, out_dtype).to(torch.float64) if half else e
        err, ulps = off(mb, ref), off(mb, ref, tol_ulp)   # a NaN in M: infinitely off
        if half:
            bad += int((ulps > HALF_TOL_ULPS).sum())
        score = ulps if half else err
        if worst is None or float(score.max()) > worst[0]:
            r, c = divmod(int(score.argmax()), score.shape[1])
            worst = (float(score.max()), sl.start + r, c, float(mb[r, c]), float(e[r, c]), float(wb[r, c]))
        max_ulps = max(max_ulps, float(ulps.max()))
        max_err = max(max_err, float(off(mb, e).max()))
        max_e = max(max_e, float(e.abs().max()))
        delta = e - wb
        sq_err += float(((mb - e) ** 2).sum())
        sq_delta += float((delta ** 2).sum())
        dot += float(((mb - wb) * delta).sum())
        if outs is not None:
            # half: |M - E| <= |M - round(E)| + |round(E) - E| <= (tol + 1/2) ulp per element
            outs.add(sl, ub, mb, dora_scale, (HALF_TOL_ULPS + 0.5) * tol_ulp if half else None)

    float_tol = FLOAT_TOL_REL * max_e
    if not half and max_err > float_tol:
        # the float rule's tolerance depends on the whole tensor's max |E|: count in a second pass
        bad = sum(int((off(mb, e) > float_tol).sum()) for _, _, mb, e, *_ in _blocks(tg, m_lin, dev))
    _, r, c, mv, ev, wv = worst
    t = Tally(bad=bad, max_ulps=max_ulps, worst=(r, c), sq_err=sq_err, sq_delta=sq_delta, dot=dot, max_err=max_err,
              max_e=max_e)
    _record(tc, t, m_lin.numel(), tuple(m.shape), tg.transposed, (mv, ev, wv))
    if outs is not None:
        outs.finish(tc, None if half else outs.x.abs().sum(dim=1, keepdim=True) * float_tol)


def _record(tc: TensorCheck, t: Tally, n: int, shape: tuple[int, ...], transposed: bool,
            values: tuple[float, float, float]) -> None:
    """Write rule 1's findings into tc: `values` are (merged, expected, base) at t.worst."""
    half = tc.dtype in HALF_CODES
    tc.max_ulps = t.max_ulps
    tc.max_rel = t.max_err / t.max_e if t.max_e > 0 else (0.0 if t.max_err == 0 else math.inf)
    if t.sq_delta > 0 and tc.kind == "merge":
        tc.delta_loss = math.sqrt(t.sq_err / t.sq_delta)
        tc.delta_ratio = t.dot / t.sq_delta
    tc.bad_elements = t.bad
    mv, ev, wv = values
    tc.worst = {"index": _index(*t.worst, shape, transposed), "merged": mv, "expected": ev, "base": wv}
    if t.bad:
        what = (f"off by more than {HALF_TOL_ULPS:g} ulp of {tc.dtype} (max {t.max_ulps:.3g} ulp" if half else
                f"off by more than {FLOAT_TOL_REL:g} x max|expected| = {FLOAT_TOL_REL * t.max_e:.3g} "
                f"(max {t.max_err:.3g}")
        tc.problems.append(
            f"{t.bad} of {n} elements {what}, max rel err {tc.max_rel:.3g}); worst at {tc.worst['index']}: "
            f"merged {mv:.6g}, expected {ev:.6g}, base {wv:.6g}" + _diagnose(tc, t.bad, n))


class LayerOutputs:
    """Check 3, gathered over row blocks: x @ M^T against x @ W^T plus the unmerged LoRA branch
    (DoRA's scale applied), with a bound |x| @ tol^T from the per-element weight tolerance."""

    def __init__(self, tg: _Target, m_lin: torch.Tensor, dev: torch.device):
        self.x = torch.randn(LAYER_ROWS, m_lin.shape[1], generator=torch.Generator().manual_seed(SEED),
                             dtype=torch.float64).to(dev)
        self.branch = sum((lora_branch(self.x, fl, f) for fl, f in tg.branches),
                          torch.zeros(LAYER_ROWS, m_lin.shape[0], dtype=torch.float64, device=dev))
        self.y_m, self.y_ref, self.bound = (torch.zeros(LAYER_ROWS, m_lin.shape[0], dtype=torch.float64, device=dev)
                                            for _ in range(3))

    def add(self, sl: slice, ub: torch.Tensor, mb: torch.Tensor, dora_scale, tol: torch.Tensor | None) -> None:
        """One row block: M, and U (the weight the unmerged layer applies besides its branches)."""
        self.y_m[:, sl] = self.x @ mb.T
        y = self.x @ ub.T + self.branch[:, sl]
        self.y_ref[:, sl] = y if dora_scale is None else y * dora_scale
        if tol is not None:
            self.bound[:, sl] = self.x.abs() @ tol.T

    def finish(self, tc: TensorCheck, bound: torch.Tensor | None = None) -> None:
        """Record the layer error in tc, and a problem where it exceeds the bound (`bound` replaces
        the per-block one, e.g. for the float rule's whole-tensor tolerance)."""
        bound = self.bound if bound is None else bound
        diff = (self.y_m - self.y_ref).abs()
        denom = float(self.y_ref.abs().max())
        tc.layer_rel = float(diff.max()) / denom if denom > 0 else float(diff.max())
        over = diff > bound * (1 + 1e-9)
        if bool(over.any()):
            tc.problems.append(
                f"layer output: {int(over.sum())} of {over.numel()} outputs of x @ W^T (x ~ randn({LAYER_ROWS}, "
                f"{self.x.shape[1]}), seed {SEED}) differ from base + LoRA branch s(xA^T)B^T by more than the "
                f"weight tolerance allows (max rel err {tc.layer_rel:.3g})")


def _diagnose(tc: TensorCheck, bad: int, n: int) -> str:
    """A hint at the likely cause, from how the applied change relates to the expected one."""
    k = tc.delta_ratio
    if tc.kind != "merge" or k is None:
        return ""
    if abs(k) < 0.05:
        return "; the merged tensor carries none of the adapter's change: it was not merged"
    if bad < max(16, n // 100):
        return f"; only a few elements are wrong (the change as a whole is {k:.3g}x the adapter's): corrupted values?"
    if abs(k - 1) > 0.05:
        return (f"; the applied change is {k:.3g}x the adapter's: merged twice, or a wrong scale/alpha/weight "
                "(check --weights and the adapter config)")
    return ""


def _index(r: int, c: int, shape: tuple[int, ...], transposed: bool) -> list[int]:
    """A (row, col) of the linear-orientation view back to an index into the tensor itself."""
    if len(shape) <= 1:
        return [r][:len(shape)]
    row, col = (c, r) if transposed else (r, c)
    rest = []
    for d in reversed(shape[1:]):  # unravel the flattened trailing dims (conv kernels)
        col, k = divmod(col, d)
        rest.append(k)
    return [row, *reversed(rest)]
