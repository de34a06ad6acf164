"""inspect: LoRA adapters of every format the readers know, and (with --base) where each target
lands: the plan's own matching (build_plan, strict=False), never a second matcher."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..readers.adapters import detect_format, load_adapters
from ..report import jsonable
from ..types import TORCH_TO_ST, Adapter, LoraPair
from .kinds import Kind, counts

# LoraPair fields that name tensors inside the adapter file: not part of the description
_KEY_FIELDS = ("a_key", "b_key", "bias_key", "magnitude_key", "keys")
_EXPERT_FIELDS = ("experts", "expert", "out_rows", "stacked")
TEXT_TARGETS = 40  # targets listed in the text output


def _claims(path: Path) -> str | None:
    return detect_format(path)


def target_json(pair: LoraPair, alpha_known: bool = True) -> dict:
    """module, rank, alpha, scale first (null alpha/scale where the format does not store alpha),
    then every other field of the normalized target, so fields readers add show up too."""
    out = {"module": pair.module, "rank": pair.rank, "alpha": pair.alpha if alpha_known else None,
           "scale": pair.scale if alpha_known else None, "target": pair.target_name,
           "dora": pair.magnitude_key is not None, "bias": pair.bias_key is not None}
    for f in dataclasses.fields(pair):
        if f.name in _EXPERT_FIELDS and not pair.experts:
            continue  # one expert's share of a target_parameters LoRA: the plan's, not the adapter's
        if f.name not in out and f.name not in _KEY_FIELDS:
            out[f.name] = jsonable(getattr(pair, f.name))
    return out


def _describe(path: Path, fmt: str, options: dict) -> dict:
    opts = {k: options.get(k) for k in ("lora_alpha", "fan_in_fan_out", "enable_lora", "only")}
    warnings = []
    alpha_known = not (fmt == "loralib" and opts["lora_alpha"] is None)
    if not alpha_known:
        # loralib files do not store alpha; read with a placeholder and report alpha/scale as null
        opts["lora_alpha"] = 1.0
        warnings.append("loralib checkpoints do not store lora_alpha: alpha and scale are unknown (null); pass "
                        "--lora-alpha with the value the model was built with to see them")
    (adapter,) = load_adapters([path], **opts)
    targets = [target_json(p, alpha_known) for p in adapter.pairs]
    details = {
        "targets": targets,
        "replacements": [{"tensor": name, "shape": list(adapter.tensors[key].shape),
                          "dtype": TORCH_TO_ST.get(adapter.tensors[key].dtype, str(adapter.tensors[key].dtype))}
                         for name, key in adapter.replacements.items()],
        "tokens": [{"tensor": tr.target, "ids": list(tr.indices)} for tr in adapter.tokens],
        "tensors": len(adapter.tensors),
        "bytes": sum(t.numel() * t.element_size() for t in adapter.tensors.values()),
        "dtypes": counts(TORCH_TO_ST.get(t.dtype, str(t.dtype)) for t in adapter.tensors.values()),
        "base_model": adapter.config.get("base_model_name_or_path") if fmt == "peft" else None,
        "config": jsonable(adapter.config) if fmt == "peft" else None,
    }
    if options.get("base") is not None:
        base = Path(options["base"])
        hits, problems = _match(adapter, base)
        for t in details["targets"]:
            if t.get("layout") == "experts":  # target_parameters: every expert tensor it lands on
                t["base_tensors"] = hits.get(("experts", t["module"]), [])
                t["base_tensor"] = t["base_tensors"][0] if t["base_tensors"] else None
                continue
            tensor, pair = hits.get(("lora", t["module"]), (None, None))
            t["base_tensor"] = tensor
            if pair is not None:  # what the plan resolved against the base (loralib: layout, groups)
                t.update(layout=pair.layout, groups=jsonable(pair.groups), base_shape=list(pair.base_shape))
            if t["bias"] or (t.get("tuner") == "ia3" and t["axis"] == "out"):  # IA3 scales the bias too
                t["base_bias"] = hits.get(("bias", t["module"]), (None, None))[0]
        for r, key in zip(details["replacements"], adapter.replacements.values()):
            r["base_tensor"] = hits.get(("replace", key), (None, None))[0]
        for r, tr in zip(details["tokens"], adapter.tokens):  # a tied lm_head may share the rows
            r["base_tensors"] = hits.get(("rows", tr.key), [])
        details.update({"base": str(base), "matched": sum(t["base_tensor"] is not None for t in details["targets"]),
                        "unmatched": problems})
    details["warnings"] = warnings + list(adapter.warnings)
    return details


def _match(adapter: Adapter, base: Path) -> tuple[dict, list[str]]:
    """{(term kind, module or saved key): (base tensor, the pair as the plan resolved it)}, and
    {("rows", saved key): [base tensors]} for trained token rows, for
    everything of `adapter` that fits `base`, and the plan's problem lines for what does not."""
    from ..plan import build_plan
    from ..readers.checkpoint import open_checkpoint

    ck = open_checkpoint(base)
    try:
        plan = build_plan(ck, [adapter], strict=False)
    finally:
        ck.close()
    hits = {}
    for job in plan.jobs:
        for t in job.terms:
            if t.kind == "rows":  # trained token rows: every tensor they land on (a tied lm_head too)
                hits.setdefault(("rows", t.key), []).append(job.name)
                continue
            if t.pair is not None and t.pair.experts:  # one of a parameter's expert tensors
                names = hits.setdefault(("experts", t.pair.module), [])
                names += [job.name] if job.name not in names else []
                continue
            kind = "lora" if t.kind not in ("replace", "bias") else t.kind
            if t.kind == "scale" and job.name.endswith(".bias"):  # IA3 scales the bias too
                kind = "bias"
            hits[(kind, t.key if t.kind == "replace" else t.pair.module)] = (job.name, t.pair)
    return hits, list(plan.problems)


