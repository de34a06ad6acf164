"""`combine`: several LoRA adapters -> one PEFT LoRA adapter (adapter_config.json +
adapter_model.safetensors) that PEFT loads as is and `apply` merges.

I/O and bookkeeping only; the math is in algebra.py. Targets are processed one at a time, so
the elementwise methods (ties, dare_*) hold at most a few dense out x in tensors of ONE target.

The output folds every scale into the factors: for each target lora_B = the combined left
factor (weights w_i and scales s_i included), lora_A = the combined right factor, and the
config says scale 1 (lora_alpha = r, no rsLoRA). Targets whose rank differs from the most
common one get rank_pattern/alpha_pattern entries keyed by their full, regex-escaped module
path: PEFT matches pattern keys with re.match(rf"(.*\\.)?({key})$", module), so such a key
selects exactly that module. target_modules lists full module paths for the same reason: PEFT
targets a module equal to an entry or ending in ".<entry>", and only the module itself (or the
same module under an extra wrapper prefix) ends in its own full path.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine import deltas
from ..engine.precision import guarded
from ..errors import AdapterError, UsageError
from ..report import JsonReport
from ..readers import hub
from ..readers.adapters import load_adapters
from ..readers.files import all_finite
from ..types import Adapter, LoraPair
from ..writers import manifest
from ..writers.output import Staged, check_output_path
from . import algebra

METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties")
EXACT = ("cat", "linear")
PEFT_PREFIX = "base_model.model."
OUT_DTYPE = torch.float32


@dataclass
class CombineReport(JsonReport):
    out: Path
    method: str
    adapters: list[Path]
    weights: list[float]
    rank: int | None = None
    targets: int = 0
    ranks: dict[str, int] = field(default_factory=dict)      # module -> rank written
    default_rank: int = 0
    bias_targets: int = 0
    worst_error: float = 0.0          # relative Frobenius error of the rank-R re-factoring
    worst_target: str = ""
    bytes_written: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}..{ranks[-1]}"
        patterns = sum(1 for r in self.ranks.values() if r != self.default_rank)
        lines = [
            f"combined {len(self.adapters)} adapter(s) with {self.method} (weights "
            f"{', '.join(f'{w:g}' for w in self.weights)}) into {self.out}: {self.targets} targets, {rank_text}"
            + (f" (r={self.default_rank}, {patterns} rank_pattern entries)" if patterns else "")
            + (f", lora_bias on {self.bias_targets}" if self.bias_targets else ""),
        ]
        if self.method in EXACT:
            lines.append("exact: each target's delta is the weighted sum of the inputs' deltas, up to one "
                         "float32 rounding of the factors")
        elif self.method == "svd":
            lines.append(f"rank-{self.rank} truncation (optimal, Eckart-Young): worst relative Frobenius error "
                         f"{self.worst_error:.3g}" + (f" at {self.worst_target}" if self.worst_target else ""))
        else:
            lines.append(f"{self.method} result re-factored to rank {self.rank} by SVD: worst relative Frobenius "
                         f"error of that step {self.worst_error:.3g}"
                         + (f" at {self.worst_target}" if self.worst_target else ""))
        lines.append(f"wrote {self.bytes_written / 1e6:.2f} MB in {self.seconds:.2f} s; load it with "
                     "PeftModel.from_pretrained or merge it with `loramerge apply`")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _check_options(method: str, n: int, weights, rank, density, seed) -> list[float]:
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise UsageError(f"--weights has {len(weights)} value(s) for {n} adapter(s); give one per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"--weights {weights}: every weight must be a finite number")
    if method in EXACT:
        if rank is not None:
            raise UsageError(f"--rank does not apply to --method {method}: it is exact at rank sum(r_i); "
                             "use --method svd to truncate to a lower rank")
    elif rank is None:
        raise UsageError(f"--method {method} needs --rank R (the rank of the combined adapter, e.g. the "
                         "largest input rank); --method cat is exact without one")
    elif not isinstance(rank, int) or rank < 1:
        raise UsageError(f"--rank {rank!r}: expected a positive integer")
    if method in algebra.ELEMENTWISE:
        if density is None:
            raise UsageError(f"--method {method} needs --density d in (0, 1], the fraction of entries each "
                             "task vector keeps (the papers use 0.2 to 0.5 for TIES, 0.1 to 0.3 for DARE)")
        if not (0.0 < density <= 1.0):
            raise UsageError(f"--density {density}: expected a number in (0, 1]")
    elif density is not None:
        raise UsageError(f"--density only applies to --method {', '.join(algebra.ELEMENTWISE)}, not {method}")
    if not isinstance(seed, int):
        raise UsageError(f"--seed {seed!r}: expected an integer")
    return weights


LAYOUT_WORDS = {
    "transposed": "embedding or fan_in_fan_out Conv1D targets, whose delta is stored transposed,",
    "conv": "convolution LoRA targets",
    "experts": "parameter targets (target_parameters, e.g. MoE experts), whose factors stack every expert,",
}
LINEAR_ONLY = ("combine supports linear LoRA targets only (lora_A [r, in], lora_B [out, r]); merge this adapter "
               "with `loramerge apply` instead")


def _unsupported(pair: LoraPair) -> tuple[str, str] | None:
    """(what, why) if this target cannot be combined linearly, else None."""
    if pair.magnitude_key is not None:
        return ("DoRA targets", "the merged weight m * (W + sBA) / ||W + sBA|| depends on the base weights and "
                "is not linear in the delta, so DoRA adapters cannot be added or re-factored; merge it with "
                "`loramerge apply` instead")
    if pair.layout != "linear":
        return LAYOUT_WORDS.get(pair.layout, f"targets with layout {pair.layout!r}"), LINEAR_ONLY
    if getattr(pair, "groups", None) is not None or getattr(pair, "enabled_rows", None) is not None:
        return "loralib MergedLinear row groups", LINEAR_ONLY
    if pair.target and pair.target != pair.module + ".weight":
        return "targets other than <module>.weight", LINEAR_ONLY
    return None


def _modules(modules: list[str]) -> str:
    shown = ", ".join(modules[:3])
    return shown + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")


def _group(adapters: list[Adapter]) -> dict[str, list[tuple[int, LoraPair]]]:
    problems = []
    for adapter in adapters:
        if adapter.format.startswith("peft-"):  # AdaLoRA, IA3, LoHa, LoKr, VeRA (readers/tuners.py)
            kind = adapter.format.removeprefix("peft-")
            problems.append(f"{adapter.label}: is a {kind} adapter, not LoRA; combine sums and compresses LoRA "
                            f"factors B @ A, which a {kind} adapter does not have: merge it with `loramerge apply` "
                            "(several adapters at once, weighted, where the math allows)")
            continue
        if adapter.format != "peft":
            # Module paths of other formats (kohya's lora_unet_..., loralib's state-dict names) are
            # not what PEFT would look up, so the output would load onto nothing.
            problems.append(f"{adapter.label}: is a {adapter.format} adapter; combine reads and writes PEFT "
                            "adapters (a directory with adapter_config.json); merge it with `loramerge apply`")
            continue
        repl = getattr(adapter, "replacements", None)
        if repl:
            problems.append(f"{adapter.label}: carries full replacement tensors (modules_to_save or trained "
                            f"layers, e.g. {next(iter(repl))}); they cannot be weighted or summed like LoRA "
                            "deltas: merge that adapter with `loramerge apply` instead")
        tokens = getattr(adapter, "tokens", None)
        if tokens:
            problems.append(f"{adapter.label}: trains token rows (trainable_token_indices, e.g. {tokens[0].target}); "
                            "they are new values, not deltas, and cannot be weighted or summed: merge that adapter "
                            "with `loramerge apply` instead")
        refused: dict[tuple[str, str], list[str]] = {}  # one line per reason, not per target
        for pair in adapter.pairs:
            why = _unsupported(pair)
            if why:
                refused.setdefault(why, []).append(pair.module)
        for (what, why), modules in refused.items():
            problems.append(f"{adapter.label}: {what} ({_modules(modules)}): {why}")
    groups: dict[str, list[tuple[int, LoraPair]]] = {}
    for ai, adapter in enumerate(adapters):
        for pair in adapter.pairs:
            groups.setdefault(pair.module, []).append((ai, pair))
    for module, items in groups.items():
        shapes = {tuple(p.base_shape) for _, p in items}
        if len(shapes) > 1:
            found = ", ".join(f"{adapters[ai].label}: {list(p.base_shape)}" for ai, p in items)
            problems.append(f"{module}: the adapters give different weight shapes ({found}); they were "
                            "trained on different models and cannot be combined")
    if problems:
        raise AdapterError(f"cannot combine these {len(adapters)} adapter(s); nothing was written", problems)
    return groups


def _terms(adapters: list[Adapter], items, weights) -> list[algebra.FactorTerm]:
    terms = []
    for ai, pair in items:
        # factors() is in the base tensor's layout; for 'linear' targets that IS PEFT's layout:
        # left = lora_B [out, r], right = lora_A [r, in]. Float64: exact for any adapter dtype.
        left, right = deltas.factors(adapters[ai], pair, torch.float64)
        bias = adapters[ai].tensors[pair.bias_key].to(torch.float64) if pair.bias_key else None
        terms.append(algebra.FactorTerm(left, right, weights[ai] * pair.scale, bias))
    return terms


def _combine_target(method, terms, rank, density, seed, module) -> algebra.LowRank:
    if method in EXACT:
        return algebra.cat(terms, OUT_DTYPE)
    if method == "svd":
        return algebra.svd(terms, rank, OUT_DTYPE)
    # Elementwise methods need each task vector densely: float32, one target at a time.
    taus = [t.coef * (t.left.to(torch.float32) @ t.right.to(torch.float32)) for t in terms]
    merged = algebra.elementwise(method, taus, density, seed, module)
    del taus
    return algebra.truncate(merged, rank, OUT_DTYPE)


def _config(adapters: list[Adapter], ranks: dict[str, int], has_bias: bool) -> tuple[dict, int]:
    counts = Counter(ranks.values())
    default = max(counts, key=lambda r: (counts[r], r))   # most common rank, larger on ties
    pattern = {re.escape(m): r for m, r in ranks.items() if r != default}
    first = adapters[0].config
    config = {
        "peft_type": "LORA",
        "task_type": first.get("task_type"),
        "base_model_name_or_path": first.get("base_model_name_or_path"),
        "revision": first.get("revision"),
        "r": default,
        # scale = lora_alpha / r = 1 everywhere: weights and the inputs' scales are in lora_B.
        "lora_alpha": default,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": has_bias,
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return config, default


@guarded  # IEEE float32 matmuls for the factor algebra (engine/precision.py)
def combine(
    adapters: list,
    out: str | Path,
    *,
    weights: list[float] | None = None,
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    revision: str | None = None,
) -> CombineReport:
    """Combine PEFT LoRA adapters into one PEFT LoRA adapter directory at `out`.

    Per target: cat/linear give exactly sum_i w_i s_i B_i A_i (rank sum r_i); svd its optimal
    rank-`rank` approximation; ties/dare_linear/dare_ties the papers' merges of the task vectors
    w_i s_i B_i A_i, re-factored to rank `rank`. Adapters need not share ranks or targets; they
    may be Hugging Face Hub ids (`revision` for those without @REV). Raises a LoraMergeError
    subclass on user errors, before anything is written.
    """

    t0 = time.perf_counter()
    paths = [a for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters)]
    if not paths:
        raise UsageError("no adapter given")
    out = Path(out)
    weights = _check_options(method, len(paths), weights, rank, density, seed)
    paths = hub.resolve_all(paths, "adapter", revision)
    loaded = load_adapters(paths)
    groups = _group(loaded)
    check_output_path(out, paths, overwrite)

    report = CombineReport(out=out, method=method, adapters=paths, weights=weights, rank=rank)
    bases = {a.config.get("base_model_name_or_path") for a in loaded}
    if len(bases) > 1:
        report.warnings.append(f"the adapters name different base models ({', '.join(sorted(map(str, bases)))}); "
                               f"the output names the first one's")
    tensors: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for module, items in groups.items():
        terms = _terms(loaded, items, weights)
        low = _combine_target(method, terms, rank, density, seed, module)
        key = PEFT_PREFIX + module
        tensors[f"{key}.lora_A.weight"] = low.right.contiguous()
        tensors[f"{key}.lora_B.weight"] = low.left.contiguous()
        bias = algebra.combine_bias(terms, method, density or 1.0, seed, module, OUT_DTYPE)
        if bias is not None:
            biases[module] = bias
        report.ranks[module] = low.rank
        if low.sigma is not None:  # an approximation: track its worst target
            err = low.relative_error()
            if not report.worst_target or err > report.worst_error:
                report.worst_error, report.worst_target = err, module
        bad = [n for n in ("lora_A", "lora_B") if not all_finite(tensors[f"{key}.{n}.weight"])]
        if bad:
            raise AdapterError(f"{module}: the combined {' and '.join(bad)} are not finite (the weights or "
                               "inputs overflow float32); nothing was written")
    if biases:
        # lora_bias is one switch for the whole adapter: PEFT gives every target a lora_B.bias,
        # so targets without one get zeros (exactly what they contribute).
        for module in groups:
            ref = tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"]
            b = biases.get(module, torch.zeros(ref.shape[0], dtype=OUT_DTYPE))
            tensors[f"{PEFT_PREFIX}{module}.lora_B.bias"] = b.contiguous()
        report.bias_targets = len(biases)
    config, report.default_rank = _config(loaded, report.ranks, bool(biases))
    report.targets = len(groups)

    from safetensors.torch import save

    metadata = {
        "format": "pt",
        "loramerge_method": method,
        "loramerge_inputs": json.dumps([{"adapter": str(p), "weight": w} for p, w in zip(paths, weights)]),
    }
    if rank is not None:
        metadata["loramerge_rank"] = str(rank)
    if method in algebra.ELEMENTWISE:
        metadata["loramerge_density"] = str(density)
        metadata["loramerge_seed"] = str(seed)
    staged = Staged(out, is_dir=True, overwrite=overwrite)
    with staged as tmp:
        # an adapter is small: serialized in memory, so each file is hashed as it is written
        written = {"adapter_model.safetensors": manifest.write_hashed(tmp / "adapter_model.safetensors",
                                                                      save(tensors, metadata=metadata)),
                   "adapter_config.json": manifest.write_hashed(
                       tmp / "adapter_config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())}
        report.bytes_written = sum(r["bytes"] for r in written.values())
        targets = [{"module": m, "rank": report.ranks[m],
                    "terms": [{"adapter": i, "rank": p.rank, "alpha": p.alpha, "scale": p.scale, "weight": weights[i]}
                              for i, p in groups[m]]} for m in groups]
        (tmp / manifest.NAME).write_bytes(manifest.dumps(manifest.build(
            "combine", {"adapters": manifest.adapter_inputs(loaded, weights)}, written, targets=targets,
            options={"method": method, "rank": rank, "density": density, "seed": seed, "weights": weights},
            output_dtypes={str(OUT_DTYPE).removeprefix("torch."): len(tensors)})))
        staged.commit()
    report.seconds = time.perf_counter() - t0
    return report

