"""What verify found, per tensor and for the model, and how it is shown (table, JSON). The
tolerances that decide pass or fail are defined here, next to the report that quotes them."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..report import JsonReport, jsonable

# Output dtype -> (precision in bits, counting the implicit one; smallest normal exponent).
_GRID = {"BF16": (8, -126), "F16": (11, -14), "F32": (24, -126), "F64": (53, -1022)}
HALF_CODES = ("BF16", "F16")
HALF_TOL_ULPS = 2.0
FLOAT_TOL_REL = 1e-6
# FP8 outputs: each value within half an e4m3 step (at its block's scale) of the exact result, plus
# this much for float64 summation-order noise; each scale within 2^-23 of amax / 448.
FP8_TOL_ULPS = 0.5 + 1e-6
FP8_SCALE_TOL_REL = 2.0 ** -23
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
    delta_dropped: float | None = None  # FP8 output: share of the elements dW touches whose stored value
                                        # is the one W alone would get at the new scale
    qlora_shift: float | None = None    # --qlora: ||W_q - W|| / ||dW||, how far a plain merge would be
    problems: list[str] = field(default_factory=list)
    note: str = ""
    # where the expected values come from: "own" (verify's own reading of the adapter files, which
    # agreed with apply's), "apply's only: <why>" (terms verify has no second reading of), or both
    reading: str = ""
    oracle: float | None = None         # --oracle peft: max ulps (half) / max rel err (float) vs PEFT

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
class OracleCheck:
    """--oracle peft (oracle_peft.py): PEFT's own merge against MERGED."""

    status: str                         # ok | FAIL
    source: str                         # which PEFT, which model class, which dtype
    compared: int = 0
    failed: int = 0
    not_judged: dict[str, str] = field(default_factory=dict)   # tensor -> why


