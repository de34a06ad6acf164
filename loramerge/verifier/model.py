"""Check 4 of verify: model outputs, with transformers (the `hf` extra).

The base model runs with the adapter applied UNMERGED, by forward hooks that add each LoRA
branch s * (x @ A^T) @ B^T to its layer's output (the other tuners: their delta's branch, or
IA3's vector on the layer's output or input) (loramerge's own, not PEFT's, so no PEFT is
needed and PEFT's bugs cannot hide ours), then the merged checkpoint runs on the same fixed random
token ids. Both load in float32, so the difference measures the merge, not the compute dtype.

This is the one check that holds a whole model: the base, then the merged model (never both).
It is skipped, with the reason, when transformers is missing, when BASE or MERGED is not a
model directory, when the float32 model would not fit in memory, or when an adapted tensor is
not a parameter of a layer the hooks know (Linear, GPT-2 Conv1D, Embedding). Tensors the
adapter replaces whole (modules_to_save) and trained token rows have no unmerged form: they are put
in place as they are.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import codecs
from ..engine import deltas, tuners
from ..readers.checkpoint import Checkpoint
from ..types import Adapter, Job, numel
from .experts import apply_params
from .report import _GRID, ModelCheck
from .weights import _lin, lin_factors, lora_branch

INPUT_SHAPE = (2, 16)
SEED = 0
# Relative error allowed between the hooked base and the merged model (max |a - b| / max |b| per
# output). A correct merge differs from the unmerged model only by the merged weights' rounding,
# which the network carries to its outputs, growing with depth. Measured (logits): float32 4e-7 on
# the fixtures; float16 1e-4..5e-4 and bfloat16 3e-3..5e-3 on the fixtures (3 layers), bfloat16
# 1.5e-2 and 1.8e-2 on random 8- and 24-layer Llamas. So float32 gets a fixed bound, and half
# precision HALF_TOL_FACTOR unit roundoffs (bf16 0.031, fp16 0.0039) or half of the adapter's own
# effect on that output, whichever is larger: a merged model closer to the adapter than to the base
# passes. A single wrong tensor hides below these: check 1 finds it; this check finds what the
# weights cannot show (a config that changes the computation, tensors transformers does not load).
FLOAT_TOL = 1e-4
HALF_TOL_FACTOR = 8


def check_model(base_ck: Checkpoint, merged_ck: Checkpoint, adapters: list[Adapter], jobs: list[Job],
                device: torch.device, refs: dict | None = None) -> ModelCheck:
    """`refs` (crosscheck.py): verify's own reading of the adapters, which the hooks apply in place
    of apply's reading where it covers them."""
    try:
        import transformers
    except ImportError:
        return ModelCheck("skipped", "transformers is not installed; pip install 'loramerge[hf]'")
    for ck, what in ((base_ck, "BASE"), (merged_ck, "MERGED")):
        if ck.root is None or not (ck.root / "config.json").is_file():
            return ModelCheck("skipped", f"{what} ({ck.path}) is not a model directory with config.json")
    needed = 4 * sum(numel(r.shape) for r in base_ck.tensors.values())
    free = _available_memory(device)
    if free is not None and needed > 0.8 * free:
        return ModelCheck("skipped", f"the float32 model needs {needed / 1e9:.1f} GB, {free / 1e9:.1f} GB is "
                                     "free; the layer checks above cover every adapted tensor")
    config = base_ck.config() or {}
    causal = any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    # the floor for half precision: the coarsest half-precision grid among MERGED's tensors
    half = max((HALF_TOL_FACTOR * 2.0 ** -_GRID[r.dtype][0] for r in merged_ck.tensors.values()
                if r.dtype in ("BF16", "F16")), default=None)

    try:
        if any(j.decode is not None for j in jobs):
            model = _load_decoded(cls, base_ck, jobs, device)
        else:
            model = _load(cls, base_ck.root, device)
    except Exception as e:  # noqa: BLE001 - any load failure means "cannot run this check"
        return ModelCheck("skipped", f"transformers cannot load BASE: {type(e).__name__}: {str(e)[:200]}")
    if isinstance(model, str):
        return ModelCheck("skipped", model)
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    if not vocab:
        return ModelCheck("skipped", "the model config has no vocab_size to draw token ids from")
    check = ModelCheck("ok", model_class=type(model).__name__, input_shape=INPUT_SHAPE)
    ids = torch.randint(0, vocab, INPUT_SHAPE, generator=torch.Generator().manual_seed(SEED)).to(device)
    plain = _run(model, ids)
    problem = apply_unmerged(model, jobs, adapters, refs)
    if problem:
        return ModelCheck("skipped", problem, model_class=check.model_class)
    ref = _run(model, ids)
    del model  # the hooked base is done with: never hold two models
    try:
        merged = _load(cls, merged_ck.root, device)
    except Exception as e:  # noqa: BLE001 - a merged model that does not load is a failed merge
        return ModelCheck("FAIL", f"transformers cannot load MERGED: {type(e).__name__}: {str(e)[:200]}",
                          model_class=check.model_class)
    got = _run(merged, ids)
    del merged
    problems = []
    for key, r in ref.items():
        if key not in got:
            continue
        # How far the adapter moves this output at all (a resized vocabulary changes its shape).
        effect = check.adapter_effect[key] = _rel(plain[key], r) if plain[key].shape == r.shape else 0.0
        tol = check.tolerance[key] = FLOAT_TOL if half is None else max(half, effect / 2)
        if got[key].shape != r.shape:
            check.rel_err[key] = math.inf
            problems.append(f"{key} has shape {list(got[key].shape)}, expected {list(r.shape)}")
            continue
        err = check.rel_err[key] = _rel(got[key], r)
        if not err <= tol:
            problems.append(f"{key} rel err {err:.3g} > {tol:.3g}")
    if problems:
        check.status = "FAIL"
        check.reason = "; ".join(problems) + " between the base with the adapter unmerged (hooks) and MERGED"
    return check


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    denom = float(ref.abs().max())
    return float((a - ref).abs().max()) / denom if denom > 0 else float((a - ref).abs().max())


