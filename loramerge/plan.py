"""build_plan(): decide everything before any byte is written.

Matches every adapter target to exactly one base tensor, checks shapes and dtypes, collects
EVERY problem and raises once, and lays out the output files. Pure: reads no tensor data.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import PlanError, UsageError
from .readers.checkpoint import Checkpoint
from .types import DTYPE_NAMES, FLOAT_CODES, Adapter, Job, OutputFile, Plan, Term


def parse_size(text: str | int | None) -> int | None:
    """'5GB', '500MB', '2GiB', 1000000 -> bytes (HF's max_shard_size convention: GB = 10^9)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"--shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


class ModuleMatcher:
    """Maps an adapter module path to one base module (tensor name without '.weight').

    Users train on a wrapper (LlamaForCausalLM: 'model.layers.0...') and merge into a checkpoint
    saved from the bare model ('layers.0...'), or the reverse. We accept an exact match, else the
    unique match where one path is a dot-suffix of the other, and require that every non-exact
    match used the same prefix rewrite (so two different modules can never be conflated).
    """

    def __init__(self, base_names):
        self.modules = {n[: -len(".weight")] for n in base_names if n.endswith(".weight")}
        self._by_suffix: dict[str, list[str]] = {}
        for mod in self.modules:
            parts = mod.split(".")
            for k in range(1, len(parts)):
                self._by_suffix.setdefault(".".join(parts[k:]), []).append(mod)
        self.rewrites: dict[tuple[str, str], list[str]] = {}

    def match(self, module: str) -> tuple[str | None, list[str]]:
        """(base module or None, candidates when ambiguous)."""
        if module in self.modules:
            return module, []
        parts = module.split(".")
        for k in range(1, len(parts)):  # adapter path longer: strip its leading components
            tail = ".".join(parts[k:])
            if tail in self.modules:
                self.rewrites.setdefault((".".join(parts[:k]) + ".", ""), []).append(module)
                return tail, []
        longer = self._by_suffix.get(module, [])  # base path longer: base has an extra prefix
        if len(longer) == 1:
            self.rewrites.setdefault(("", longer[0][: -len(module)]), []).append(module)
            return longer[0], []
        return None, sorted(longer)


def build_plan(
    base: Checkpoint,
    adapters: list[Adapter],
    weights: list[float] | None = None,
    dtype: str = "auto",
    shard_size: int | str | None = None,
    single_file: bool = False,
) -> Plan:
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(f"--weights has {len(weights)} value(s) for {len(adapters)} adapter(s); give one per adapter")
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPE_NAMES)}")
    out_code = None if dtype == "auto" else DTYPE_NAMES[dtype]

    matcher = ModuleMatcher(base.tensors)
    problems: list[str] = []
    terms: dict[str, list[Term]] = {}
    for ai, (adapter, w) in enumerate(zip(adapters, weights)):
        for pair in adapter.pairs:
            wanted = pair.target_name.removesuffix(".weight")
            target, candidates = matcher.match(wanted)
            where = f"{adapter.label}: {pair.module}"
            if target is None:
                if candidates:
                    problems.append(f"{where}: ambiguous, matches {len(candidates)} base tensors "
                                    f"({', '.join(c + '.weight' for c in candidates[:4])})")
                else:
                    problems.append(f"{where}: no base tensor named {pair.target_name} (nor any "
                                    "prefix/suffix variant of it)")
                continue
            wname = target + ".weight"
            ref = base.tensors[wname]
            if ref.dtype not in FLOAT_CODES:
                problems.append(f"{where}: base tensor {wname} is {ref.dtype}, a quantized/integer type; merge "
                                "into the original floating-point (unquantized) base instead")
                continue
            if ref.shape != pair.base_shape:
                problems.append(f"{where}: base tensor {wname} has shape {list(ref.shape)} but the adapter's "
                                f"lora_B @ lora_A gives {list(pair.base_shape)}; the adapter was trained for "
                                "another model")
                continue
            terms.setdefault(wname, []).append(Term(ai, pair, w))
            if pair.bias_key is not None:
                bname = target + ".bias"
                bref = base.tensors.get(bname)
                if bref is None:
                    problems.append(f"{where}: the adapter trains a bias (lora_bias) but the base has no {bname}; "
                                    "PEFT cannot merge this either")
                elif bref.shape != pair.base_shape[:1]:
                    problems.append(f"{where}: base {bname} has shape {list(bref.shape)}, lora_B.bias has "
                                    f"{list(pair.base_shape[:1])}")
                else:
                    terms.setdefault(bname, []).append(Term(ai, pair, w, kind="bias"))
    if len(matcher.rewrites) > 1:
        shown = "; ".join(f"strip {s!r} add {a!r} for e.g. {mods[0]}" for (s, a), mods in matcher.rewrites.items())
        problems.append(f"adapter module paths map onto the base with different prefix rewrites ({shown}); "
                        "the adapter and base do not come from the same architecture")
    if problems:
        raise PlanError(f"{len(problems)} problem(s) matching the adapter(s) to the base {base.path}; "
                        "nothing was written", problems)

    jobs = []
    for name, ref in base.tensors.items():
        code = ref.dtype
        if out_code is not None and code in FLOAT_CODES:
            code = out_code
        jobs.append(Job(name, ref, code, tuple(terms.get(name, ()))))

    files = _layout(base, jobs, parse_size(shard_size), single_file)
    warnings = []
    for ai, adapter in enumerate(adapters):
        warnings.extend(adapter.warnings)
    config_updates = {}
    if out_code is not None:
        # transformers reads this to pick the load dtype with dtype="auto"; keep it truthful.
        config_updates["torch_dtype"] = dtype
    return Plan(
        base_path=base.path,
        adapter_paths=[a.path for a in adapters],
        files=files,
        indexed=len(files) > 1 or base.index_file is not None,
        single_file=single_file,
        extra_files=list(base.extra_files),
        skipped_files=list(base.skipped_files),
        config_updates=config_updates,
        warnings=warnings,
    )


def _out_name(base_file: Path) -> str:
    name = base_file.name
    if name.endswith(".safetensors"):
        return name
    # pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors
    stem = name[: -len(".bin")] if name.endswith(".bin") else base_file.stem
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def _layout(base: Checkpoint, jobs: list[Job], shard_size: int | None, single_file: bool) -> list[OutputFile]:
    if single_file or (shard_size is None and len(base.files) == 1):
        name = _out_name(base.files[0]) if shard_size is None else "model.safetensors"
        return [OutputFile(name, jobs)]
    if shard_size is None:  # mirror the base's shards
        by_file: dict[Path, list[Job]] = {f: [] for f in base.files}
        for j in jobs:
            by_file[j.source.file].append(j)
        return [OutputFile(_out_name(f), js) for f, js in by_file.items() if js]
    groups: list[list[Job]] = [[]]
    size = 0
    for j in jobs:
        if groups[-1] and size + j.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(j)
        size += j.nbytes
    if len(groups) == 1:
        return [OutputFile("model.safetensors", groups[0])]
    n = len(groups)
    return [OutputFile(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def describe(plan: Plan, adapters: list[Adapter]) -> str:
    """Human-readable plan for --dry-run."""
    lines = [f"base: {plan.base_path}"]
    for a in adapters:
        lines.append(f"adapter: {a.path} ({a.format}, {len(a.pairs)} targets)")
    merged = [j for j in plan.jobs if j.terms]
    lines.append(f"targets ({len(merged)} tensors):")
    for j in merged:
        desc = ", ".join(f"{t.kind} r={t.pair.rank} scale={t.pair.scale:g}"
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

