"""apply's reading of the adapters (the plan's terms) against verify's own (verifier/reference).

Per output tensor and adapter: both readings must put the same kinds of term on it (a LoRA delta,
a lora_B bias, a saved full tensor, DoRA's magnitude), and the same values: the LoRA deltas are
compared as c * s * B @ A applied to random probe vectors (a few matrix-vector products, never the
dense delta), biases, magnitudes and saved tensors as vectors. Any difference is a failure of that
tensor, because the merge followed apply's reading. Where the two agree, the expected values of
the weight, layer and model checks come from verify's own reading (a JobRef per tensor).

Terms verify has no second reading of (PEFT's other tuners, LyCORIS modules in kohya files,
trained token rows) keep apply's reading; each such tensor says so in the report.
"""

from __future__ import annotations

import math

import torch

from ..engine import deltas
from ..types import Adapter, Job
from .reference import JobRef, Reading, RefTerm
from .report import TensorCheck

OWN_KINDS = ("lora", "bias", "replace")
PROBES = 4
SEED = 0
# Both readings turn the same stored factors into float64: they differ by summation order only.
REL_TOL = 1e-9
# terms of a covered adapter that verify's own reading leaves to apply's: kohya files' LyCORIS
# modules (kind 'delta'), PEFT's trained token rows
KIND_WORDS = {"delta": "LyCORIS LoHa/LoKr modules", "scale": "IA3 scaling", "rows": "trained token rows"}


class CrossCheck:
    """What the comparison found: refs (job name -> JobRef), problems (job name -> lines), reading
    (job name -> which reading the expected values come from), unplaced (adapter target, why)."""

    def __init__(self):
        self.refs: dict[str, JobRef] = {}
        self.problems: dict[str, list[str]] = {}
        self.reading: dict[str, str] = {}
        self.unplaced: list[tuple[str, str]] = []


def cross_check(jobs: list[Job], adapters: list[Adapter], own: Reading, weights: list[float]) -> CrossCheck:
    cc = CrossCheck()
    cc.unplaced = list(own.unplaced)
    for job in jobs:
        terms = own.terms.get(job.name, [])
        if not job.terms and not terms:
            continue
        problems: list[str] = []
        apply_only = set()
        for t in job.terms:
            if t.adapter not in own.covered:
                apply_only.add(f"{own.skipped.get(t.adapter, adapters[t.adapter].label)}, which verify has no "
                               "second reading of")
            elif _param(t):
                apply_only.add(f"target_parameters (MoE experts) from {adapters[t.adapter].label}, which the model "
                               "check applies to transformers' own parameters")
            elif t.kind not in OWN_KINDS:
                apply_only.add(f"{KIND_WORDS.get(t.kind, t.kind)} from {adapters[t.adapter].label}")
        ref = JobRef(covered=set(own.covered))
        used = {t.adapter for t in job.terms if t.kind in OWN_KINDS and not _param(t)} | {x.adapter for x in terms}
        for a in sorted(used & own.covered):
            w = weights[a]
            mine = [x for x in terms if x.adapter == a]
            theirs = [t for t in job.terms if t.adapter == a and not _param(t)]
            problems += _compare_lora(job, adapters[a], [t for t in theirs if t.kind == "lora"],
                                      [x for x in mine if x.kind == "lora"], w, ref)
            problems += _compare_bias(adapters[a], [t for t in theirs if t.kind == "bias"],
                                      [x for x in mine if x.kind == "bias"], w, ref)
            problems += _compare_replace(job, adapters[a], [t for t in theirs if t.kind == "replace"],
                                         [x for x in mine if x.kind == "replace"], own)
        own_used = bool(used & own.covered)
        cc.reading[job.name] = ("own" if own_used else "") + (
            (" + " if own_used else "") + "apply's only: " + "; ".join(sorted(apply_only)) if apply_only else "")
        if problems:
            cc.problems[job.name] = problems
        cc.refs[job.name] = ref
    return cc


def _param(t) -> bool:
    """A term of PEFT target_parameters (MoE experts): verify's own reading leaves those to apply's."""
    return t.pair is not None and bool(t.pair.experts)


def _only(in_apply: bool) -> str:
    return "in apply's reading only, not in verify's own reading of the adapter file" if in_apply else \
        "in verify's own reading of the adapter file only, not in apply's reading"


def _who(adapter: Adapter, module: str) -> str:
    return f"{adapter.label}: {module}"


