"""Library entry points. The CLI is a thin shell over these."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import engine
from .errors import UsageError
from .plan import build_plan, describe
from .readers.checkpoint import open_checkpoint
from .readers.peft import read_peft_adapter
from .types import Adapter, Plan
from .writers.model_dir import copy_extras, write_index
from .writers.output import Staged, check_disk_space, check_output_path

ACCUM = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class ApplyReport:
    out: Path
    dry_run: bool
    device: str
    tensors_merged: int = 0
    tensors_copied: int = 0
    tensors_cast: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    exact_fixups: int = 0
    files: list[str] = field(default_factory=list)
    carried_over: list[str] = field(default_factory=list)
    not_carried_over: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    plan_text: str = ""
    plan: Plan | None = field(default=None, repr=False)
    stage_seconds: dict = field(default_factory=dict)

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
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def load_adapters(paths, lora_alpha: float | None = None) -> list[Adapter]:
    return [read_peft_adapter(p) for p in paths]


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
) -> ApplyReport:
    """Merge one or more LoRA adapters into `base`, writing a new checkpoint at `out`.

    W' = W + sum_i weights[i] * s_i * B_i @ A_i per target, float32 math, one rounding to the output
    dtype (`dtype='auto'` keeps each tensor's own). `out` is a directory, or a file path ending in
    .safetensors for a single-file output. Raises a LoraMergeError subclass on any user error,
    before anything is written.
    """
    t0 = time.perf_counter()
    if accum not in ACCUM:
        raise UsageError(f"--accum {accum!r}: expected float32 or float64")
    base, out = Path(base), Path(out)
    adapter_paths = [Path(a) for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters)]
    if not adapter_paths:
        raise UsageError("no adapter given")
    ck = open_checkpoint(base)
    loaded = load_adapters(adapter_paths)
    single_file = out.suffix == ".safetensors"
    plan = build_plan(ck, loaded, weights=weights, dtype=dtype, shard_size=shard_size, single_file=single_file)
    dev = engine.resolve_device(device)
    report = ApplyReport(out=out, dry_run=dry_run, device=str(dev), plan=plan, warnings=list(plan.warnings))
    report.plan_text = describe(plan, loaded)
    check_output_path(out, [base, *adapter_paths], overwrite)
    if dry_run:
        return report
    check_disk_space(out, plan.nbytes)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc="merging", leave=False)
    staged = Staged(out, is_dir=not single_file, overwrite=overwrite)
    try:
        with staged as tmp:
            out_dir = tmp.parent if single_file else tmp
            if single_file:
                plan.files[0].name = tmp.name  # the staged file; renamed to `out` on commit
            stats = engine.run(plan, ck, loaded, out_dir, dev, ACCUM[accum],
                               progress=bar.update if bar else None, sync=sync)
            if not single_file:
                if plan.indexed:
                    write_index(plan, tmp)
                report.carried_over = copy_extras(plan, tmp)
            staged.commit()  # every file is complete and fsynced: the rename is the commit point
    finally:
        if bar is not None:
            bar.close()
        ck.close()
    report.not_carried_over = list(plan.skipped_files)
    report.tensors_merged, report.tensors_copied, report.tensors_cast = stats.merged, stats.copied, stats.cast
    report.bytes_written = stats.bytes_written
    report.exact_fixups = stats.exact_fixups
    report.files = [f.name for f in plan.files] if not single_file else [out.name]
    report.stage_seconds = {"read": stats.seconds_read, "math": stats.seconds_math, "write": stats.seconds_write}
    report.seconds = time.perf_counter() - t0
    return report
