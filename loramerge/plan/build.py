"""build_plan(): decide everything before any byte is written.

One PlanState holds what the plan has decided so far, and three passes fill it:
1. resolve: every adapter target (a LoRA pair, a saved full tensor, trained token rows) gets the name of the output
   tensor it lands on (plan.matching: exact, dot-suffix either way, kohya-flattened names);
2. outputs: the output tensors the base does not store are decided once, from those names: an
   lm_head tied to the input embedding becomes its own tensor when an adapter changes either;
3. check: each target against its output tensor (shape, dtype, layout), collecting the terms.
EVERY problem is collected and raised once; then the jobs and output files are laid out.
Pure: reads no tensor data.
"""

from __future__ import annotations

from ..errors import PlanError, UsageError
from ..readers import kohya, loralib, tuners
from ..readers.checkpoint import Checkpoint
from ..types import (DTYPE_NAMES, FLOAT_CODES, Adapter, Codec, Job, LoraPair, ParamTarget, Plan, TensorRef, Term,
                     TunerTarget)
from . import codecs as codec_plan
from .experts import resolve_param
from .kinds import term_problems
from .layout import layout_files, parse_size
from .state import INPUT_EMBEDDINGS, OUTPUT_EMBEDDING, PlanState, Target
from .tokens import check_rows, resolve_rows, rows_problems, share_tied_rows

# Modules GPT-2-style models implement as Conv1D (weights stored [in, out]).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
CONV1D_MODULES = ("c_attn", "c_proj", "c_fc", "q_attn")


def build_plan(
    base: Checkpoint,
    adapters: list[Adapter],
    weights: list[float] | None = None,
    dtype: str = "auto",
    shard_size: int | str | None = None,
    single_file: bool = False,
    strict: bool = True,
    qlora: Codec | None = None,
) -> Plan:
    """strict=False: targets that do not fit are left out and their problems returned in
    plan.problems instead of raised (for `inspect --base`: what would match, what would not).
    `qlora` (a Codec of kind 'qlora') merges every linear LoRA target into its bitsandbytes 4-bit
    round trip, the base a QLoRA adapter was trained against. Quantized bases (FP8, bitsandbytes
    4-bit) get their codecs and companion tensors here (plan/codecs.py)."""
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(f"--weights has {len(weights)} value(s) for {len(adapters)} adapter(s); give one per adapter")
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPE_NAMES)}")
    out_code = None if dtype == "auto" else DTYPE_NAMES[dtype]

    qlora_warnings = codec_plan.check_base(base, qlora)
    st = PlanState(base, adapters)
    targets = _decide_outputs(st, _resolve(st, weights))
    for t in targets:
        if t.key is not None:
            _check_replacement(st, t)
    for t in targets:
        if t.pair is not None:
            _check_pair(st, t)
    for t in targets:
        if t.rows is not None:
            check_rows(st, t)
    for name, terms in st.terms.items():
        _check_terms(st, name, terms)
    st.problems += tuners.regenerate_projections(adapters, st.terms)  # unsaved VeRA projections
    if len(st.matcher.rewrites) > 1:
        shown = "; ".join(f"strip {s!r} add {a!r} for e.g. {mods[0]}" for (s, a), mods in st.matcher.rewrites.items())
        st.problems.append(f"adapter module paths map onto the base with different prefix rewrites ({shown}); "
                           "the adapter and base do not come from the same architecture")
    _inherit_replacement(st)
    _check_vocab(st)
    if st.problems and strict:
        raise PlanError(f"{len(st.problems)} problem(s) matching the adapter(s) to the base {base.path}; "
                        "nothing was written", st.problems)

    jobs = []
    skip = codec_plan.consumed(base, st.terms, out_code)
    for name, ref in base.tensors.items():
        if name in skip:  # an FP8 scale or bitsandbytes part: it travels with its weight's job
            continue
        jobs.append(codec_plan.with_codecs(_job(st, name, ref, out_code), base, out_code, qlora))
        for xname, xref in st.extra.items():  # an untied lm_head goes right after its embedding
            if xref is ref:
                jobs.append(_job(st, xname, xref, out_code))
    files = layout_files(base, jobs, parse_size(shard_size), single_file)

    config_updates = {}
    if st.untied:
        config_updates["tie_word_embeddings"] = False
    for name, shape in st.shapes.items():  # a tied embedding is one of these names too
        if name.endswith(INPUT_EMBEDDINGS) and st.config.get("vocab_size") not in (None, shape[0]):
            config_updates["vocab_size"] = shape[0]
    if out_code is not None:
        # transformers reads this to pick the load dtype with dtype="auto"; keep it truthful.
        config_updates["torch_dtype"] = dtype
    warnings = [w for a in adapters for w in a.warnings] + qlora_warnings
    if single_file and {k: v for k, v in config_updates.items() if k != "torch_dtype"}:
        warnings.append("the output is a single .safetensors file, so no config is written, but the model's "
                        "config must change to load it correctly: "
                        + ", ".join(f"{k}={v!r}" for k, v in config_updates.items() if k != "torch_dtype")
                        + "; write to a directory instead, or edit the config you load it with")
    extra, skipped = list(base.extra_files), list(base.skipped_files)
    if single_file and extra:
        # one file holds tensors only: the config, tokenizer and the rest stay behind, said aloud
        skipped += [p.name for p in extra]
        warnings.append("the output is a single .safetensors file: " + ", ".join(p.name for p in extra)
                        + " of the base " + ("is" if len(extra) == 1 else "are") + " not written with it; "
                        "write to a directory to carry them over")
        extra = []
    return Plan(
        base_path=base.path,
        adapter_paths=[a.path for a in adapters],
        files=files,
        indexed=len(files) > 1 or base.index_file is not None,
        single_file=single_file,
        extra_files=extra,
        skipped_files=skipped,
        config_updates=config_updates,
        warnings=warnings,
        problems=list(st.problems),
        config_removals=codec_plan.config_removals(base, out_code),
        aliases=dict(st.aliases),
    )