@dataclass
class VerifyReport(JsonReport):
    base: Path
    adapters: list[Path]
    merged: Path
    device: str
    tensors: list[TensorCheck] = field(default_factory=list)
    model: ModelCheck | None = None
    outputs: bool = True
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # MERGED's files against its loramerge_manifest.json (writers/manifest.check), None without one
    manifest: dict | None = None
    oracle: OracleCheck | None = None

    @property
    def ok(self) -> bool:
        return (all(t.ok for t in self.tensors) and (self.model is None or self.model.status != "FAIL")
                and not (self.manifest or {}).get("problems"))

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
        lines += [f"FAIL {p}" for p in (self.manifest or {}).get("problems", [])]
        return lines

    def summary(self) -> str:
        return self.table()

    def table(self) -> str:
        names = ", ".join(str(a) for a in self.adapters)
        lines = [f"verify {self.merged} against {self.base} + {names} (on {self.device})"]
        shown = [t for t in self.tensors if t.kind == "merge" or not t.ok]
        head = ("tensor", "dtype", "ulps", "rel err", "delta lost", "layer err", "reading", "result")
        rows = [(t.name, t.dtype or "-", _num(t.max_ulps), _num(t.max_rel), _num(t.delta_loss),
                 _num(t.layer_rel), _reading(t.reading), ("ok" if t.ok else "FAIL") + (f" ({t.note})" if t.note else ""))
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
        lines += self._reading_lines()
        lines += self._quantized_lines()
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
        lines += self._oracle_lines()
        m = self.manifest
        if m is None:
            lines.append("manifest: none (outputs of loramerge before its manifests, or not made by it)")
        else:
            lines.append(f"manifest: {m['files']} file(s) listed in {Path(m['manifest']).name}: "
                         + (f"{len(m['problems'])} changed or missing" if m["problems"] else "all as written (sha256)"))
            lines += [f"note: {n}" for n in m["notes"]]
        lines += [f"warning: {w}" for w in self.warnings]
        failures = self.failures()
        lines += failures
        lines.append(f"result: {'OK' if self.ok else 'FAILED'} ({len(self.targets)} target(s), "
                     f"{len(copies)} untouched, {len(failures)} failure(s), {self.seconds:.2f} s)")
        return "\n".join(lines)

    def _reading_lines(self) -> list[str]:
        """Where the expected values came from (TensorCheck.reading), counted over the targets."""
        read = [t for t in self.tensors if t.reading]
        if not read:
            return []
        own = sum(1 for t in read if t.reading.startswith("own"))
        why: dict[str, int] = {}
        for t in read:
            if "apply's only: " in t.reading:
                for reason in t.reading.split("apply's only: ", 1)[1].split("; "):
                    why[reason] = why.get(reason, 0) + 1
        line = (f"expected values: {own} tensor(s) from verify's own reading of the adapter files, cross-checked "
                "with apply's reading")
        if why:
            line += "; checked against apply's reading only: " + "; ".join(f"{n} tensor(s) with {r}" for r, n in why.items())
        return [line]

    def _oracle_lines(self) -> list[str]:
        o = self.oracle
        if o is None:
            return []
        lines = [f"oracle: {o.source}: {o.compared} tensor(s) compared, "
                 + (f"{o.failed} differ (FAIL lines below)" if o.failed else "all within the rules above")]
        lines += [f"oracle: not judged: {n} ({why})" for n, why in o.not_judged.items()]
        return lines

    def _quantized_lines(self) -> list[str]:
        lines = []
        fp8 = [t for t in self.targets if t.delta_dropped is not None]
        if fp8:
            worst = max(fp8, key=lambda t: t.delta_dropped)
            lines.append(f"FP8: {len(fp8)} target(s) requantized with fresh scales; in {statistics.median(t.delta_dropped for t in fp8):.1%} "
                         f"of their elements (median; worst {worst.name}: {worst.delta_dropped:.1%}) the adapter's "
                         "change did not survive at all (the FP8 value is the one W alone would get)")
        shifts = [t for t in self.targets if t.qlora_shift is not None]
        if shifts:
            worst = max(shifts, key=lambda t: t.qlora_shift)
            lines.append(f"QLoRA: a plain merge into the unquantized base would differ from this one by "
                         f"{statistics.median(t.qlora_shift for t in shifts):.3g}x the adapter's own change (median "
                         f"||W_q - W|| / ||dW||; worst {worst.name}: {worst.qlora_shift:.3g}x)")
        return lines

    def to_json(self) -> dict:
        return jsonable({
            "ok": self.ok,
            "base": str(self.base),
            "adapters": [str(a) for a in self.adapters],
            "merged": str(self.merged),
            "device": self.device,
            "tolerance": {"half_ulps": HALF_TOL_ULPS, "float_rel": FLOAT_TOL_REL,
                          "fp8_ulps": FP8_TOL_ULPS, "fp8_scale_rel": FP8_SCALE_TOL_REL,
                          "fidelity_warn": FIDELITY_WARN},
            "tensors": [{**asdict(t), "shape": list(t.shape), "ok": t.ok} for t in self.tensors],
            "fidelity": self.fidelity(),
            "outputs_checked": self.outputs,
            "model": None if self.model is None else {**asdict(self.model),
                                                      "input_shape": list(self.model.input_shape)},
            "manifest": self.manifest,
            "oracle": None if self.oracle is None else asdict(self.oracle),
            "warnings": list(self.warnings),
            "failures": self.failures(),
            "seconds": self.seconds,
        })


def _reading(label: str) -> str:
    if not label:
        return "-"
    return {"own": "own"}.get(label, "apply" if label.startswith("apply") else "own+apply")


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return "0" if v == 0 else f"{v:.3g}"


def fidelity_warning(report: VerifyReport) -> None:
    # Only correct targets: a wrong merge also "loses" its delta, and it is already a failure.
    lossy = [t for t in report.targets if t.ok and t.delta_loss is not None and t.delta_loss > FIDELITY_WARN]
    if not lossy:
        return
    worst = max(lossy, key=lambda t: t.delta_loss)
    fix = {"BF16": "re-merge with --dtype float32, or --dtype float16 (8x finer grid) if the weights fit "
                   "its range (|w| < 65504)",
           "F8_E4M3": "FP8 keeps 4 significant bits, so a delta much smaller than the weights survives only "
                      "partly or not at all" + (f" (not at all in {worst.delta_dropped:.0%} of {worst.name}'s elements)"
                                                if worst.delta_dropped is not None else "")
                      + "; re-merge with --dtype bfloat16 for a plain bf16 checkpoint that keeps it"
           }.get(worst.dtype, "re-merge with --dtype float32")
    report.warnings.append(
        f"{len(lossy)} of {len(report.targets)} target(s) lost more than {FIDELITY_WARN:.0%} of the adapter's "
        f"change to rounding; worst {worst.name}: {worst.dtype} kept only {max(0.0, 1 - worst.delta_loss):.0%} "
        f"(||(M - W) - dW|| / ||dW|| = {worst.delta_loss:.3g}). The merge is correct for {worst.dtype}, but the "
        f"merged model behaves more like the base than the adapter intends: {fix}")