def text(d: dict) -> list[str]:
    lines = []
    if d.get("base_model"):
        lines.append(f"trained on: {d['base_model']}")
    lines.append(f"{len(d['targets'])} target(s), {d['tensors']} tensors, {d['bytes']:,} bytes "
                 f"({', '.join(f'{k} x{v}' for k, v in d['dtypes'].items())})")
    for t in d["targets"][:TEXT_TARGETS]:
        extra = "".join([" dora" if t["dora"] else "", " +bias" if t["bias"] else ""])
        alpha = "?" if t["alpha"] is None else f"{t['alpha']:g}"
        scale = "?" if t["scale"] is None else f"{t['scale']:g}"
        hit = layout = ""
        if "base_tensor" in t:
            hit = f" -> {t['base_tensor']}" if t["base_tensor"] else " -> (no match)"
        if len(t.get("base_tensors") or ()) > 1:
            hit += f" .. {t['base_tensors'][-1]} ({len(t['base_tensors'])} tensors)"
        if t["layout"] == "experts":
            layout = f" {t['experts']} experts [out {t['out_features']}, in {t['in_features']}] (target_parameters)"
        what = f"r={t['rank']} alpha={alpha} scale={scale}"
        if t.get("tuner") == "ia3":  # other PEFT tuners (readers/tuners.py): name them
            what = f"ia3 scales {'inputs' if t['axis'] == 'in' else 'outputs'}"
        elif t.get("tuner"):
            what = f"{t['tuner']} {what}"
        lines.append(f"  {t['module']}: {what}{layout or ' ' + t['layout']}{extra}{hit}")
    if len(d["targets"]) > TEXT_TARGETS:
        lines.append(f"  ... and {len(d['targets']) - TEXT_TARGETS} more (--json lists every target)")
    for r in d["replacements"]:
        lines.append(f"  {r['tensor']}: full saved tensor {r['dtype']} {r['shape']} (replaces the base's)")
    for r in d["tokens"]:
        ids = ", ".join(map(str, r["ids"][:8])) + (", ..." if len(r["ids"]) > 8 else "")
        hit = (" -> " + (", ".join(r["base_tensors"]) or "(no match)")) if "base_tensors" in r else ""
        lines.append(f"  {r['tensor']}: {len(r['ids'])} trained token rows (ids {ids}){hit}")
    if "base" in d:
        lines.append(f"against {d['base']}: {d['matched']} of {len(d['targets'])} target(s) match"
                     + (f"; {len(d['unmatched'])} problem(s):" if d["unmatched"] else ""))
        lines += [f"  - {p}" for p in d["unmatched"]]
    return lines


ADAPTER = Kind("adapter", _claims, _describe, text, noun="adapter")
