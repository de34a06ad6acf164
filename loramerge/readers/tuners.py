"""PEFT adapters of the other tuners with a closed-form merge: AdaLoRA, IA3, LoHa, LoKr, VeRA.

Same directory layout as LoRA (adapter_config.json + adapter_model.safetensors), peft_type says
the tuner. Each target becomes a TunerTarget whose scale and shape rules are PEFT's own (0.21):
  ADALORA  lora_A [r, in*k], lora_B [out, r], lora_E [r, 1]; scale lora_alpha / (ranknum + 1e-5)
           with ranknum = init_r (PEFT restores it after pruning to rank_pattern's mask; r of the
           config is unused). A saved `ranknum` tensor, where one exists, is used instead.
  IA3      ia3_l: [out, 1] (Linear; scales outputs and the bias), [1, in] for feedforward_modules
           (scales inputs); transposed for Conv1D (fan_in_fan_out); [1, C, 1, 1] for conv.
  LOHA/LOKR  hada_* / lokr_* (readers/lycoris.py); scale alpha / r with rank_pattern/alpha_pattern.
  VERA     vera_lambda_b [out], vera_lambda_d [r], and the shared base_model.vera_A [r, in_max] /
           base_model.vera_B [out_max, r] that save_projection=True (the default) stores. Without
           them, PEFT regenerates the projections on load from projection_prng_key, sized by the
           largest adapted layer: so do we, once the plan knows every layer's shape
           (regenerate_projections), with the same torch generator calls.
modules_to_save and trained biases become replacements, as for LoRA (readers/peft.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

from ..errors import AdapterError
from ..types import Adapter, TunerTarget
from . import lycoris
from .files import all_finite, float_problem
from .peft import (BASE_CHANGING_INITS, CONFIG, UNSUPPORTED_FIELDS, _classify, _load_weights, _pattern_value,
                   targets_module)

PEFT_TYPES = {"ADALORA": "adalora", "IA3": "ia3", "LOHA": "loha", "LOKR": "lokr", "VERA": "vera"}
SLOTS = {
    "adalora": {"lora_A": "A", "lora_B": "B", "lora_E": "E", "ranknum": "ranknum"},
    "ia3": {"ia3_l": "l"},
    "vera": {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"},
    **lycoris.SLOTS,
}
VERA_SHARED = {"A": "base_model.vera_A", "B": "base_model.vera_B"}
# where regenerated projections go in Adapter.tensors (not names PEFT would save)
REGENERATED = {"A": "loramerge.regenerated.vera_A", "B": "loramerge.regenerated.vera_B"}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<slot>[A-Za-z0-9_]+)$")
NAMES = {"adalora": "AdaLoRA", "ia3": "IA3", "loha": "LoHa", "lokr": "LoKr", "vera": "VeRA"}


def read_tuner_adapter(path: Path, root: Path, cfg_path: Path, config: dict) -> Adapter:
    """The normalized Adapter for a PEFT directory (see peft.read_config) whose peft_type is one of
    PEFT_TYPES."""
    tuner = PEFT_TYPES[str(config.get("peft_type")).upper()]
    _check_config(cfg_path, tuner, config)
    tensors = _load_weights(root, path)
    if tuner == "vera" and config.get("bias") == "vera_only":
        config = {**config, "bias": "all"}  # the trained biases are saved whole either way
    lora_slots, replacements, tokens, unknown = _classify(config, tensors, root)
    unknown += list(tokens.values())  # trained token rows belong to LoRA's config: refused below
    problems = [f"{m}: LoRA tensors ({', '.join(sorted(s))}) in a {NAMES[tuner]} adapter; the file does not "
                f"belong to this {CONFIG}" for m, s in lora_slots.items()]
    modules: dict[str, dict[str, str]] = {}
    for key in unknown:
        m = _KEY.match(key)
        if tuner == "vera" and key in VERA_SHARED.values():
            continue
        if m is None or m.group("slot") not in SLOTS[tuner]:
            other = next((NAMES[t] for t, s in SLOTS.items() if m and m.group("slot") in s), None)
            problems.append(f"{key}: " + (f"a {other} tensor in a {NAMES[tuner]} adapter" if other else
                                          f"not a {NAMES[tuner]} tensor nor a modules_to_save copy"))
            continue
        slots = modules.setdefault(m.group("module"), {})
        slot = SLOTS[tuner][m.group("slot")]
        if slots.get(slot, key) != key:  # one module's factor under two adapter names
            problems.append(f"{m.group('module')}: {slot} stored twice, as {slots[slot]!r} and {key!r} (two adapter "
                            "names in one file); keep one name, or save each adapter on its own")
            continue
        slots[slot] = key
    for name, key in replacements.items():
        if not all_finite(tensors[key]):
            problems.append(f"{name}: saved tensor {key} contains NaN or Inf; the adapter is broken")
    build = {"adalora": _adalora, "ia3": _ia3, "vera": _vera}.get(tuner, _lycoris)
    pairs = []
    for module, roles in sorted(modules.items()):
        if not targets_module(config, module):
            problems.append(f"{module}: has {NAMES[tuner]} weights but {CONFIG}'s target_modules/"
                            "layers_to_transform do not select it (PEFT would ignore them); fix the config")
            continue
        rec = build(tuner, module, roles, tensors, config)
        if isinstance(rec, str):
            problems.append(f"{module}: {rec}")
        else:
            pairs.append(rec)
    if problems:
        raise AdapterError(f"{root}: adapter weights do not match {CONFIG} ({NAMES[tuner]})", problems)
    if not pairs and not replacements:
        raise AdapterError(f"{root}: the {NAMES[tuner]} adapter holds no weights; nothing to merge")
    return Adapter(path=root, format=f"peft-{tuner}", pairs=pairs, tensors=tensors, config=config,
                   replacements=replacements)


def _check_config(cfg_path: Path, tuner: str, config: dict) -> None:
    problems = []
    for key, why in UNSUPPORTED_FIELDS.items():
        if config.get(key) not in (None, False, [], {}, ""):
            problems.append(f"{key}={config[key]!r} is not supported: {why}")
    numbers = {"adalora": ("init_r", "lora_alpha"), "loha": ("r", "alpha"), "lokr": ("r", "alpha"),
               "vera": ("r",)}.get(tuner, ())
    for key in numbers:
        v = config.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (v == 0 and key != "lora_alpha"):
            problems.append(f"{key} must be a positive number, found {v!r}")
    if tuner == "adalora":
        if config.get("use_dora"):
            problems.append("use_dora=True: PEFT's AdaLoRA does not support DoRA; the config is corrupt")
        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
            problems.append(f"init_lora_weights={init!r} changed the base weights during training")
    if config.get("bias", "none") not in ("none", "all", "lora_only", "vera_only", None):
        problems.append(f"bias={config.get('bias')!r}: expected 'none', 'all' or '{tuner}_only'")
    if problems:
        raise AdapterError(f"{cfg_path}: cannot merge this {NAMES[tuner]} adapter as configured", problems)


def _adalora(tuner, module, roles, tensors, config):
    missing = [r for r in ("A", "B", "E") if r not in roles]
    if missing:
        return f"AdaLoRA needs lora_A, lora_B and lora_E; missing {', '.join('lora_' + r for r in missing)}"
    problem = float_problem(roles, tensors)
    if problem:
        return problem
    a, b, e = (tensors[roles[r]] for r in ("A", "B", "E"))
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or e.numel() != r:
        return (f"lora_A {list(a.shape)}, lora_B {list(b.shape)} and lora_E {list(e.shape)} do not form "
                "B diag(E) A (expected [r, in], [out, r], [r, 1])")
    # rank_pattern (AdaLoRA's own: a keep-mask per lora_E) says how many ranks survived pruning
    mask = (config.get("rank_pattern") or {}).get(f"{module}.lora_E")
    expected = sum(bool(x) for x in mask) if isinstance(mask, list) else config["init_r"]
    if r != expected:
        return (f"lora_A has {r} ranks but {CONFIG} gives {expected} (init_r, or the rank_pattern mask); the "
                "config does not belong to these weights")
    if "ranknum" in roles:
        ranknum = float(tensors[roles["ranknum"]].reshape(-1)[0])
    else:
        ranknum = float(config["init_r"])
    alpha = float(config["lora_alpha"]) if config["lora_alpha"] > 0 else float(r)
    # PEFT divides by (ranknum + 1e-5) in float32: the same denominator, exactly
    scale = alpha / float(torch.tensor(ranknum, dtype=torch.float32) + 1e-5)
    keys = tuple((role, roles[role]) for role in ("A", "B", "E"))
    if config.get("fan_in_fan_out"):  # GPT-2 Conv1D: W is [in, out]
        return TunerTarget(module, tuner, keys, scale, (a.shape[1], b.shape[0]), "transposed", r, alpha)
    return TunerTarget(module, tuner, keys, scale, (b.shape[0], a.shape[1]), "linear", r, alpha)


def _is_feedforward(config: dict, module: str) -> bool:
    """PEFT's IA3Model._check_target_module_feedforward (note: a plain suffix test, no dot)."""
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module.endswith(t) for t in ff)


