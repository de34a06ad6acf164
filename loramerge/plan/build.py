"""build_plan(): decide everything before any byte is written.

Matches every adapter target to exactly one base tensor, checks shapes and dtypes, collects
EVERY problem and raises once, and lays out the output files. Pure: reads no tensor data.
"""

from __future__ import annotations

from ..errors import PlanError, UsageError
from ..readers import kohya, loralib
from ..readers.checkpoint import Checkpoint
from ..types import DTYPE_NAMES, FLOAT_CODES, Adapter, Job, Plan, TensorRef, Term
from .layout import layout_files, parse_size
from .matching import ModuleMatcher

# Modules GPT-2-style models implement as Conv1D (weights stored [in, out]).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
CONV1D_MODULES = ("c_attn", "c_proj", "c_fc", "q_attn")
# Names of input-embedding tensors an output embedding (lm_head) can be tied to.
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                    "tok_embeddings.weight", "shared.weight")
OUTPUT_EMBEDDING = "lm_head.weight"


class _Collector:
    """Terms per output tensor, plus every problem found along the way."""

    def __init__(self):
        self.terms: dict[str, list[Term]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.problems: list[str] = []

    def add(self, name: str, term: Term) -> None:
        self.terms.setdefault(name, []).append(term)


def build_plan(
    base: Checkpoint,
    adapters: list[Adapter],
    weights: list[float] | None = None,
    dtype: str = "auto",
    shard_size: int | str | None = None,
    single_file: bool = False,
    strict: bool = True,
) -> Plan:
    """strict=False: targets that do not fit are left out and their problems returned in
    plan.problems instead of raised (for `inspect --base`: what would match, what would not)."""
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(f"--weights has {len(weights)} value(s) for {len(adapters)} adapter(s); give one per adapter")
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPE_NAMES)}")
    out_code = None if dtype == "auto" else DTYPE_NAMES[dtype]
    config = base.config() or {}

    matcher = ModuleMatcher(base.tensors)
    tied = _tied_embeddings(base, config)
    c = _Collector()
    virtual: dict[str, TensorRef] = {}  # output tensors the base lacks (an untied lm_head)
    for ai, (adapter, w) in enumerate(zip(adapters, weights)):
        for name, key in adapter.replacements.items():
            _match_replacement(c, matcher, base, adapter, ai, w, name, key, tied, virtual)
        for pair in adapter.pairs:
            _match_pair(c, matcher, base, config, adapter, ai, w, pair, tied, virtual)
    for name, terms in c.terms.items():
        _check_terms(c, name, terms, adapters)
    if len(matcher.rewrites) > 1:
        shown = "; ".join(f"strip {s!r} add {a!r} for e.g. {mods[0]}" for (s, a), mods in matcher.rewrites.items())
        c.problems.append(f"adapter module paths map onto the base with different prefix rewrites ({shown}); "
                          "the adapter and base do not come from the same architecture")
    if c.problems and strict:
        raise PlanError(f"{len(c.problems)} problem(s) matching the adapter(s) to the base {base.path}; "
                        "nothing was written", c.problems)

    config_updates = {}
    if tied is not None and (virtual or any(n in c.terms for n in tied)):
        # Tied input/output embeddings that now differ must be stored apart and untied, or the
        # reloaded model would silently share one of them for both (as PEFT's merge does).
        config_updates["tie_word_embeddings"] = False
        if OUTPUT_EMBEDDING not in base.tensors and OUTPUT_EMBEDDING not in virtual:
            virtual[OUTPUT_EMBEDDING] = base.tensors[tied[0]]
        _inherit_replacement(c, tied[0], base, virtual)
    _check_vocab(c, base, virtual)

    jobs = []
    for name, ref in base.tensors.items():
        jobs.append(_job(name, ref, c, out_code))
        for vname, vref in virtual.items():  # an untied lm_head goes right after its embedding
            if vref is ref:
                jobs.append(_job(vname, vref, c, out_code))
    files = layout_files(base, jobs, parse_size(shard_size), single_file)

    for name, shape in c.shapes.items():  # a tied embedding is one of these names too
        if name.endswith(INPUT_EMBEDDINGS) and config.get("vocab_size") not in (None, shape[0]):
            config_updates["vocab_size"] = shape[0]
    if out_code is not None:
        # transformers reads this to pick the load dtype with dtype="auto"; keep it truthful.
        config_updates["torch_dtype"] = dtype
    warnings = [w for a in adapters for w in a.warnings]
    if single_file and {k: v for k, v in config_updates.items() if k != "torch_dtype"}:
        warnings.append("the output is a single .safetensors file, so no config is written, but the model's "
                        "config must change to load it correctly: "
                        + ", ".join(f"{k}={v!r}" for k, v in config_updates.items() if k != "torch_dtype")
                        + "; write to a directory instead, or edit the config you load it with")
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
        problems=list(c.problems),
    )