def _load(cls, path: Path, device: torch.device):
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # verify prints a table; keep transformers' bars out of it
    try:
        return cls.from_pretrained(path, dtype=torch.float32).to(device).eval()
    finally:
        if shown:
            logging.enable_progress_bar()


def _load_decoded(cls, base_ck: Checkpoint, jobs: list[Job], device: torch.device):
    """The base model in float32 with every weight as the merge starts from it: a quantized base
    (FP8, bitsandbytes 4-bit) dequantized by its codec, and --qlora targets as their 4-bit round
    trip (what the adapter was trained against). Built from the config (quantization_config
    dropped) and loaded with those values; a reason string when a parameter stays unset."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(base_ck.root)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = cls.from_config(config, dtype=torch.float32)
    params = dict(model.named_parameters(remove_duplicate=False))
    unset = set(params)
    with torch.no_grad():
        for job in jobs:
            pname = _resolve(job.name, set(params))
            if pname is None or params[pname].shape != job.shape:
                continue
            stored = [base_ck.read(job.source), *(base_ck.read(r) for r in job.inputs)]
            value = codecs.decode(job.decode, stored, job.shape, "cpu") if job.decode is not None else stored[0]
            params[pname].copy_(value.to(torch.float32))
            unset -= {n for n, p in params.items() if p is params[pname]}  # tied twins are set too
    if unset:
        return f"the base's tensors do not cover the model's parameter {sorted(unset)[0]}"
    return model.to(device).eval()


def _available_memory(device: torch.device) -> int | None:
    """Bytes free for one float32 model: it loads through host memory, then moves to the GPU."""
    free = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    if device.type == "cuda":
        free.append(torch.cuda.mem_get_info(device)[0])
    return min(free) if free else None


def _run(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=ids)
    return {k: v.detach().to("cpu", torch.float64) for k, v in out.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _resolve(name: str, params: set[str]) -> str | None:
    """The model's name for checkpoint tensor `name`: exact, or the unique one that differs by a
    leading prefix (a bare checkpoint loaded into a wrapper, or the reverse)."""
    if name in params:
        return name
    hits = [p for p in params if p.endswith("." + name) or name.endswith("." + p)]
    return hits[0] if len(hits) == 1 else None


def apply_unmerged(model, jobs: list[Job], adapters: list[Adapter], refs: dict | None = None) -> str | None:
    """Make `model` (float32, loaded from BASE) compute what the base with the adapter(s) applied
    unmerged computes: replacement tensors put in place, a forward hook on every LoRA-adapted
    layer. Returns None, or the reason it cannot (then the model is left half-adapted)."""
    problem = apply_params(model, jobs, adapters)  # target_parameters (MoE experts): their own parameters
    if problem:
        return problem
    targets = _targets(model, jobs, adapters, refs or {})
    if isinstance(targets, str):
        return targets
    for module, spec in targets:
        module.register_forward_hook(_make_hook(module, spec, adapters), with_kwargs=True)
    return None


def _targets(model, jobs: list[Job], adapters: list[Adapter], refs: dict) -> list[tuple[torch.nn.Module, dict]] | str:
    """Put replacement tensors in place and return (module, {"lora": terms on its weight, "bias":
    terms on its bias}) for every adapted module, or the reason the hooks cannot reproduce a term."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    written = {_resolve(j.name, params) for j in jobs}  # parameters the merge writes out
    specs: dict[str, dict] = {}
    for job in jobs:
        terms = [t for t in job.terms if t.pair is None or not t.pair.experts]  # experts: apply_params
        if not terms:
            continue
        pname = _resolve(job.name, params)
        if pname is None:
            return f"{job.name} is not a parameter of the transformers model (renamed on load?)"
        mod_name, _, attr = pname.rpartition(".")
        module = model.get_submodule(mod_name)
        spec = specs.setdefault(mod_name, {"module": module, "lora": [], "bias": [], "tuner": [], "refs": {}})
        spec["refs"][attr] = refs.get(job.name)
        for t in terms:
            if t.kind == "replace":
                # A saved full tensor (modules_to_save, resized vocabulary) has no unmerged form: it
                # becomes the layer's parameter, apart from any tied twin. F.linear / F.embedding
                # take the new row count as it comes.
                r = adapters[t.adapter].tensors[t.key]
                setattr(module, attr, nn.Parameter(r.to(module.weight.device, torch.float32), requires_grad=False))
            elif t.kind == "rows":
                _put_rows(model, module, attr, pname, t, adapters, written)
            elif (t.kind, attr) in (("lora", "weight"), ("bias", "bias")):
                spec[t.kind].append(t)
            elif t.kind in ("delta", "scale") and attr == "weight" and (t.kind == "delta" or t.weight == 1):
                spec["tuner"].append(t)
            elif (t.kind, attr, t.weight) == ("scale", "bias", 1):
                pass  # IA3 scales the layer's whole output, bias included: the weight's hook does it
            else:
                return f"{job.name}: the hooks cannot apply a {t.kind!r} term to {attr!r} unmerged"
    for mod_name, spec in specs.items():
        if spec["lora"] and not isinstance(spec["module"], (nn.Linear, Conv1D, nn.Embedding)):
            return (f"{mod_name} is a {type(spec['module']).__name__}; the hooks apply LoRA to Linear, Conv1D "
                    "and Embedding layers only")
        if spec["tuner"] and not isinstance(spec["module"], (nn.Linear, Conv1D)):
            return (f"{mod_name} is a {type(spec['module']).__name__}; the hooks apply AdaLoRA, IA3, LoHa, LoKr "
                    "and VeRA to Linear and Conv1D layers only")
    return [(spec["module"], spec) for spec in specs.values() if spec["lora"] or spec["bias"] or spec["tuner"]]