def _ia3(tuner, module, roles, tensors, config):
    problem = float_problem(roles, tensors)
    if problem:
        return problem
    l = tensors[roles["l"]]
    ff = _is_feedforward(config, module)
    axis = "in" if ff else "out"
    keys = (("l", roles["l"]),)
    if l.dim() == 2:  # Linear / Conv1D: [1, in] (feedforward) or [out, 1]
        if (l.shape[0] != 1) if ff else (l.shape[1] != 1):
            return (f"ia3_l has shape {list(l.shape)}, but {CONFIG}'s feedforward_modules "
                    f"{'selects' if ff else 'does not select'} this module (expected "
                    f"{'[1, in]' if ff else '[out, 1]'}); the config does not belong to these weights")
        transposed = bool(config.get("fan_in_fan_out"))
        n = l.numel()
        shape = (0, n) if ff != transposed else (n, 0)
        return TunerTarget(module, tuner, keys, 1.0, shape, "transposed" if transposed else "linear", axis=axis)
    if l.dim() >= 3 and l.shape[0] == 1 and all(d == 1 for d in l.shape[2:]):  # conv: [1, C, 1, ...]
        shape = (l.shape[1],) + (0,) * (l.dim() - 1) if not ff else (0,) * l.dim()
        return TunerTarget(module, tuner, keys, 1.0, shape, "conv", axis=axis)
    return f"ia3_l has shape {list(l.shape)}; expected [out, 1], [1, in] or a conv's [1, C, 1, 1]"