def _job(name: str, ref: TensorRef, c: _Collector, out_code: str | None) -> Job:
    code = ref.dtype
    if out_code is not None and code in FLOAT_CODES:
        code = out_code
    shape = c.shapes.get(name)
    return Job(name, ref, code, tuple(c.terms.get(name, ())), shape if shape != ref.shape else None)


def _tied_embeddings(base: Checkpoint, config: dict) -> tuple[str, ...] | None:
    """(input embedding name[, lm_head name]) when the base ties them, else None. Without an
    explicit tie_word_embeddings, a language-model checkpoint that stores no lm_head is tied
    (transformers' default is to tie; GPT-2 style configs omit the key)."""
    inputs = [n for n in base.tensors if n.endswith(INPUT_EMBEDDINGS)]
    if len(inputs) != 1:
        return None
    tie = config.get("tie_word_embeddings")
    if tie is None:
        lm = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                 for a in config.get("architectures") or [])
        tie = lm and OUTPUT_EMBEDDING not in base.tensors
    if not tie:
        return None
    return (inputs[0],) + ((OUTPUT_EMBEDDING,) if OUTPUT_EMBEDDING in base.tensors else ())


def _match_replacement(c, matcher, base, adapter, ai, w, name, key, tied, virtual) -> None:
    module, _, param = name.rpartition(".")
    target, _ = matcher.match(module)
    where = f"{adapter.label}: {name}"
    if target is None and name == OUTPUT_EMBEDDING and tied is not None:
        # a trained copy of a tied lm_head (modules_to_save): it becomes its own tensor
        virtual[OUTPUT_EMBEDDING] = base.tensors[tied[0]]
        target = "lm_head"
    full = f"{target}.{param}"
    if target is None or (full not in base.tensors and full not in virtual):
        c.problems.append(f"{where}: the adapter saves a full copy of {name} but the base has no such tensor")
        return
    new = tuple(adapter.tensors[key].shape)
    old = (base.tensors.get(full) or virtual[full]).shape
    # A changed first dimension is a resized vocabulary, allowed for embeddings and lm_head only;
    # anything else means the adapter belongs to another model.
    vocab = full.endswith(INPUT_EMBEDDINGS) or full == OUTPUT_EMBEDDING
    if new != old and (not vocab or len(new) != len(old) or new[1:] != old[1:]):
        c.problems.append(f"{where}: saved tensor has shape {list(new)} but the base's {full} has "
                          f"{list(old)}; the adapter was trained for another model")
        return
    if w != 1:
        c.problems.append(f"{where}: a saved full tensor cannot be weighted (weight {w:g}); merge this "
                          "adapter with weight 1")
        return
    c.add(full, Term(ai, None, w, kind="replace", key=key))
    c.shapes[full] = new


def _inherit_replacement(c: _Collector, embedding: str, base: Checkpoint, virtual: dict) -> None:
    """An lm_head that was tied to a replaced embedding (saved base layer, resized vocabulary) was
    that replacement at run time: it starts from it, without the embedding's own LoRA delta."""
    if OUTPUT_EMBEDDING not in virtual:
        return
    own = c.terms.get(OUTPUT_EMBEDDING, [])
    rep = [t for t in c.terms.get(embedding, []) if t.kind == "replace"]
    if rep and not any(t.kind == "replace" for t in own):
        c.terms[OUTPUT_EMBEDDING] = rep + own
        c.shapes[OUTPUT_EMBEDDING] = c.shapes[embedding]


def _check_vocab(c: _Collector, base: Checkpoint, virtual: dict) -> None:
    """Input and output embeddings must end with the same vocabulary size, or the output will not load."""
    names = [n for n in list(base.tensors) + list(virtual) if n.endswith(INPUT_EMBEDDINGS) or n == OUTPUT_EMBEDDING]
    rows = {n: c.shapes.get(n, (base.tensors.get(n) or virtual[n]).shape)[0] for n in names}
    if len(set(rows.values())) > 1:
        c.problems.append("the merged embeddings would disagree on the vocabulary size ("
                          + ", ".join(f"{n}: {r}" for n, r in rows.items()) + "); a resized vocabulary needs "
                          "both the input embedding and lm_head saved with the adapter (modules_to_save)")


