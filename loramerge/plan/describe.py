"""The plan as text, for --dry-run."""

from __future__ import annotations

from ..types import Adapter, Codec, Job, Plan, Term


def describe(plan: Plan, adapters: list[Adapter]) -> str:
    """Human-readable plan for --dry-run."""
    lines = [f"base: {plan.base_path}"]
    for a in adapters:
        lines.append(f"adapter: {a.path} ({a.format}, {len(a.pairs)} targets)")
    merged = [j for j in plan.jobs if j.terms]
    lines.append(f"targets ({len(merged)} tensors):")
    for j in merged:
        desc = ", ".join(_term_text(t, j.name)
                         + (f" x{t.weight:g}" if t.weight != 1 and t.kind != "scale" else "")
                         + (f" [{adapters[t.adapter].path.name}]" if len(adapters) > 1 else "")
                         for t in j.terms)
        cast = f" {j.source.dtype}->{j.dtype}" if j.dtype != j.source.dtype else f" {j.dtype}"
        lines.append(f"  {j.name} {list(j.shape)}{cast}{codec_text(j)}: {desc}")
    copied = sum(1 for j in plan.jobs if j.kind == "copy")
    casted = sum(1 for j in plan.jobs if j.kind == "cast")
    lines.append(f"untouched tensors: {copied} copied bit for bit, {casted} cast")
    decoded: dict[str, list[str]] = {}
    for j in plan.jobs:
        if not j.terms and j.decode is not None:
            decoded.setdefault(f"{j.decode.label()} -> {j.dtype}", []).append(j.name)
    for how, names in decoded.items():
        lines.append(f"  dequantized ({how}): {len(names)} tensors, e.g. {names[0]}")
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


def _kind(t: Term) -> str:
    """lora, dora, bias, replace, or the tuner's name (adalora, ia3, loha, lokr, vera)."""
    if t.pair is None:
        return t.kind
    return getattr(t.pair, "tuner", None) or ("dora" if t.pair.magnitude_key else t.kind)


def _term_text(t: Term, name: str) -> str:
    if t.kind == "replace":
        return f"replaced by saved {t.key}"
    if t.kind == "rows":
        return f"{len(t.rows)} token rows replaced by saved {t.key}"
    if t.kind == "scale":  # IA3: W' = W * l (weight 1) or W / l (weight -1, unmerge)
        what = "the bias" if name.endswith(".bias") else {"out": "outputs", "in": "inputs"}[t.pair.axis]
        return f"ia3 scales {what}" + (" (divided out)" if t.weight == -1 else "")
    text = f"{_kind(t)} r={t.pair.rank} scale={t.pair.scale:g}"
    if getattr(t.pair, "experts", 0):  # target_parameters: one expert's share of a parameter's factors
        rows = t.pair.out_rows
        text += f" (expert {t.pair.expert} of {t.pair.module}" + (f", rows {rows[0]}:{rows[1]})" if rows else ")")
    return text


def codec_text(j: Job) -> str:
    """How a job reads and writes its tensors, when that is not plain floats."""
    parts = []
    if j.decode is not None:
        parts.append(f"read as {j.decode.label()}" + (f" (+{', '.join(r.name.rsplit('.', 1)[-1] for r in j.inputs)})"
                                                      if j.inputs else ""))
    if j.encode is not None:
        parts.append(f"written as {j.encode.label()} with fresh scales ({', '.join(o.name for o in j.outputs)})")
    return f" [{'; '.join(parts)}]" if parts else ""


def _codec_json(c: Codec | None) -> dict | None:
    return None if c is None else {"kind": c.kind, "label": c.label()}


def _term_json(t: Term) -> dict:
    if t.pair is None:  # a full saved tensor replaces the base tensor, or trained token rows
        out = {"adapter": t.adapter, "kind": t.kind, "key": t.key, "weight": t.weight}
        return out if t.rows is None else {**out, "token_ids": list(t.rows)}
    out = {"adapter": t.adapter, "kind": _kind(t), "module": t.pair.module,
           "rank": t.pair.rank, "alpha": t.pair.alpha, "scale": t.pair.scale, "weight": t.weight}
    if t.kind == "scale":
        out["axis"] = t.pair.axis
    if getattr(t.pair, "experts", 0):
        out.update(expert=t.pair.expert, experts=t.pair.experts,
                   rows=list(t.pair.out_rows) if t.pair.out_rows else None)
    return out


def plan_json(plan: Plan) -> dict:
    """The plan as data (apply --dry-run --json, inspect --base): every tensor an adapter touches
    with the terms that land on it (`adapter` indexes `adapters`), the untouched counts, the
    output files."""
    targets = [{"tensor": j.name, "shape": list(j.shape), "dtype": j.dtype, "source_dtype": j.source.dtype,
                "terms": [_term_json(t) for t in j.terms], "decode": _codec_json(j.decode),
                "encode": _codec_json(j.encode), "inputs": [r.name for r in j.inputs],
                "outputs": [o.name for o in j.outputs]} for j in plan.jobs if j.terms]
    return {
        "base": str(plan.base_path),
        "adapters": [str(p) for p in plan.adapter_paths],
        "targets": targets,
        "copied": sum(1 for j in plan.jobs if j.kind == "copy"),
        "cast": sum(1 for j in plan.jobs if j.kind == "cast"),
        "files": [{"name": f.name, "tensors": len(f.jobs), "bytes": f.nbytes} for f in plan.files],
        "indexed": plan.indexed,
        "carried_over": [p.name for p in plan.extra_files],
        "not_carried_over": list(plan.skipped_files),
        "config_updates": dict(plan.config_updates),
        "config_removals": list(plan.config_removals),
        "dequantized": sum(1 for j in plan.jobs if not j.terms and j.decode is not None),
        "bytes": plan.nbytes,
        "warnings": list(plan.warnings),
    }