def _tuner_parts(module, spec: dict, adapters: list[Adapter], dtype, dev):
    """The unmerged form of the other tuners' terms on `module` (engine/tuners.py's math, linear
    orientation): low-rank branches, one dense delta, IA3's output and input vectors."""
    shape = tuple(module.weight.shape)
    branches, dense, scale_out, scale_in = [], None, None, None
    for t in spec["tuner"]:
        a, rec = adapters[t.adapter], t.pair
        transposed = rec.layout == "transposed"
        if t.kind == "scale":  # PEFT's unmerged IA3: y = base(x) * l, or base(x * l) (feedforward)
            l = a.tensors[rec.key("l")].reshape(-1).to(dev, torch.float64)
            if rec.axis == "out":
                scale_out = l if scale_out is None else scale_out * l
            else:
                scale_in = l if scale_in is None else scale_in * l
        elif tuners.is_lowrank(rec):
            left, right, per_rank = tuners.lowrank(a, rec, shape, dev)
            fl = (right.T * per_rank, left.T) if transposed else (left * per_rank, right)
            branches.append(((fl[0].to(dtype), fl[1].to(dtype)), t.factor))
        else:  # LoHa / LoKr: PEFT's unmerged forward is F.linear(x, delta) too
            d = _lin(tuners.dense(a, rec, shape, dev)(0, shape[0]) * t.factor, transposed)
            dense = d if dense is None else dense + d
    cast = (lambda v: None if v is None else v.to(dev, dtype))
    return branches, cast(dense), cast(scale_out), cast(scale_in)


