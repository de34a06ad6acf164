"""Library entry points. The CLI is a thin shell over these."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import collections_held, engine, frozen_imports
from .engine import jit_time, tuners
from .engine.precision import guarded
from .engine.timeline import since_start
from .errors import AdapterError, UsageError
from .plan import build_plan, describe, plan_json
from .plan.codecs import qlora_codec
from .readers import hub
from .readers.adapters import load_adapters
from .readers.checkpoint import open_checkpoint
from .report import JsonReport
from .types import Adapter, Plan
from .writers import manifest
from .writers.model_dir import copy_extras, write_index
from .writers.headstart import HeadStart
from .writers.output import Staged, check_disk_space, check_output_path, commit_all

if TYPE_CHECKING:
    from .verifier.report import VerifyReport

ACCUM = {"float32": torch.float32, "float64": torch.float64}

frozen_imports()


@dataclass
class ApplyReport(JsonReport):
    """What apply did. JSON (--json): every field below except plan_text; `plan` as
    plan_json (the --dry-run plan as data); `verification` is verify's report with --verify."""

    json_exclude = ("plan", "plan_text")
    json_extra = ("gbps",)

    out: Path
    dry_run: bool
    device: str
    tensors_merged: int = 0
    tensors_copied: int = 0
    tensors_cast: int = 0
    bytes_written: int = 0
    # of bytes_written: what the CLI's head start wrote while the process was still importing and
    # planning: untouched tensors, and the premerge worker's results (writers/headstart.py)
    bytes_early: int = 0
    seconds: float = 0.0
    exact_fixups: int = 0
    # of tensors_merged: merged by the CLI's premerge worker while this process was still starting
    # (engine/premerge.py), each the very tensor this process would have computed
    tensors_premerged: int = 0
    files: list[str] = field(default_factory=list)
    carried_over: list[str] = field(default_factory=list)
    not_carried_over: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    plan_text: str = ""
    plan: Plan | None = field(default=None, repr=False)
    # thread seconds per stage (they overlap): read, math, write, and hash_wait, the part of write
    # spent waiting for the manifest's sha256 of what was just written to catch up; compile, the
    # part of math numba spent compiling the CPU kernels (the first run after an install);
    # buffer_wait, the math waiting for a free output buffer (the writer's pace), result_wait, the
    # writer waiting for the math's next result (the math's pace)
    stage_seconds: dict = field(default_factory=dict)
    verification: VerifyReport | None = None   # set by `apply --verify`

    @property
    def ok(self) -> bool:
        return self.verification is None or self.verification.ok

    def to_json(self) -> dict:
        out = super().to_json()
        out["plan"] = plan_json(self.plan) if self.plan is not None else None
        return out

    @property
    def gbps(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.dry_run:
            return self.plan_text + "\n(dry run: nothing was written)"
        lines = [
            f"merged {self.tensors_merged} tensors, copied {self.tensors_copied} bit for bit"
            + (f", cast {self.tensors_cast}" if self.tensors_cast else ""),
            f"wrote {self.bytes_written / 1e9:.3f} GB in {len(self.files)} file(s) to {self.out} "
            f"in {self.seconds:.2f} s ({self.gbps:.2f} GB/s) on {self.device}",
        ]
        if self.carried_over:
            lines.append("carried over: " + ", ".join(self.carried_over))
        if self.not_carried_over:
            lines.append("not carried over (weights or folders): " + ", ".join(self.not_carried_over))
        compiled = self.stage_seconds.get("compile", 0.0)
        if compiled >= 1.0:
            lines.append(f"compiled the CPU kernels for this machine: {compiled:.1f} s of this run (once: later "
                         "runs load them from numba's cache)")
        lines += [f"warning: {w}" for w in self.warnings]
        if self.verification is not None:
            lines.append(self.verification.summary())
        return "\n".join(lines)


# The garbage collector's automatic collections are held while apply runs: two full collections
# during a 1.1B merge cost 0.31 s on a 2-core machine (gc.callbacks), stalling the reader and
# writer threads and taking a core from the merge. A merge makes no reference cycles worth
# collecting (its buffers are pooled and reused); whatever cycles it leaves are found by the first
# automatic collection after it.
@collections_held()
@guarded  # IEEE float32 matmuls for the merge math (engine/precision.py)
def apply(
    base: str | Path,
    adapters: str | Path | list,
    out: str | Path,
    *,
    weights: list[float] | None = None,
    dtype: str = "auto",
    device: str = "auto",
    accum: str = "float32",
    shard_size: int | str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    sync: bool = True,
    lora_alpha: float | None = None,
    fan_in_fan_out: bool | None = None,
    enable_lora: tuple[bool, ...] | None = None,
    only: str | None = None,
    revision: str | None = None,
    qlora: str | None = None,
    qlora_double_quant: bool = True,
    qlora_kernel: str = "cuda",
    _command: str = "apply",
    _head_start: HeadStart | None = None,
    _premerge=None,
) -> ApplyReport:
    """Merge one or more LoRA adapters into `base`, writing a new checkpoint at `out`.

    W' = W + sum_i weights[i] * s_i * B_i @ A_i per target, rounded once to the output dtype
    (`dtype='auto'` keeps each tensor's own): correctly rounded for bf16/fp16, and for float32 with
    accum='float64' (README "Numerics"; `accum` is the first pass's precision). `out` is a
    directory, or a file path ending in .safetensors for a single-file output. loralib checkpoints need `lora_alpha` (not stored), and
    `fan_in_fan_out` / `enable_lora` where the shapes cannot tell. `base` and `adapters` may be
    Hugging Face Hub ids (readers/hub.py; `revision` for those without their own @REV).
    `qlora` ('nf4' | 'fp4') merges each linear target into the bitsandbytes 4-bit round trip of its
    base weight, as a QLoRA adapter saw it (blocksize 64, absmax double-quantized unless
    `qlora_double_quant` is False; `qlora_kernel` 'cuda' or 'cpu' picks whose roundings). FP8 and
    bitsandbytes 4-bit bases are read through their codecs (see loramerge.codecs). Raises a
    LoraMergeError subclass on any user error, before anything is written.
    """
    t0, started, compiled = time.perf_counter(), since_start(), jit_time.seconds()
    if accum not in ACCUM:
        raise UsageError(f"--accum {accum!r}: expected float32 or float64")
    qlora_spec = qlora_codec(qlora, qlora_double_quant, qlora_kernel)
    out = Path(out)
    adapter_paths = [a for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters)]
    if not adapter_paths:
        raise UsageError("no adapter given")
    devices = engine.resolve_devices(device)
    if not dry_run:
        engine.warm_up(devices)  # while the headers are read and the plan is built
    base = hub.resolve(base, "base", revision)
    adapter_paths = hub.resolve_all(adapter_paths, "adapter", revision)
    ck = open_checkpoint(base)
    loaded = load_adapters(adapter_paths, lora_alpha, fan_in_fan_out, enable_lora, only)
    single_file = out.suffix == ".safetensors"
    plan = build_plan(ck, loaded, weights=weights, dtype=dtype, shard_size=shard_size, single_file=single_file,
                      qlora=qlora_spec)
    report = ApplyReport(out=out, dry_run=dry_run, device=",".join(map(str, devices)), plan=plan,
                         warnings=list(plan.warnings))
    report.plan_text = describe(plan, loaded)
    report.warnings += check_output_path(out, [base, *adapter_paths], overwrite)
    if dry_run:
        return report
    # what a head start wrote is already off the free space (its shards are taken over, not copied)
    check_disk_space(out, plan.nbytes - (_head_start.written if _head_start is not None else 0))

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc="merging", leave=False)
    inputs = {"base": manifest.base_inputs(ck)}
    adapter_inputs = manifest.adapter_inputs_later(loaded, weights)  # hashed while the merge runs
    options = {"weights": weights, "dtype": dtype, "accum": accum, "shard_size": shard_size, "qlora": qlora,
               **({"qlora_double_quant": qlora_double_quant, "qlora_kernel": qlora_kernel} if qlora else {})}
    staged = Staged(out, is_dir=not single_file, overwrite=overwrite)
    # a single file's manifest is a sibling, committed with it (overwritten with it: OUT was checked)
    beside = Staged(manifest.sibling(out), is_dir=False, overwrite=True, group=staged) if single_file else None
    written: dict[str, dict] = {}
    try:
        with staged as tmp, (beside or contextlib.nullcontext()) as tmp_manifest:
            out_dir = tmp.parent if single_file else tmp
            if single_file:
                plan.files[0].name = tmp.name  # the staged file; renamed to `out` on commit
            if not single_file:  # first: they need only the plan, and are then off the critical path
                if plan.indexed:
                    write_index(plan, tmp, written)
                report.carried_over = copy_extras(plan, tmp, written)
            planned = since_start()
            early = _head_start.stop() if _head_start is not None and not single_file else None
            stats = engine.run(plan, ck, loaded, out_dir, devices, ACCUM[accum],
                               progress=bar.update if bar else None, sync=sync, early=early,
                               premerged=_premerge)
            written.update({out.name if single_file else k: v for k, v in stats.files.items()})
            inputs["adapters"] = adapter_inputs.result()
            record = manifest.dumps(manifest.build(_command, inputs, written, options=options,
                                                   targets=plan_json(plan)["targets"],
                                                   output_dtypes=manifest.output_dtypes(plan)))
            (tmp_manifest or tmp / manifest.NAME).write_bytes(record)
            # every file is complete and fsynced: the rename is the commit point
            commit_all(*([staged, beside] if beside is not None else [staged]))
            committed = since_start()
    finally:
        if bar is not None:
            bar.close()
        ck.close()
    report.not_carried_over = list(plan.skipped_files)
    report.tensors_merged, report.tensors_copied, report.tensors_cast = stats.merged, stats.copied, stats.cast
    report.bytes_written = stats.bytes_written
    report.bytes_early = stats.bytes_early
    report.exact_fixups = stats.exact_fixups
    report.tensors_premerged = (_premerge.taken if _premerge is not None else 0) + stats.premerged_early
    report.files = [f.name for f in plan.files] if not single_file else [out.name]
    report.stage_seconds = {"read": stats.seconds_read, "math": stats.seconds_math, "write": stats.seconds_write,
                            "hash_wait": stats.seconds_hash_wait,
                            "buffer_wait": stats.seconds_buffer_wait, "result_wait": stats.seconds_result_wait,
                            "compile": jit_time.seconds() - compiled,
                            # when, in seconds since the process started (engine/timeline.py)
                            "at_start": started, "at_planned": planned,
                            **{f"at_{k}": v for k, v in stats.marks.items()}, "at_committed": committed}
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class UnmergeReport(ApplyReport):
    """An ApplyReport plus what the unmerge can and cannot give back (`recovery`, one line each)."""

    recovery: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join([super().summary(), *self.recovery])


