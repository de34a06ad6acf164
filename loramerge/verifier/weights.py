"""Check a merged checkpoint against its inputs: `loramerge verify BASE ADAPTER... MERGED`.

A merge that went wrong (a key skipped, a scale applied twice, a shard from another run) loads
and runs; users notice only from degraded generations. This module recomputes what every tensor
of MERGED must be and says which ones are not, with the numbers. It does not trust the merge
code: expected values are computed in float64 from the adapter factors (deltas.factors, so every
layout the readers produce is covered), layer outputs go through the unmerged LoRA branch.

Checks, per tensor of the base (plan.build_plan says which adapter terms hit it):

1. Weights. E = W + sum_i c_i * s_i * B_i @ A_i in float64, M = the merged tensor. DoRA:
   E = m * (W + dW) / ||W + dW|| per output unit (PEFT's formula, computed here, not by
   ops.dora_merge). A tensor the adapter saves whole (modules_to_save, resized embeddings)
   starts from that copy instead of W, which then stands for W below.
   Pass rules, by M's dtype:
     bfloat16 / float16: every element within 2 ulps of E correctly rounded (ops.round_to), the
       ulp taken at the element's magnitude max(|W|, |E|, S), S = sum over terms and ranks of
       |c s B_ik A_kj|. loramerge is 0 ulp (it rounds once, correctly). PEFT with float32
       adapter weights adds a float32 delta to the half-precision W and rounds again, which can
       land on E's other neighbour: 1 ulp. PEFT with half-precision adapter weights (bf16 adapter
       files loaded with autocast_adapter_dtype=False, or the PeftModel cast .to(bfloat16))
       rounds the factors and the delta too; those errors scale with S, not with |E|, and reach
       1.25 ulp on the fixtures (14 ulp at |E| alone). Real mistakes are tens to hundreds of ulps.
     float32 / float64: max |M - E| <= 1e-6 * max |E| over the tensor (float32 accumulation,
       ours or PEFT's, is ~1e-7 off).
   A tensor no adapter touches must be bit-identical to the base; if MERGED stores it in
   another float dtype (apply --dtype), it is held to the rule above with E = W. Tensors missing
   from MERGED or not in the base are failures.
2. Delta fidelity: loss = ||M - E|| / ||E - W||, the fraction of the adapter's change that the
   output dtype did not keep (bf16 keeps ~8 bits, so a delta far below W's magnitude is mostly
   rounded away). Reported per target, summarised (worst, median) and warned about above 0.1;
   not a failure: the merge is as good as the dtype allows.
3. Layer outputs (skipped with outputs=False): x ~ randn(8, in) (seed 0) through the merged
   weight vs the base weight plus the unmerged LoRA branch s * (x @ A^T) @ B^T in float64, in the
   weight's linear orientation (y = x @ W^T: transposed layouts are turned around, conv kernels
   flattened to im2col form). Reported as max |y_M - y_ref| / max |y_ref|; it passes when every
   output is within |x| @ tol^T, tol the per-element weight tolerance of rule 1 (plus half an ulp
   for E's own rounding in half precision): the most that rounding the merged weight explains.
4. Model outputs (skipped with outputs=False, or without transformers): see verify_model.py.

Memory: checks 1-3 read one base tensor and its merged twin at a time and do the float64 math
in row blocks, like apply. Check 4 loads the model with transformers (one copy at a time, in
float32) and is skipped with a note when that would not fit in memory.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import deltas, engine
from .api import load_adapters
from .errors import CheckpointError, UsageError
from .ops import BLOCK_ELEMS_CPU, BLOCK_ELEMS_GPU, round_to
from .plan import build_plan
from .readers.checkpoint import Checkpoint, open_checkpoint
from .types import FLOAT_CODES, ST_TO_TORCH, Adapter, Job, LoraPair, TensorRef

# Output dtype -> (precision in bits, counting the implicit one; smallest normal exponent).
_GRID = {"BF16": (8, -126), "F16": (11, -14), "F32": (24, -126), "F64": (53, -1022)}
HALF_CODES = ("BF16", "F16")
HALF_TOL_ULPS = 2.0
FLOAT_TOL_REL = 1e-6
# A target whose delta lost more than this to the output dtype gets a warning.
FIDELITY_WARN = 0.1
LAYER_ROWS = 8
SEED = 0


@dataclass
class TensorCheck:
    """One tensor of the base (or an extra one of MERGED) and what verify found."""

    name: str
    kind: str                           # merge | copy | cast | missing | extra
    dtype: str = ""                     # MERGED's dtype code
    shape: tuple[int, ...] = ()
    max_ulps: float | None = None       # max |M - E| in ulps of dtype at the element's magnitude
    max_rel: float | None = None        # max |M - E| / max |E| (E exact)
    bad_elements: int = 0               # elements beyond the tolerance
    delta_loss: float | None = None     # ||M - E|| / ||E - W||
    delta_ratio: float | None = None    # the applied change M - W as a multiple of E - W
    layer_rel: float | None = None      # max |y_M - y_ref| / max |y_ref|
    worst: dict | None = None           # where the largest error is: index, merged, expected, base
    problems: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class ModelCheck:
    """Check 4: the hooked base against the merged model, both run by transformers."""

    status: str                         # ok | FAIL | skipped
    reason: str = ""
    model_class: str = ""
    rel_err: dict[str, float] = field(default_factory=dict)          # merged vs hooked base
    adapter_effect: dict[str, float] = field(default_factory=dict)   # hooked base vs plain base
    tolerance: dict[str, float] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()


@dataclass
class VerifyReport:
    base: Path
    adapters: list[Path]
    merged: Path
    device: str
    tensors: list[TensorCheck] = field(default_factory=list)
    model: ModelCheck | None = None
    outputs: bool = True
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tensors) and (self.model is None or self.model.status != "FAIL")

    @property
    def targets(self) -> list[TensorCheck]:
        return [t for t in self.tensors if t.kind == "merge"]

    def fidelity(self) -> dict | None:
        """Worst and median delta loss over the targets whose delta is not zero."""
        losses = [(t.delta_loss, t.name) for t in self.targets if t.delta_loss is not None]
        if not losses:
            return None
        worst = max(losses)
        return {"worst": worst[0], "worst_tensor": worst[1],
                "median": statistics.median(v for v, _ in losses), "targets": len(losses)}

    def failures(self) -> list[str]:
        lines = [f"FAIL {t.name}: {p}" for t in self.tensors for p in t.problems]
        if self.model is not None and self.model.status == "FAIL":
            lines.append(f"FAIL model outputs: {self.model.reason}")
        return lines

    def table(self) -> str:
        names = ", ".join(str(a) for a in self.adapters)
        lines = [f"verify {self.merged} against {self.base} + {names} (on {self.device})"]
        shown = [t for t in self.tensors if t.kind == "merge" or not t.ok]
        head = ("tensor", "dtype", "ulps", "rel err", "delta lost", "layer err", "result")
        rows = [(t.name, t.dtype or "-", _num(t.max_ulps), _num(t.max_rel), _num(t.delta_loss),
                 _num(t.layer_rel), ("ok" if t.ok else "FAIL") + (f" ({t.note})" if t.note else ""))
                for t in shown]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for r in [head, *rows]:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) if i < len(head) - 1 else c
                                   for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        copies = [t for t in self.tensors if t.kind in ("copy", "cast")]
        bad = sum(1 for t in copies if not t.ok)
        lines.append(f"untouched: {len(copies)} tensor(s), "
                     + (f"{bad} NOT as in the base" if bad else "all as in the base (bit for bit)"))
        fid = self.fidelity()
        if fid:
            lines.append(f"delta fidelity (share of the adapter's change lost to the output dtype): "
                         f"worst {fid['worst']:.3g} ({fid['worst_tensor']}), median {fid['median']:.3g}")
        if not self.outputs:
            lines.append("layer and model outputs: not checked (--no-outputs)")
        elif self.model is not None:
            m = self.model
            if m.status == "skipped":
                lines.append(f"model outputs: skipped ({m.reason})")
            else:
                errs = ", ".join(f"{k} rel err {v:.3g} (tolerance {m.tolerance[k]:.3g}; the adapter itself "
                                 f"moves it by {m.adapter_effect[k]:.3g})" for k, v in m.rel_err.items())
                lines.append(f"model outputs ({m.model_class}, random token ids {list(m.input_shape)}, float32, "
                             f"adapter unmerged via hooks vs MERGED): {errs}: " + ("ok" if m.status == "ok" else "FAIL"))
        lines += [f"warning: {w}" for w in self.warnings]
        failures = self.failures()
        lines += failures
        lines.append(f"result: {'OK' if self.ok else 'FAILED'} ({len(self.targets)} target(s), "
                     f"{len(copies)} untouched, {len(failures)} failure(s), {self.seconds:.2f} s)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "base": str(self.base),
            "adapters": [str(a) for a in self.adapters],
            "merged": str(self.merged),
            "device": self.device,
            "tolerance": {"half_ulps": HALF_TOL_ULPS, "float_rel": FLOAT_TOL_REL,
                          "fidelity_warn": FIDELITY_WARN},
            "tensors": [{**asdict(t), "shape": list(t.shape), "ok": t.ok} for t in self.tensors],
            "fidelity": self.fidelity(),
            "outputs_checked": self.outputs,
            "model": None if self.model is None else {**asdict(self.model),
                                                      "input_shape": list(self.model.input_shape)},
            "warnings": list(self.warnings),
            "failures": self.failures(),
            "seconds": self.seconds,
        }


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return "0" if v == 0 else f"{v:.3g}"


def verify(
    base: str | Path,
    adapters: str | Path | list,
    merged: str | Path,
    *,
    weights: list[float] | None = None,
    outputs: bool = True,
    device: str = "auto",
    lora_alpha: float | None = None,
    fan_in_fan_out: bool | None = None,
    enable_lora: tuple[bool, ...] | None = None,
    only: str | None = None,
) -> VerifyReport:
    """Check that `merged` is `base` with `adapters` (times `weights`) merged in; see the module
    docstring for the checks and their tolerances. The reader options (lora_alpha, fan_in_fan_out,
    enable_lora, only) are apply's: pass the ones the merge used. Raises a LoraMergeError for
    unreadable inputs; a wrong merge is not an exception but a report with ok == False."""
    t0 = time.perf_counter()
    base, merged = Path(base), Path(merged)
    adapter_paths = [Path(a) for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters)]
    if not adapter_paths:
        raise UsageError("no adapter given")
    if not merged.exists():
        raise CheckpointError(f"{merged}: merged checkpoint not found; pass the OUT of `loramerge apply` "
                              "(a directory or a .safetensors file)")
    dev = engine.resolve_device(device)
    base_ck = open_checkpoint(base)
    merged_ck = open_checkpoint(merged)
    loaded = load_adapters(adapter_paths, lora_alpha, fan_in_fan_out, enable_lora, only)
    # The plan says what a merge of these inputs writes: every base tensor, plus e.g. an lm_head
    # split off a tied embedding; and which adapter terms land on each.
    plan = build_plan(base_ck, loaded, weights=weights)
    report = VerifyReport(base=base, adapters=adapter_paths, merged=merged, device=str(dev),
                          outputs=outputs, warnings=list(plan.warnings))
    try:
        for job in plan.jobs:
            mref = merged_ck.tensors.get(job.name)
            if mref is None:
                report.tensors.append(TensorCheck(job.name, "missing", shape=job.shape, problems=[
                    f"missing from MERGED (expected {job.dtype} {list(job.shape)}); the merge output is "
                    "incomplete or from other inputs, re-run apply"]))
            else:
                report.tensors.append(_check_tensor(job, mref, base_ck, merged_ck, loaded, dev, layer=outputs))
        expected = {job.name for job in plan.jobs}
        for name, mref in merged_ck.tensors.items():
            if name not in expected:
                report.tensors.append(TensorCheck(name, "extra", dtype=mref.dtype, shape=mref.shape, problems=[
                    f"in MERGED ({mref.dtype} {list(mref.shape)}) but a merge of these inputs does not write "
                    "it (another model's shard, or a LoRA tensor left in?)"]))
    finally:
        base_ck.close()
        merged_ck.close()
    _fidelity_warning(report)
    if outputs:
        from .verify_model import check_model
        report.model = check_model(base_ck, merged_ck, loaded, plan.jobs, dev)
    report.seconds = time.perf_counter() - t0
    return report


def _fidelity_warning(report: VerifyReport) -> None:
    # Only correct targets: a wrong merge also "loses" its delta, and it is already a failure.
    lossy = [t for t in report.targets if t.ok and t.delta_loss is not None and t.delta_loss > FIDELITY_WARN]
    if not lossy:
        return
    worst = max(lossy, key=lambda t: t.delta_loss)
    fix = {"BF16": "re-merge with --dtype float32, or --dtype float16 (8x finer grid) if the weights fit "
                   "its range (|w| < 65504)"}.get(worst.dtype, "re-merge with --dtype float32")
    report.warnings.append(
        f"{len(lossy)} of {len(report.targets)} target(s) lost more than {FIDELITY_WARN:.0%} of the adapter's "
        f"change to rounding; worst {worst.name}: {worst.dtype} kept only {max(0.0, 1 - worst.delta_loss):.0%} "
        f"(||(M - W) - dW|| / ||dW|| = {worst.delta_loss:.3g}). The merge is correct for {worst.dtype}, but the "
        f"merged model behaves more like the base than the adapter intends: {fix}")


# -- one tensor -------------------------------------------------------------------------------

def _ulp(mag: torch.Tensor, code: str) -> torch.Tensor:
    """Spacing of `code`'s grid at magnitude `mag` (float64), subnormals included."""
    p, emin = _GRID[code]
    _, e = torch.frexp(mag)  # mag = f * 2^e with f in [0.5, 1): the binade exponent is e - 1
    e = torch.where(mag > 0, e - 1, emin).clamp_min(emin)
    return torch.ldexp(torch.ones_like(mag), e - (p - 1))


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
    note: str = ""