def _put_rows(model, module, attr: str, pname: str, t, adapters: list[Adapter], written: set) -> None:
    """Trained token rows, as PEFT's TrainableTokens layer puts them (no unmerged form to hook):
    in place where a tied twin (lm_head) shares them and the merge keeps the tie, in a parameter
    of the layer's own where the merge writes the twin apart (then the twin has its own terms)."""
    from torch import nn

    param = getattr(module, attr)
    twins = [n for n, p in model.named_parameters(remove_duplicate=False) if p is param and n != pname]
    new = param.detach().clone()
    new[list(t.rows)] = adapters[t.adapter].tensors[t.key].to(new.device, new.dtype)
    if any(n in written for n in twins):
        setattr(module, attr, nn.Parameter(new, requires_grad=False))
    else:
        with torch.no_grad():
            param.copy_(new)


def _lora_parts(module, spec: dict, adapters: list[Adapter], dtype, dev):
    """(LoRA branches, the lora_B bias delta, DoRA's per-output scale) of `module`: verify's own
    reading for the adapters it covers (spec["refs"]), apply's for the others."""
    ref, bias_ref = spec["refs"].get("weight"), spec["refs"].get("bias")
    own = ref.covered if ref is not None else set()
    lora = [t for t in spec["lora"] if t.adapter not in own]
    branches = [(lin_factors(adapters[t.adapter], t.pair, dtype, dev), t.factor) for t in lora]
    branches += [((left.to(dev, dtype), right.to(dev, dtype)), f) for (left, right), f in (ref.lora if ref else [])]
    bias = [deltas.bias_delta(adapters[t.adapter], t.pair) * t.weight for t in spec["bias"]
            if bias_ref is None or t.adapter not in bias_ref.covered] + (bias_ref.bias if bias_ref else [])
    bias_delta = sum(bias).to(dev, dtype) if bias else None
    # PEFT's unmerged DoRA: y = bias + m / ||W + dW|| * (x W^T + branch), norm per output unit
    dora = [t for t in lora if t.pair.magnitude_key is not None]
    if ref is not None and ref.magnitude is not None:
        (left, right), f = ref.lora[0]
        w = _lin(module.weight.detach().cpu().to(torch.float64), ref.transposed)
        wd, mag = w + f * left.double() @ right.double(), ref.magnitude
    elif dora:
        t = dora[0]
        adapter = adapters[t.adapter]
        w = module.weight.detach().cpu().to(torch.float64)
        wd = _lin(w + deltas.dense_delta(adapter, t.pair) * t.weight, t.pair.layout == "transposed")
        mag = adapter.tensors[t.pair.magnitude_key].to(torch.float64).reshape(-1)
    else:
        return branches, bias_delta, None
    return branches, bias_delta, (mag / torch.linalg.vector_norm(wd, dim=1)).to(dev, dtype)


def _make_hook(module, spec: dict, adapters: list[Adapter]):
    """A forward hook adding the unmerged adapter terms to `module`'s output."""
    dev, dtype = module.weight.device, module.weight.dtype
    branches, bias_delta, dora_scale = _lora_parts(module, spec, adapters, dtype, dev)
    embedding = isinstance(module, torch.nn.Embedding)
    more, dense, scale_out, scale_in = _tuner_parts(module, spec, adapters, dtype, dev)
    branches += more
    transposed = any(t.pair.layout == "transposed" for t in spec["tuner"])

    def hook(mod, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        if embedding:  # token ids: the branch sees them one-hot, as rows of W
            x = torch.nn.functional.one_hot(x, mod.weight.shape[0]).to(dtype)
        extra = sum(lora_branch(x, fl, f) for fl, f in branches) if branches else 0
        if dense is not None:
            extra = extra + x @ dense.T
        if scale_in is not None:  # base(x * l) = base(x) + (x * (l - 1)) W^T
            extra = extra + (x * (scale_in - 1)) @ _lin(mod.weight, transposed).T
        if scale_out is not None:
            output = output * scale_out
        if dora_scale is not None:
            b = mod.bias if getattr(mod, "bias", None) is not None else 0
            output = (output - b + extra) * dora_scale + b
        else:
            output = output + extra
        if bias_delta is not None:
            output = output + bias_delta
        return output

    return hook