def _job(st: PlanState, name: str, ref: TensorRef, out_code: str | None) -> Job:
    code = ref.dtype
    if out_code is not None and code in FLOAT_CODES:
        code = out_code
    shape = st.shapes.get(name)
    return Job(name, ref, code, tuple(st.terms.get(name, ())), shape if shape != ref.shape else None)


# -- pass 1: names ----------------------------------------------------------------------------

def _resolve(st: PlanState, weights: list[float]) -> list[Target]:
    """Every target of every adapter, with the output tensor it lands on; the unresolvable ones
    become problems. A target naming an lm_head the base does not store (it is tied to the
    input embedding) resolves to that name: pass 2 makes it an output tensor."""
    targets = []
    for ai, (adapter, w) in enumerate(zip(st.adapters, weights)):
        for name, key in adapter.replacements.items():
            module, _, param = name.rpartition(".")
            found, _ = st.matcher.match(module)
            full = f"{found}.{param}" if found is not None else None
            if full is None and name == OUTPUT_EMBEDDING and st.tied is not None:
                full = name  # a trained copy of a tied lm_head (modules_to_save)
            if full is None or (full not in st.base.tensors and full != OUTPUT_EMBEDDING):
                st.problems.append(f"{adapter.label}: {name}: the adapter saves a full copy of {name} but the "
                                   "base has no such tensor")
                continue
            targets.append(Target(ai, w, full, saved=name, key=key))
        for pair in adapter.pairs:
            if isinstance(pair, ParamTarget):  # target_parameters (MoE experts): one target per expert tensor
                targets += resolve_param(st, ai, w, adapter, pair)
                continue
            found = _resolve_pair(st, adapter, pair)
            if found is not None:
                targets.append(Target(ai, w, found, pair=pair))
        targets += resolve_rows(st, ai, w, adapter)
    return targets


def _resolve_pair(st: PlanState, adapter: Adapter, pair: LoraPair | TunerTarget) -> str | None:
    wanted = pair.target_name.removesuffix(".weight")
    if wanted.startswith(kohya.FLAT):
        found, candidates = st.matcher.match_flat(wanted[len(kohya.FLAT):])
    else:
        found, candidates = st.matcher.match(wanted)
    if found is not None:
        return found + ".weight"
    if pair.target_name == OUTPUT_EMBEDDING and st.tied is not None:
        return OUTPUT_EMBEDDING  # lm_head tied to the input embedding and not stored
    where = f"{adapter.label}: {pair.module}"
    if candidates:
        st.problems.append(f"{where}: ambiguous, matches {len(candidates)} base tensors "
                           f"({', '.join(x + '.weight' for x in candidates[:4])})")
    else:
        wanted_name = (f"a tensor whose dotted name flattens to {wanted[len(kohya.FLAT):]}"
                       if wanted.startswith(kohya.FLAT) else pair.target_name)
        st.problems.append(f"{where}: no base tensor named {wanted_name} (nor any prefix/suffix variant of it)")
    return None


# -- pass 2: output tensors -------------------------------------------------------------------