def _not_invertible(adapters: list[Adapter]) -> list[str]:
    """Adapter parts whose merge cannot be undone by subtracting a delta."""
    problems = []
    for a in adapters:
        dora = [p.module for p in a.pairs if getattr(p, "magnitude_key", None)]
        if dora:
            shown = ", ".join(dora[:3]) + (f" and {len(dora) - 3} more" if len(dora) > 3 else "")
            problems.append(f"{a.label}: {shown} {'is' if len(dora) == 1 else 'are'} DoRA: the merge rescaled "
                            "each output unit of W + sBA to a learned magnitude, and the norms it divided by are "
                            "not stored anywhere, so W cannot be recovered from the merged weights")
        replaced = list(getattr(a, "replacements", None) or {})
        if replaced:
            shown = ", ".join(replaced[:3]) + (f" and {len(replaced) - 3} more" if len(replaced) > 3 else "")
            problems.append(f"{a.label}: {shown} {'was' if len(replaced) == 1 else 'were'} replaced by the "
                            "adapter's full tensors (modules_to_save or trained layers); the original base "
                            "tensors are not stored anywhere")
        tokens = [tr.target for tr in getattr(a, "tokens", None) or []]
        if tokens:
            problems.append(f"{a.label}: trained token rows of {', '.join(tokens)} (trainable_token_indices) "
                            "replaced the base's rows, and PEFT does not save the rows they overwrote")
    return problems