def _prepare(job: Job, w: torch.Tensor, adapters: list[Adapter], dev: torch.device) -> _Target | str:
    """The expected-value recipe for a job (float64, on the device), or why it cannot be checked."""
    for t in job.terms:
        if t.kind not in ("lora", "bias", "replace"):
            return (f"term of kind {t.kind!r} from {adapters[t.adapter].label}: verify does not know its math, "
                    "so this tensor cannot be checked; update loramerge")
    lora = [t for t in job.terms if t.kind == "lora"]
    transposed = bool(lora) and lora[0].pair.layout == "transposed"
    if any((t.pair.layout == "transposed") != transposed for t in lora):
        return "adapters disagree on the layout of this tensor (transposed and not); cannot check it"
    tg = _Target(_lin(w, transposed), transposed)
    for t in lora:
        fl = lin_factors(adapters[t.adapter], t.pair, torch.float64, dev)
        tg.effects.append((fl[0] * t.factor, fl[1]))
        tg.branches.append((fl, t.factor))
        if t.pair.magnitude_key is not None:  # the plan allows DoRA only alone on its tensor
            tg.magnitude = adapters[t.adapter].tensors[t.pair.magnitude_key].to(dev, torch.float64).reshape(-1)
            tg.note = "DoRA"
    for t in job.terms:
        if t.kind == "bias":  # a bias is a [out, 1] tensor; its delta a rank-1 effect with right = [[1]]
            d = deltas.bias_delta(adapters[t.adapter], t.pair).to(dev)
            tg.effects.append(((d * t.weight).reshape(-1, 1), torch.ones((1, 1), dtype=torch.float64, device=dev)))
    if job.replacement is not None:
        tg.note = "replaced" + (" + " + tg.note if tg.note else "")
    return tg