def _decide_outputs(st: PlanState, targets: list[Target]) -> list[Target]:
    """Tied input/output embeddings that an adapter changes must be stored apart and untied, or
    the reloaded model would silently share one of them for both (as PEFT's merge does). An
    lm_head the base does not store then becomes its own tensor, starting from the embedding.
    Token rows PEFT applies to both (tokens.py) do not tell them apart: they go into each output
    tensor that holds the lm_head. Returns the targets, lm_head's share of those rows included."""
    targets, shared = share_tied_rows(st, targets)
    if st.tied is None:
        return targets
    touched = {t.name for t in targets if not any(t is s for s in shared)} & {OUTPUT_EMBEDDING, *st.tied}
    if touched:
        st.untied = True
        if OUTPUT_EMBEDDING not in st.base.tensors:
            st.extra[OUTPUT_EMBEDDING] = st.base.tensors[st.tied[0]]
    if OUTPUT_EMBEDDING in st.base.tensors or OUTPUT_EMBEDDING in st.extra:
        targets += [Target(t.adapter, t.weight, OUTPUT_EMBEDDING, rows=t.rows) for t in shared]
    elif shared:
        st.aliases[OUTPUT_EMBEDDING] = st.tied[0]  # stays tied: the embedding's rows are lm_head's
    return targets


# -- pass 3: checks and terms -----------------------------------------------------------------

def _check_replacement(st: PlanState, t: Target) -> None:
    adapter = st.adapters[t.adapter]
    where = f"{adapter.label}: {t.saved}"
    new = tuple(adapter.tensors[t.key].shape)
    old = codec_plan.logical_shape(st.base, t.name, st.source(t.name))
    # A changed first dimension is a resized vocabulary, allowed for embeddings and lm_head only;
    # anything else means the adapter belongs to another model.
    vocab = t.name.endswith(INPUT_EMBEDDINGS) or t.name == OUTPUT_EMBEDDING
    if new != old and (not vocab or len(new) != len(old) or new[1:] != old[1:]):
        st.problems.append(f"{where}: saved tensor has shape {list(new)} but the base's {t.name} has "
                           f"{list(old)}; the adapter was trained for another model")
        return
    if t.weight != 1:
        st.problems.append(f"{where}: a saved full tensor cannot be weighted (weight {t.weight:g}); merge this "
                           "adapter with weight 1")
        return
    st.add(t.name, Term(t.adapter, None, t.weight, kind="replace", key=t.key))
    st.shapes[t.name] = new