def _match_pair(c, matcher, base, config, adapter, ai, w, pair, tied, virtual) -> None:
    where = f"{adapter.label}: {pair.module}"
    wanted = pair.target_name.removesuffix(".weight")
    if wanted.startswith(kohya.FLAT):
        target, candidates = matcher.match_flat(wanted[len(kohya.FLAT):])
    else:
        target, candidates = matcher.match(wanted)
    if target is None and pair.target_name == OUTPUT_EMBEDDING and tied is not None:
        # lm_head tied to the input embedding and not stored: the merged lm_head becomes its own
        # tensor, starting from the embedding's values.
        virtual[OUTPUT_EMBEDDING] = base.tensors[tied[0]]
        target = wanted
    if target is None:
        if candidates:
            c.problems.append(f"{where}: ambiguous, matches {len(candidates)} base tensors "
                              f"({', '.join(x + '.weight' for x in candidates[:4])})")
        else:
            wanted_name = (f"a tensor whose dotted name flattens to {wanted[len(kohya.FLAT):]}"
                           if wanted.startswith(kohya.FLAT) else pair.target_name)
            c.problems.append(f"{where}: no base tensor named {wanted_name} (nor any prefix/suffix "
                              "variant of it)")
        return
    wname = target + ".weight"
    ref = base.tensors.get(wname) or virtual[wname]
    shape = c.shapes.get(wname, ref.shape)
    if wname == OUTPUT_EMBEDDING and wname in virtual and tied is not None and wname not in c.shapes:
        shape = c.shapes.get(tied[0], shape)  # starts from the (possibly resized) embedding
    if pair.layout == "auto":  # formats that do not store the layout (loralib)
        pair, problem = loralib.resolve(pair, shape, adapter)
        if problem:
            c.problems.append(f"{where}: {wname}: {problem}")
            return
    if ref.dtype not in FLOAT_CODES:
        c.problems.append(f"{where}: base tensor {wname} is {ref.dtype}, a quantized/integer type; merge "
                          "into the original floating-point (unquantized) base instead")
        return
    if shape != pair.base_shape:
        if pair.layout == "linear" and len(shape) == 2 and shape == pair.base_shape[::-1]:
            c.problems.append(f"{where}: base tensor {wname} is {list(shape)}, the transpose of the adapter's "
                              f"{list(pair.base_shape)}: the layer stores its weight [in, out] (a GPT-2 style "
                              "Conv1D) but the adapter says fan_in_fan_out=false; set it to true in "
                              "adapter_config.json if this adapter was trained on that layer")
        else:
            c.problems.append(f"{where}: base tensor {wname} has shape {list(shape)} but the adapter's "
                              f"lora_B @ lora_A gives {list(pair.base_shape)}; the adapter was trained for "
                              "another model")
        return
    if (pair.layout == "linear" and config.get("model_type") in CONV1D_MODEL_TYPES
            and wanted.rsplit(".", 1)[-1] in CONV1D_MODULES):
        # Square Conv1D weights (c_proj) fit either way round: only the config can tell.
        c.problems.append(f"{where}: {config['model_type']} implements {wanted.rsplit('.', 1)[-1]} as Conv1D "
                          "(weight stored [in, out]) but the adapter says fan_in_fan_out=false; set it to "
                          "true in adapter_config.json")
        return
    c.add(wname, Term(ai, pair, w))
    # output features: the rows of W, or its columns where W is stored [in, out]
    out_features = pair.base_shape[1] if pair.layout == "transposed" else pair.base_shape[0]
    if pair.bias_key is not None:
        bname = target + ".bias"
        bref = base.tensors.get(bname)
        if bref is None:
            c.problems.append(f"{where}: the adapter trains a bias (lora_bias) but the base has no {bname}; "
                              "PEFT cannot merge this either")
        elif bref.shape != (out_features,):
            c.problems.append(f"{where}: base {bname} has shape {list(bref.shape)}, lora_B.bias has "
                              f"[{out_features}]")
        else:
            c.add(bname, Term(ai, pair, w, kind="bias"))


def _check_terms(c, name: str, terms: list[Term], adapters: list[Adapter]) -> None:
    if sum(t.kind == "replace" for t in terms) > 1:
        c.problems.append(f"{name}: replaced by full saved copies from several adapters; merge them one at a time")
    dora = [t for t in terms if t.pair is not None and t.pair.magnitude_key]
    if dora and dora[0].weight != 1:
        c.problems.append(f"{name}: DoRA ({adapters[dora[0].adapter].label}) is not linear in the adapter, so "
                          f"it cannot be weighted ({dora[0].weight:g}); apply it with weight 1")
    if dora and len([t for t in terms if t.kind == "lora"]) > 1:
        c.problems.append(f"{name}: DoRA ({adapters[dora[0].adapter].label}) rescales the whole weight, so it "
                          "cannot be summed with other adapters' terms on the same tensor; apply it alone")