def _vera(tuner, module, roles, tensors, config):
    if "lambda_b" not in roles or "lambda_d" not in roles:
        return "VeRA needs vera_lambda_b and vera_lambda_d"
    missing = [k for k in VERA_SHARED.values() if k not in tensors]
    if len(missing) == 1:
        return f"the adapter file has one shared VeRA projection but not {missing[0]}; the file is incomplete"
    if missing:  # save_projection=False: regenerated once the plan knows the layer sizes
        key = config.get("projection_prng_key")
        if not isinstance(key, int) or isinstance(key, bool):
            return (f"the shared VeRA projections are not saved and projection_prng_key={key!r} is not an "
                    "integer seed to regenerate them from")
        roles = {**roles, **REGENERATED}
        problem = float_problem({k: v for k, v in roles.items() if v in tensors}, tensors)
        lam_d = tensors[roles["lambda_d"]]
        if problem or lam_d.numel() != config["r"]:
            return problem or f"vera_lambda_d has {lam_d.numel()} entries but r={config['r']} in {CONFIG}"
        return _vera_target(tuner, module, roles, tensors, config)
    roles = {**roles, **VERA_SHARED}
    problem = float_problem(roles, tensors)
    if problem:
        return problem
    a, b = tensors[VERA_SHARED["A"]], tensors[VERA_SHARED["B"]]
    lam_b, lam_d = tensors[roles["lambda_b"]], tensors[roles["lambda_d"]]
    r = lam_d.numel()
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r or lam_b.dim() != 1 or r != config["r"]:
        return (f"vera_lambda_d [{r}], vera_A {list(a.shape)}, vera_B {list(b.shape)} and r={config['r']} in "
                f"{CONFIG} do not agree on the rank")
    if lam_b.numel() > b.shape[0]:
        return f"vera_lambda_b has {lam_b.numel()} outputs but the shared vera_B only {b.shape[0]} rows"
    return _vera_target(tuner, module, roles, tensors, config)


def _vera_target(tuner, module, roles, tensors, config):
    r, out = tensors[roles["lambda_d"]].numel(), tensors[roles["lambda_b"]].numel()
    keys = tuple((role, roles[role]) for role in ("A", "B", "lambda_d", "lambda_b"))
    if config.get("fan_in_fan_out"):
        return TunerTarget(module, tuner, keys, 1.0, (0, out), "transposed", r)
    return TunerTarget(module, tuner, keys, 1.0, (out, 0), "linear", r)


def _lycoris(tuner, module, roles, tensors, config):
    shape, rank, problem = lycoris.shapes(tuner, roles, tensors)
    if problem:
        return problem
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["alpha"]))
    if rank is not None and rank != r:
        return (f"{CONFIG} gives rank {r} (r/rank_pattern) but the {NAMES[tuner]} factors have rank {rank}; "
                "the config does not belong to these weights")
    keys = tuple((role, key) for role, key in sorted(roles.items()))
    layout = "conv" if len(shape) > 2 else "linear"
    return TunerTarget(module, tuner, keys, alpha / r, shape, layout, r, alpha)