def recovery_notes(plan: Plan, accum: str = "float32", merge_accum: str | None = "float32") -> list[str]:
    """What unmerging gives back, per output dtype, assuming the merged checkpoint was written by
    `loramerge apply` with the same adapters and weights and without changing its dtype. `accum`
    is the unmerge's first pass, `merge_accum` the merge's (its manifest's record; None: unknown).

    Derivation. Let W be the original (on the dtype's grid), D the exact delta, M the merged value.
    Correctly rounded merge (bf16/fp16 always; float32 with --accum float64):
        M = W + D + e1 with |e1| <= ulp(M)/2    (ulp(M): grid spacing at M; D can move W + D
        across a power of two, so it is the spacing at M, not at W, that bounds e1).
    Correctly rounded unmerge: R = round(M - D) = round(W + e1). W is on the grid, so the nearest
    grid point to W + e1 is no farther from it than W: |R - (W + e1)| <= |e1|. Hence
        |R - W| <= 2 |e1| <= ulp(M)  <= 2^(1-p) |M|   (p = significand bits: bf16 8, fp16 11).
    R == W whenever e1 is below half the grid spacing around W (the common case for deltas small
    relative to W); the merge's rounding error e1 itself is lost, so exact recovery cannot be promised.
    Float32 with float32 accumulation: each pass has |error| <= u|result| + 1.25 (R+3) u E_ij + U_ij,
    u = 2^-24, E = |B'| @ |A|, U the underflow term (engine/lowrank.py's stage-1 bound), so
    |R - W| <= u(|M| + |R|) + 2.5 (R+3) u E_ij + 2 U_ij.
    """
    merged = [j for j in plan.jobs if any(t.kind != "replace" for t in j.terms)]
    # float32's 1-ulp bound needs both passes correctly rounded: the merge's too (a default
    # merge, float32 first pass, left elements of a cancelling W + delta up to 640 ulps of M off)
    exact32 = accum == "float64" and merge_accum == "float64"
    by_dtype: dict[str, int] = {}
    for j in merged:
        # LoHa/LoKr deltas and IA3 are always computed in float64 and rounded once (engine/job_math.py)
        f64 = any(t.kind == "scale" or (t.kind == "delta" and not tuners.is_lowrank(t.pair)) for t in j.terms)
        code = "F32-exact" if j.dtype == "F32" and f64 and not exact32 else j.dtype
        by_dtype[code] = by_dtype.get(code, 0) + 1
    notes = []
    for code, n in sorted(by_dtype.items()):
        if code == "F32-exact":
            notes.append(f"float32 ({n} tensors with LoHa/LoKr/IA3 terms, merged in float64): |W_rec - W| <= 1 ulp "
                         "of the merged value (<= 2^-23 relative); most elements come back bit for bit")
        elif code == "F32" and not exact32:
            # (either pass in float64 only tightens its own share of this bound)
            why = {None: "the merge's --accum is not known (no manifest)", "float32": "the merge accumulated in "
                   "float32 (its manifest)"}.get(merge_accum, "this unmerge accumulated in float32")
            notes.append(f"float32 ({n} tensors): recovered to float32 rounding, not bit for bit ({why}; 1 ulp "
                         "of the merged value needs --accum float64 for both): per element "
                         "|W_rec - W| <= 2^-24 (|W_merged| + |W_rec|) + 2.5 (R+3) 2^-24 (|B'| |A|)_ij "
                         "+ 2^-124 (2R + 4 + sum_k |A_kj| + sum_k |B'_ik|) (R = total rank; about 1e-7 relative)")
        elif code in ("F32", "F64"):
            p = 24 if code == "F32" else 53
            notes.append(f"{'float32' if code == 'F32' else 'float64'} ({n} tensors): |W_rec - W| <= 1 ulp of the "
                         f"merged value (<= 2^-{p - 1} relative); most elements come back bit for bit")
        elif code == "F8_E4M3":
            notes.append(f"FP8 ({n} tensors): NOT exactly recoverable: the merge and the unmerge each requantize "
                         "to 3 mantissa bits at fresh block scales. Bound per element: |W_rec - W| <= half an e4m3 "
                         "step at the merged block's scale plus half a step at the unmerged one (each step <= 1/8 of "
                         "the value, 1/16 at the block's top)")
        else:
            name, p = {"BF16": ("bfloat16", 8), "F16": ("float16", 11)}[code]
            notes.append(f"{name} ({n} tensors): NOT exactly recoverable: the merge rounded W + delta to the "
                         f"{name} grid and that rounding error is lost. Bound per element: |W_rec - W| <= 1 ulp "
                         f"of the merged value <= 2^-{p - 1} |W_merged| ({2.0 ** (1 - p):.2%} relative); most "
                         "elements come back bit for bit")
    ia3 = sum(1 for j in merged if any(t.kind == "scale" for t in j.terms))
    if ia3:
        # M = round(W l) = W l + e1, R = round(M / l) = round(W + e1 / l): W is on the grid, so
        # |R - W| <= 2 |e1| / |l| <= ulp(M) / |l|, about 2^(1-p) |W| since |M| ~ |W l|.
        notes.append(f"IA3 ({ia3} tensors): divided back by ia3_l, |W_rec - W| <= ulp(W_merged) / |l| (about one "
                     "ulp of W); entries of l near 0 amplify the merge's rounding error by 1/|l|")
    if any(j.dtype != j.source.dtype for j in merged):
        notes.append("note: --dtype changed the tensors' dtype; the bounds above are in the output dtype")
    notes.append("these bounds hold if the merged checkpoint was written by `loramerge apply` with the same "
                 "adapters and weights; a merge that rounded twice (e.g. PEFT's in half precision) or changed "
                 "the dtype loses more")
    return notes