def _blocks(tg: _Target, m_lin: torch.Tensor, dev: torch.device):
    """Yield (row slice, W, M, E, dora_scale) in float64 on the device: E is the exact expected
    value, dora_scale DoRA's per-row factor m / ||W + dW|| (None without DoRA)."""
    rows, cols = m_lin.shape
    step = max(1, (BLOCK_ELEMS_GPU if dev.type == "cuda" else BLOCK_ELEMS_CPU) // max(cols, 1))
    for i in range(0, rows, step):
        sl = slice(i, min(i + step, rows))
        w = tg.start[sl].to(dev, torch.float64)
        e = w.clone()
        for left, right in tg.effects:
            e.addmm_(left[sl], right)
        scale = None
        if tg.magnitude is not None:
            # PEFT's DoRA: each output row of W + dW rescaled to the learned magnitude
            scale = tg.magnitude[sl] / torch.linalg.vector_norm(e, dim=1)
            e.mul_(scale.unsqueeze(1))
        yield sl, w, m_lin[sl].to(dev).to(torch.float64), e, scale


def _check_tensor(job: Job, mref: TensorRef, base_ck: Checkpoint, merged_ck: Checkpoint,
                  adapters: list[Adapter], dev: torch.device, layer: bool) -> TensorCheck:
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
    w = adapters[rep.adapter].tensors[rep.key] if rep is not None else base_ck.read(src)
    m = merged_ck.read(mref)
    if kind == "copy":
        _check_copy(tc, w, m)
        return tc
    if m.numel() == 0:  # (an empty tensor, cast: nothing to compare)
        tc.max_ulps = tc.max_rel = 0.0
        return tc
    tg = _prepare(job, w, adapters, dev)
    if isinstance(tg, str):
        tc.problems.append(tg)
        return tc
    tc.note = tg.note
    _check_values(tc, tg, m, dev, layer and bool(tg.branches))
    return tc


def _check_copy(tc: TensorCheck, w: torch.Tensor, m: torch.Tensor) -> None:
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
    if layer:
        x = torch.randn(LAYER_ROWS, m_lin.shape[1], generator=torch.Generator().manual_seed(SEED),
                        dtype=torch.float64).to(dev)
        branch = sum(lora_branch(x, fl, f) for fl, f in tg.branches)
        y_m, y_ref, bound = (torch.zeros(LAYER_ROWS, m_lin.shape[0], dtype=torch.float64, device=dev)
                             for _ in range(3))
    for sl, wb, mb, e, dora_scale in _blocks(tg, m_lin, dev):
        # The element's magnitude: W, E, or the delta's terms s * sum_k |B_ik A_kj| when they are larger
        # (a tool that rounds the factors or the delta to the output dtype errs relative to those).
        mag = torch.maximum(e.abs(), wb.abs())
        if tg.effects:
            mag = torch.maximum(mag, sum(left[sl].abs() @ right.abs() for left, right in tg.effects))
        tol_ulp = _ulp(mag, code)
        # half: compare with E correctly rounded (a correct merge is 0 ulp off); float: with E itself
        err = (mb - round_to(e, out_dtype).to(torch.float64)).abs() if half else (mb - e).abs()
        ulps = err / tol_ulp
        if half:
            bad += int((ulps > HALF_TOL_ULPS).sum())
        score = ulps if half else err
        if worst is None or float(score.max()) > worst[0]:
            r, c = divmod(int(score.argmax()), score.shape[1])
            worst = (float(score.max()), sl.start + r, c, float(mb[r, c]), float(e[r, c]), float(wb[r, c]))
        max_ulps = max(max_ulps, float(ulps.max()))
        max_err = max(max_err, float((mb - e).abs().max()))
        max_e = max(max_e, float(e.abs().max()))
        delta = e - wb
        sq_err += float(((mb - e) ** 2).sum())
        sq_delta += float((delta ** 2).sum())
        dot += float(((mb - wb) * delta).sum())
        if layer:
            y_m[:, sl] = x @ mb.T
            y = x @ wb.T + branch[:, sl]
            y_ref[:, sl] = y if dora_scale is None else y * dora_scale
            if half:
                # |M - E| <= |M - round(E)| + |round(E) - E| <= (tol + 1/2) ulp per element
                bound[:, sl] = x.abs() @ ((HALF_TOL_ULPS + 0.5) * tol_ulp).T

    n = m_lin.numel()
    tc.max_ulps = max_ulps
    tc.max_rel = max_err / max_e if max_e > 0 else (0.0 if max_err == 0 else math.inf)
    if sq_delta > 0 and tc.kind == "merge":
        tc.delta_loss = math.sqrt(sq_err / sq_delta)
        tc.delta_ratio = dot / sq_delta
    float_tol = FLOAT_TOL_REL * max_e
    if not half and max_err > float_tol:
        # the float rule's tolerance depends on the whole tensor's max |E|: count in a second pass
        bad = sum(int(((mb - e).abs() > float_tol).sum()) for _, _, mb, e, _ in _blocks(tg, m_lin, dev))
    tc.bad_elements = bad
    _, r, c, mv, ev, wv = worst
    tc.worst = {"index": _index(r, c, tuple(m.shape), tg.transposed), "merged": mv, "expected": ev, "base": wv}
    if bad:
        what = (f"off by more than {HALF_TOL_ULPS:g} ulp of {code} (max {max_ulps:.3g} ulp" if half else
                f"off by more than {FLOAT_TOL_REL:g} x max|expected| = {float_tol:.3g} (max {max_err:.3g}")
        tc.problems.append(
            f"{bad} of {n} elements {what}, max rel err {tc.max_rel:.3g}); worst at {tc.worst['index']}: "
            f"merged {mv:.6g}, expected {ev:.6g}, base {wv:.6g}" + _diagnose(tc, bad, n))
    if layer:
        if not half:
            bound = x.abs().sum(dim=1, keepdim=True) * float_tol
        diff = (y_m - y_ref).abs()
        denom = float(y_ref.abs().max())
        tc.layer_rel = float(diff.max()) / denom if denom > 0 else float(diff.max())
        over = diff > bound * (1 + 1e-9)
        if bool(over.any()):
            tc.problems.append(
                f"layer output: {int(over.sum())} of {over.numel()} outputs of x @ W^T (x ~ randn({LAYER_ROWS}, "
                f"{m_lin.shape[1]}), seed {SEED}) differ from base + LoRA branch s(xA^T)B^T by more than the "
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