def resolve(rec: TunerTarget, shape: tuple[int, ...], adapter: Adapter) -> tuple[TunerTarget | None, str | None]:
    """Check a tuner target against its base tensor's shape and fill in base_shape (the dims the
    adapter's tensors could not tell). Returns (resolved record, None) or (None, problem)."""
    shape = tuple(shape)
    t = rec.tuner
    if t in ("loha", "lokr") or (t == "adalora" and rec.layout != "transposed"):
        ok = lycoris.fits(rec.base_shape, shape)
        implied = (f"{list(rec.base_shape)}" if len(rec.base_shape) > 2 else
                   f"{list(rec.base_shape)} (as [out, in * kernel] for a conv)")
    elif t == "adalora":
        ok, implied = shape == rec.base_shape, str(list(rec.base_shape))
    elif t == "vera":
        out_ax = 1 if rec.layout == "transposed" else 0
        cols = adapter.tensors[rec.key("A")].shape[1] if rec.key("A") in adapter.tensors else max(shape)
        ok = len(shape) == 2 and shape[out_ax] == max(rec.base_shape) and shape[1 - out_ax] <= cols
        implied = (f"{max(rec.base_shape)} outputs (on axis {out_ax}) and at most {cols} inputs (the shared "
                   "vera_A's width)")
    else:
        ok, implied = _ia3_fits(rec, shape, adapter)
    if not ok:
        return None, (f"base tensor has shape {list(shape)} but the adapter's {NAMES[t]} tensors imply {implied}; "
                      "the adapter was trained for another model")
    layout = "conv" if rec.layout == "linear" and len(shape) > 2 else rec.layout  # flattened conv factors
    return dataclasses.replace(rec, base_shape=shape, layout=layout), None


def _ia3_fits(rec: TunerTarget, shape: tuple[int, ...], adapter: Adapter) -> tuple[bool, str]:
    n = adapter.tensors[rec.key("l")].numel()
    if rec.layout == "conv":
        if rec.axis == "out":
            return len(shape) >= 3 and shape[0] == n, f"a conv weight with {n} output channels"
        # inputs: in_channels = n; grouped convs store W as [out, in/groups, *k]
        ok = len(shape) >= 3 and n % shape[1] == 0 and shape[0] % (n // shape[1]) == 0
        return ok, f"a conv weight with {n} input channels"
    axis = (1 if rec.layout == "linear" else 0) if rec.axis == "in" else (0 if rec.layout == "linear" else 1)
    what = f"a 2-D weight with {n} {'inputs' if rec.axis == 'in' else 'outputs'} on axis {axis}"
    return len(shape) == 2 and shape[axis] == n, what


def regenerate_projections(adapters: list[Adapter], terms: dict[str, list]) -> list[str]:
    """VeRA adapters saved without their shared projections: make them as PEFT does on load
    (VeraModel._init_vera_A_vera_B: one CPU torch.Generator seeded with projection_prng_key draws
    vera_A [r, in_max] then vera_B [out_max, r], each uniform in +-sqrt(3) * sqrt(2) / sqrt(fan_in)),
    sized by the largest adapted layer, which the plan's resolved targets (in `terms`) tell.
    Puts them in adapter.tensors; returns the problems (a sizing that cannot be known)."""
    problems = []
    for ai, adapter in enumerate(adapters):
        recs = {t.pair.module: t.pair for ts in terms.values() for t in ts
                if t.adapter == ai and isinstance(t.pair, TunerTarget) and t.pair.key("A") == REGENERATED["A"]}
        if not recs or REGENERATED["A"] in adapter.tensors:  # none, or made by an earlier plan
            continue
        total = sum(k.endswith(".vera_lambda_d") for k in adapter.tensors)
        if len(recs) != total:
            problems.append(f"{adapter.label}: regenerating the unsaved VeRA projections needs every VeRA layer's "
                            f"size (PEFT sizes them by the largest), but only {len(recs)} of {total} are merged "
                            "(--only?); merge the whole adapter, or save it with save_projection=True")
            continue
        dims = [(s[1], s[0]) if r.layout == "transposed" else (s[0], s[1]) for r in recs.values()
                for s in [r.base_shape]]
        out_max, in_max = max(d[0] for d in dims), max(d[1] for d in dims)
        rank = next(iter(recs.values())).rank
        gen = torch.Generator(device="cpu").manual_seed(adapter.config["projection_prng_key"])
        for key, shape in ((REGENERATED["A"], (rank, in_max)), (REGENERATED["B"], (out_max, rank))):
            bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))  # PEFT's _kaiming_init, fan_in
            adapter.tensors[key] = torch.empty(shape).uniform_(-bound, bound, generator=gen)
        adapter.warnings.append(f"{adapter.label}: VeRA projections were not saved (save_projection=False); "
                                f"regenerated from projection_prng_key={adapter.config['projection_prng_key']} as "
                                "PEFT does on load: the result matches PEFT with this torch's random generator")
    return problems
