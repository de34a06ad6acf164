"""The plan as text, for --dry-run."""

from __future__ import annotations

from ..types import Adapter, Plan


def describe(plan: Plan, adapters: list[Adapter]) -> str:
    """Human-readable plan for --dry-run."""
    lines = [f"base: {plan.base_path}"]
    for a in adapters:
        lines.append(f"adapter: {a.path} ({a.format}, {len(a.pairs)} targets)")
    merged = [j for j in plan.jobs if j.terms]
    lines.append(f"targets ({len(merged)} tensors):")
    for j in merged:
        desc = ", ".join((f"replaced by saved {t.key}" if t.kind == "replace" else
                          f"{'dora' if t.pair.magnitude_key else t.kind} r={t.pair.rank} scale={t.pair.scale:g}")
                         + (f" x{t.weight:g}" if t.weight != 1 else "")
                         + (f" [{adapters[t.adapter].path.name}]" if len(adapters) > 1 else "")
                         for t in j.terms)
        cast = f" {j.source.dtype}->{j.dtype}" if j.dtype != j.source.dtype else f" {j.dtype}"
        lines.append(f"  {j.name} {list(j.shape)}{cast}: {desc}")
    copied = sum(1 for j in plan.jobs if j.kind == "copy")
    casted = sum(1 for j in plan.jobs if j.kind == "cast")
    lines.append(f"untouched tensors: {copied} copied bit for bit, {casted} cast")
    lines.append(f"output files ({len(plan.files)}{', with index' if plan.indexed else ''}):")
    for f in plan.files:
        lines.append(f"  {f.name}: {len(f.jobs)} tensors, {f.nbytes:,} bytes")
    if plan.extra_files:
        lines.append("carried over: " + ", ".join(p.name for p in plan.extra_files))
    if plan.skipped_files:
        lines.append("not carried over: " + ", ".join(plan.skipped_files))
    lines.append(f"total: {plan.nbytes:,} bytes")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