def unmerge(
    merged: str | Path,
    adapters: str | Path | list,
    out: str | Path,
    *,
    weights: list[float] | None = None,
    **options,
) -> UnmergeReport:
    """Undo `apply`: W = W' - sum_i weights[i] * s_i * B_i @ A_i, in float32 (or `accum`), rounded
    once. `weights` are the ones the merge used (default 1 each). Takes apply's other options.
    The report's `recovery` lines say how exactly W comes back (see recovery_notes)."""
    adapter_paths = [a for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters)]
    if not adapter_paths:
        raise UsageError("no adapter given")
    adapter_paths = hub.resolve_all(adapter_paths, "adapter", options.get("revision"))
    merged = hub.resolve(merged, "base", options.get("revision"))
    if weights is not None and len(weights) != len(adapter_paths):
        raise UsageError(f"--weights has {len(weights)} value(s) for {len(adapter_paths)} adapter(s); "
                         "give the weights the merge used, one per adapter")
    if options.get("qlora"):
        raise UsageError("unmerge takes no --qlora: subtracting the delta from a QLoRA merge gives back the "
                         "quantized base, not the original; keep the original base instead")
    reader_opts = {k: options[k] for k in ("lora_alpha", "fan_in_fan_out", "enable_lora", "only") if k in options}
    problems = _not_invertible(load_adapters(adapter_paths, **reader_opts))
    if problems:
        raise AdapterError(f"cannot unmerge from {merged}: part of the merge is not invertible; nothing was "
                         "written (merge again from the original base instead)", problems)
    negated = [-float(w) for w in (weights if weights is not None else [1.0] * len(adapter_paths))]
    report = apply(merged, adapter_paths, out, weights=negated, _command="unmerge", **options)
    result = UnmergeReport(**{f.name: getattr(report, f.name) for f in fields(ApplyReport)})
    merge_accum = manifest.recorded_options(Path(merged)).get("accum")  # None: not a merge loramerge recorded
    result.recovery = recovery_notes(report.plan, options.get("accum", "float32"),
                                     merge_accum if isinstance(merge_accum, str) and merge_accum in ACCUM else None)
    return result