def _check_pair(st: PlanState, t: Target) -> None:
    adapter, pair, wname = st.adapters[t.adapter], t.pair, t.name
    where = f"{adapter.label}: {pair.module}"
    ref = st.source(wname)
    shape = st.shape(wname)
    if pair.stacked:  # one expert of a fused [E, ...] tensor: its delta lands in W[expert]
        if codec_plan.decodable(st.base, wname):
            st.problems.append(f"{where}: {wname} is a quantized fused experts tensor; loramerge merges fused "
                               "experts in floating-point checkpoints only")
            return
        shape = shape[1:]
    if pair.layout == "auto":  # formats that do not store the layout (loralib)
        pair, problem = loralib.resolve(pair, shape, adapter)
        if problem:
            st.problems.append(f"{where}: {wname}: {problem}")
            return
    if isinstance(pair, TunerTarget):  # IA3, VeRA and flattened convs: shape known only with W's
        pair, problem = tuners.resolve(pair, shape, adapter)
        if problem:
            st.problems.append(f"{where}: {wname}: {problem}")
            return
    if ref.dtype not in FLOAT_CODES and not codec_plan.decodable(st.base, wname):
        st.problems.append(f"{where}: base tensor {wname} is {ref.dtype}" + (
            "; an FP8 weight can be merged only with its checkpoint's config.json (its quantization_config says "
            "how it is scaled): pass the model directory" if ref.dtype.startswith("F8") else
            ", a quantized/integer type loramerge cannot decode; merge into the original floating-point "
            "(unquantized) base instead"))
        return
    if shape != pair.base_shape:
        if pair.layout == "linear" and len(shape) == 2 and shape == pair.base_shape[::-1]:
            st.problems.append(f"{where}: base tensor {wname} is {list(shape)}, the transpose of the adapter's "
                               f"{list(pair.base_shape)}: the layer stores its weight [in, out] (a GPT-2 style "
                               "Conv1D) but the adapter says fan_in_fan_out=false; set it to true in "
                               "adapter_config.json if this adapter was trained on that layer")
        else:
            st.problems.append(f"{where}: base tensor {wname} has shape {list(shape)} but the adapter's "
                               f"lora_B @ lora_A gives {list(pair.base_shape)}; the adapter was trained for "
                               "another model")
        return
    module = wname.removesuffix(".weight")
    if (pair.layout == "linear" and st.config.get("model_type") in CONV1D_MODEL_TYPES
            and module.rsplit(".", 1)[-1] in CONV1D_MODULES):
        # Square Conv1D weights (c_proj) fit either way round: only the config can tell.
        st.problems.append(f"{where}: {st.config['model_type']} implements {module.rsplit('.', 1)[-1]} as Conv1D "
                           "(weight stored [in, out]) but the adapter says fan_in_fan_out=false; set it to "
                           "true in adapter_config.json")
        return
    st.add(wname, Term(t.adapter, pair, t.weight, kind=pair.term_kind))
    # output features: the rows of W, or its columns where W is stored [in, out]
    out_features = pair.base_shape[1] if pair.layout == "transposed" else pair.base_shape[0]
    if pair.bias_key is not None:
        bname = module + ".bias"
        bref = st.base.tensors.get(bname)
        if bref is None and not bool(adapter.tensors[pair.bias_key].any()):
            pass  # an all-zero lora_B.bias adds nothing (a combined adapter's, for a target of one without)
        elif bref is None:
            st.problems.append(f"{where}: the adapter trains a bias (lora_bias) but the base has no {bname}; "
                               "PEFT cannot merge this either")
        elif bref.shape != (out_features,):
            st.problems.append(f"{where}: base {bname} has shape {list(bref.shape)}, lora_B.bias has "
                               f"[{out_features}]")
        else:
            st.add(bname, Term(t.adapter, pair, t.weight, kind="bias"))
    if isinstance(pair, TunerTarget) and pair.tuner == "ia3" and pair.axis == "out":
        # PEFT's IA3 merge scales the bias of an output-scaled layer too (y = (xW^T + b) * l)
        bname = module + ".bias"
        bref = st.base.tensors.get(bname)
        if bref is not None and bref.shape == (out_features,):
            st.add(bname, Term(t.adapter, pair, t.weight, kind="scale"))
        elif bref is not None:
            st.problems.append(f"{where}: base {bname} has shape {list(bref.shape)}, ia3_l has {out_features}")


def _check_terms(st: PlanState, name: str, terms: list[Term]) -> None:
    if sum(t.kind == "replace" for t in terms) > 1:
        st.problems.append(f"{name}: replaced by full saved copies from several adapters; merge them one at a time")
    st.problems += term_problems(name, terms, st.adapters)
    st.problems += rows_problems(st, name, terms)
    dora = [t for t in terms if t.pair is not None and t.pair.magnitude_key]
    label = st.adapters[dora[0].adapter].label if dora else ""
    if dora and dora[0].weight != 1:
        st.problems.append(f"{name}: DoRA ({label}) is not linear in the adapter, so it cannot be weighted "
                           f"({dora[0].weight:g}); apply it with weight 1")
    if dora and len([t for t in terms if t.kind in ("lora", "delta")]) > 1:
        st.problems.append(f"{name}: DoRA ({label}) rescales the whole weight, so it cannot be summed with "
                           "other adapters' terms on the same tensor; apply it alone")


def _inherit_replacement(st: PlanState) -> None:
    """An lm_head that was tied to a replaced embedding (saved base layer, resized vocabulary) was
    that replacement at run time: it starts from it, without the embedding's own LoRA delta."""
    if OUTPUT_EMBEDDING not in st.extra:
        return
    embedding = st.tied[0]
    own = st.terms.get(OUTPUT_EMBEDDING, [])
    rep = [t for t in st.terms.get(embedding, []) if t.kind == "replace"]
    if rep and not any(t.kind == "replace" for t in own):
        st.terms[OUTPUT_EMBEDDING] = rep + own
        st.shapes[OUTPUT_EMBEDDING] = st.shapes[embedding]


def _check_vocab(st: PlanState) -> None:
    """Input and output embeddings must end with the same vocabulary size, or the output will not load."""
    names = [n for n in [*st.base.tensors, *st.extra] if n.endswith(INPUT_EMBEDDINGS) or n == OUTPUT_EMBEDDING]
    rows = {n: st.shape(n)[0] for n in names}
    if len(set(rows.values())) > 1:
        st.problems.append("the merged embeddings would disagree on the vocabulary size ("
                           + ", ".join(f"{n}: {r}" for n, r in rows.items()) + "); a resized vocabulary needs "
                           "both the input embedding and lm_head saved with the adapter (modules_to_save)")