def _compare_lora(job: Job, adapter: Adapter, theirs: list, mine: list[RefTerm], w: float, ref: JobRef) -> list[str]:
    for x in mine:
        left, right = x.left, x.right
        ref.lora.append(((left, right), w * x.scale))
        ref.transposed = x.layout == "transposed"
        if x.magnitude is not None:
            ref.magnitude = x.magnitude
    if not theirs and not mine:
        return []
    if not mine:
        return [f"apply's reading puts {_who(adapter, theirs[0].pair.module)} on this tensor (scale "
                f"{theirs[0].pair.scale:g}); verify's own reading of the adapter file puts nothing from it here"]
    if not theirs:
        return [f"verify's own reading of the adapter file puts {_who(adapter, mine[0].module)} on this tensor "
                f"({mine[0].how}), apply's reading does not: the merge left it out"]
    rows = job.shape[0] if job.shape else 1
    cols = math.prod(job.shape[1:]) if len(job.shape) > 1 else 1
    x = torch.randn(cols, PROBES, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    y_apply = torch.zeros(rows, PROBES, dtype=torch.float64)
    for t in theirs:  # the plan's factors in the tensor's own 2-D view (what the engine merges)
        left, right = deltas.factors(adapter, t.pair, torch.float64)
        if left.shape[0] != rows or right.shape[1] != cols:
            return [f"apply's reading of {_who(adapter, t.pair.module)} gives a [{left.shape[0]}, {right.shape[1]}] "
                    f"change for this {list(job.shape)} tensor"]
        y_apply += t.factor * (left @ (right @ x))
    y_own = torch.zeros(rows, PROBES, dtype=torch.float64)
    for m in mine:
        f = w * m.scale
        left, right = m.left.double(), m.right.double()
        y_own += f * (right.T @ (left.T @ x)) if m.layout == "transposed" else f * (left @ (right @ x))
    problems = []
    size = max(float(y_own.norm()), float(y_apply.norm()))
    diff = float((y_apply - y_own).norm())
    if diff > REL_TOL * size:
        ratio = float((y_apply * y_own).sum() / (y_own * y_own).sum()) if float(y_own.norm()) > 0 else math.inf
        p, m = theirs[0].pair, mine[0]
        problems.append(
            f"apply's reading of {_who(adapter, p.module)} differs from verify's own reading of the adapter file: "
            f"the change c*s*B@A differs by {diff / size:.3g} (relative, on {PROBES} random probes; apply's is "
            f"{ratio:.4g}x verify's). apply: scale {p.scale:g} (alpha {p.alpha:g}, rank {p.rank}, {p.layout}); "
            f"verify: scale {m.scale:g} ({m.how}, {m.layout}). The merge follows apply's reading")
    dora_apply = [t for t in theirs if t.pair.magnitude_key is not None]
    dora_own = [m for m in mine if m.magnitude is not None]
    if bool(dora_apply) != bool(dora_own):
        problems.append(f"{_who(adapter, mine[0].module)}: DoRA (lora_magnitude_vector) {_only(bool(dora_apply))}")
    elif dora_apply:
        m_apply = adapter.tensors[dora_apply[0].pair.magnitude_key].reshape(-1).double()
        if m_apply.shape != dora_own[0].magnitude.shape or not torch.equal(m_apply, dora_own[0].magnitude):
            problems.append(f"{_who(adapter, mine[0].module)}: apply's and verify's readings give different DoRA "
                            "magnitude vectors")
    return problems


def _compare_bias(adapter: Adapter, theirs: list, mine: list[RefTerm], w: float, ref: JobRef) -> list[str]:
    for m in mine:
        ref.bias.append(w * m.scale * m.value)
    if not theirs and not mine:
        return []
    if bool(theirs) != bool(mine):
        who = _who(adapter, (theirs[0].pair.module if theirs else mine[0].module))
        return [f"{who}: a lora_B bias on this tensor {_only(bool(theirs))}"]
    got = sum(deltas.bias_delta(adapter, t.pair) * t.weight for t in theirs)
    want = sum(ref.bias[-len(mine):])
    if got.shape != want.shape or float((got - want).norm()) > REL_TOL * max(float(want.norm()), float(got.norm())):
        return [f"{_who(adapter, mine[0].module)}: the lora_B bias delta differs between apply's reading (scale "
                f"{theirs[0].pair.scale:g}) and verify's own ({mine[0].how}: scale {mine[0].scale:g})"]
    return []


def _compare_replace(job: Job, adapter: Adapter, theirs: list, mine: list[RefTerm], own: Reading) -> list[str]:
    if not mine and theirs and job.source.name != job.name:
        # an output made from another base tensor (an lm_head untied from its embedding) starts from
        # that tensor's saved replacement
        mine = [x for x in own.terms.get(job.source.name, []) if x.adapter == theirs[0].adapter
                and x.kind == "replace"]
    if not theirs and not mine:
        return []
    if bool(theirs) != bool(mine):
        what = f"{adapter.label}: {theirs[0].key}" if theirs else _who(adapter, mine[0].module)
        return [f"{what}: a full saved tensor replaces this one {_only(bool(theirs))}"]
    got, want = adapter.tensors[theirs[0].key], mine[0].value
    if got.shape != want.shape or not torch.equal(got.double(), want.double()):
        return [f"{adapter.label}: apply's reading replaces this tensor with {theirs[0].key}, verify's own with "
                f"{mine[0].module}, and they differ"]
    return []


def attach(report, cc: CrossCheck) -> None:
    """Put the comparison's failures and each tensor's reading into the report (a VerifyReport);
    a target verify's own reading cannot place on any tensor is a failure of its own."""
    by_name = {t.name: t for t in report.tensors}
    for name, label in cc.reading.items():
        if name in by_name:
            by_name[name].reading = label
    for name, lines in cc.problems.items():
        if name in by_name:  # first: the disagreement explains the wrong values that follow
            by_name[name].problems[:0] = lines
    for who, why in cc.unplaced:
        report.tensors.append(TensorCheck(who, "unplaced", problems=[
            f"verify's own reading of the adapter file cannot place this target ({why}), while apply's reading "
            "placed it: the two readings disagree on where it lands"]))
