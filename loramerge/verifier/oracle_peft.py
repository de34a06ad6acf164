"""`verify --oracle peft`: PEFT itself as a further, independent judge of the merge.

The base model is built with transformers in float64, each adapter loaded onto it with PEFT
(PeftModel.from_pretrained / load_adapter; a weight c != 1 scales its lora_B), PEFT merges them
(merge_and_unload), and every tensor of MERGED is held to check 1's rules against PEFT's float64
result E: bfloat16/float16 within 2 ulps of E correctly rounded (the ulp at max(|W|, |E|)),
float32/float64 within 1e-6 x max |E| over the tensor. Every parameter is judged, the untouched
ones too. The model is held whole in memory, twice the float32 size: meant for the model sizes at
which a user wants this second opinion.

PEFT must load every tensor of each adapter file onto the model (a file trained on another model
class leaves PEFT's LoRA layers at their initial values, which would make the oracle judge a
merge of nothing): anything left over is an error, as are a missing peft/transformers, adapters
that are not PEFT directories, and bases PEFT cannot merge into here (quantized, --qlora).
Tensors PEFT treats differently by design are listed as not judged, with the reason: the copy of a
tied embedding that loramerge writes apart (PEFT keeps the tie and merges into both).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..engine.ops import round_to
from ..errors import LoraMergeError, UsageError
from ..readers.checkpoint import Checkpoint
from ..types import FLOAT_CODES, ST_TO_TORCH, Job, numel
from .compare import ulp as _ulp
from .model import _available_memory, _resolve
from .report import FLOAT_TOL_REL, HALF_CODES, HALF_TOL_ULPS, OracleCheck, TensorCheck

CHOICES = ("peft",)
TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering"}


def preflight(oracle: str, base: Path, adapters: list[Path], qlora, only) -> None:
    """Refuse, before any work, what the oracle cannot do."""
    if oracle not in CHOICES:
        raise UsageError(f"--oracle {oracle!r}: expected one of {', '.join(CHOICES)}")
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise UsageError(f"--oracle peft needs PEFT and transformers, which are not installed ({e.name} is "
                         "missing): pip install peft transformers, or drop --oracle") from None
    if qlora is not None:
        raise UsageError("--oracle peft cannot judge a --qlora merge (PEFT merges into the 4-bit weights "
                         "themselves); drop --oracle")
    if only is not None:
        raise UsageError("--oracle peft merges whole adapters; it cannot judge a merge made with --only")
    if not (Path(base) / "config.json").is_file():
        raise UsageError(f"--oracle peft: {base} is not a model directory with config.json; transformers "
                         "cannot build the model, so PEFT cannot merge into it")
    for a in adapters:
        if not (Path(a) / "adapter_config.json").is_file():
            raise UsageError(f"--oracle peft: {a} is not a PEFT adapter directory (adapter_config.json); PEFT "
                             "cannot load it (kohya and loralib files have no PEFT form): drop --oracle")


def check(base_ck: Checkpoint, merged_ck: Checkpoint, adapters: list[Path], weights: list[float],
          jobs: list[Job], tensors: list[TensorCheck]) -> OracleCheck:
    """PEFT's merge against MERGED, tensor by tensor; failures go into `tensors` (by name)."""
    import peft
    import transformers

    if base_ck.quant is not None:
        raise LoraMergeError(f"--oracle peft: {base_ck.path} is a quantized ({base_ck.quant.method}) checkpoint; "
                             "the oracle merges plain float models only: drop --oracle")
    needed = 8 * sum(numel(r.shape) for r in base_ck.tensors.values())
    free = _available_memory(torch.device("cpu"))
    if free is not None and needed > 0.8 * free:
        raise LoraMergeError(f"--oracle peft: the float64 model needs {needed / 1e9:.1f} GB and {free / 1e9:.1f} GB "
                             "is free; drop --oracle (checks 1-4 cover the merge without it)")
    model, cls_name = _build(base_ck.root, adapters, weights, jobs, transformers, peft)
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    params.update({k: v for k, v in _as_saved(model).items() if k not in params})
    check = OracleCheck("ok", f"PEFT {peft.__version__} merge_and_unload on {cls_name} in float64")
    by_name = {t.name: t for t in tensors}
    jobs_by_name = {j.name: j for j in jobs}
    twins = _tie_groups(model)
    stored = {_resolve(n, set(params)): n for n in merged_ck.tensors}
    for name, mref in merged_ck.tensors.items():
        tc, job = by_name.get(name), jobs_by_name.get(name)
        pname = _resolve(name, set(params))
        if tc is None or job is None:
            continue  # not a tensor this merge writes: check 1 already fails it
        if pname is None:
            check.not_judged[name] = f"not a parameter of transformers' {cls_name}"
            continue
        apart = [stored[p] for p in twins.get(pname, ()) if p != pname and stored.get(p) not in (None, name)]
        if apart and not job.terms:
            check.not_judged[name] = (f"tied to {apart[0]} in the base; PEFT keeps the tie and merges into both, "
                                      "loramerge writes them apart and leaves this one as it was")
            continue
        if mref.dtype not in FLOAT_CODES:
            check.not_judged[name] = f"stored as {mref.dtype}"
            continue
        problem = _compare(tc, merged_ck.read(mref), params[pname].detach(), base_ck.read(job.source), mref.dtype)
        check.compared += 1
        if problem:
            tc.problems.append("PEFT oracle: " + problem)
            check.failed += 1
    if check.failed:
        check.status = "FAIL"
    return check


def _as_saved(model) -> dict[str, torch.Tensor]:
    """The merged model's tensors under the names its checkpoints use where transformers converts
    on load (MoE experts, fused in memory: one tensor per expert), by transformers' own reverse
    conversion, as save_pretrained writes them; {} where that is not available."""
    try:
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(model, dict(model.state_dict()))
    except Exception:  # noqa: BLE001 - another transformers version: those tensors stay not judged
        return {}


def _build(root: Path, adapters: list[Path], weights: list[float], jobs: list[Job], transformers, peft):
    """PEFT's merged model (float64) and the base's class name."""
    from transformers.utils import logging

    cls = _model_class(root, adapters[0], transformers)
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # verify prints a table; keep transformers' bars out of it
    try:
        with warnings.catch_warnings():
            # a class with a head the base lacks (the adapter's training class) initializes it: the
            # head is no tensor of MERGED, so it is never judged; PEFT's own load warnings become
            # _check_loaded's error
            warnings.simplefilter("ignore")
            return _load_and_merge(cls, root, adapters, weights, jobs, peft)
    finally:
        if shown:
            logging.enable_progress_bar()


def _model_class(root: Path, adapter: Path, transformers):
    """The class the adapter was trained on, as far as its config says: a transformers class in
    PEFT's auto_mapping (e.g. BertForSequenceClassification around a bare BertModel checkpoint),
    else the auto class of its task_type (a CAUSAL_LM adapter on a bare LlamaModel checkpoint),
    else the base's own architecture, else AutoModel. A head the checkpoint lacks is initialized
    by transformers; it is no tensor of MERGED, so it is never judged."""
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    mapping = cfg.get("auto_mapping") or {}
    config = json.loads((Path(root) / "config.json").read_text())
    names = [mapping.get("base_model_class") if str(mapping.get("parent_library", "")).startswith("transformers")
             else None, TASK_CLASSES.get(str(cfg.get("task_type"))), *(config.get("architectures") or [])]
    for name in names:
        if name and isinstance(getattr(transformers, name, None), type):
            return getattr(transformers, name)
    return transformers.AutoModel


def _load_and_merge(cls, root: Path, adapters: list[Path], weights: list[float], jobs: list[Job], peft):
    try:
        model = cls.from_pretrained(root, dtype=torch.float64)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the oracle cannot run
        raise LoraMergeError(f"--oracle peft: transformers cannot build {cls.__name__} from {root}: "
                             f"{type(e).__name__}: {str(e)[:200]}") from None
    _resize_vocab(model, jobs)
    names = [f"oracle{i}" for i in range(len(adapters))]
    pm = None
    for path, name, w in zip(adapters, names, weights):
        try:
            if pm is None:
                pm = peft.PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                pm.load_adapter(path, adapter_name=name)
        except Exception as e:  # noqa: BLE001
            raise LoraMergeError(f"--oracle peft: PEFT cannot load {path} onto {cls.__name__}: "
                                 f"{type(e).__name__}: {str(e)[:200]}") from None
        _check_loaded(pm, path, name, peft)
        if w != 1:
            _weigh(pm, path, name, w)
    with torch.no_grad():
        merged = pm.merge_and_unload(adapter_names=names)
    return merged, type(merged).__name__


def _resize_vocab(model, jobs: list[Job]) -> None:
    """A merge that resizes the vocabulary (saved embedding layers) needs the model resized first,
    as the training code did, or PEFT cannot load the saved tensors."""
    emb = model.get_input_embeddings().weight
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p is emb}
    for job in jobs:
        if job.out_shape is not None and _resolve(job.name, names) is not None and job.shape[0] != emb.shape[0]:
            model.resize_token_embeddings(job.shape[0], mean_resizing=False)
            return


def _check_loaded(pm, path: Path, name: str, peft) -> None:
    """Every tensor of the adapter file must be in PEFT's model, with its value."""
    from safetensors.torch import load_file

    files = [Path(path) / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (Path(path) / f).is_file()]
    saved = load_file(str(files[0])) if files[0].suffix == ".safetensors" else torch.load(files[0], weights_only=True)
    held = peft.get_peft_model_state_dict(pm, adapter_name=name)
    lost = [k for k, v in saved.items() if k not in held or not torch.equal(held[k].to(v.dtype), v)]
    if lost:
        raise LoraMergeError(f"--oracle peft: PEFT loaded {path} onto {type(pm.base_model.model).__name__} but "
                             f"{len(lost)} of its {len(saved)} tensors did not land (e.g. {lost[0]}): the adapter "
                             "was trained on another model class or layout; the oracle cannot judge this merge")


def _weigh(pm, path: Path, name: str, w: float) -> None:
    """The user's weight c on a LoRA adapter: c * s * B @ A is s * (c B) @ A (biases alike)."""
    if str(pm.peft_config[name].peft_type.value).upper() != "LORA" or pm.peft_config[name].use_dora:
        raise UsageError(f"--oracle peft: {path} has weight {w:g}; the oracle weighs plain LoRA adapters only")
    with torch.no_grad():
        for module in pm.modules():
            for attr in ("lora_B", "lora_embedding_B"):
                table = getattr(module, attr, None)
                if table is not None and name in table:
                    part = table[name]
                    for p in ([part] if isinstance(part, torch.nn.Parameter) else part.parameters()):
                        p.mul_(w)


def _tie_groups(model) -> dict[str, list[str]]:
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return {n: g for g in groups.values() if len(g) > 1 for n in g}


def _compare(tc: TensorCheck, m: torch.Tensor, e: torch.Tensor, w: torch.Tensor, code: str) -> str | None:
    """Check 1's rule with PEFT's value E as the expected one; tc.oracle gets the score."""
    if tuple(m.shape) != tuple(e.shape):
        return f"shape {list(m.shape)} in MERGED, {list(e.shape)} in PEFT's merge"
    m, e = m.double(), e.double()
    if code in HALF_CODES:
        mag = torch.maximum(e.abs(), w.double().abs()) if w.shape == e.shape else e.abs()
        ulps = (m - round_to(e, ST_TO_TORCH[code]).double()).abs() / _ulp(mag, code)
        tc.oracle = float(ulps.max()) if ulps.numel() else 0.0
        bad = int((ulps > HALF_TOL_ULPS).sum())
        what = f"more than {HALF_TOL_ULPS:g} ulp of {code} (max {tc.oracle:.3g} ulp)"
        score = ulps
    else:
        err = (m - e).abs()
        top = float(e.abs().max()) if e.numel() else 0.0
        tc.oracle = float(err.max()) / top if top > 0 else float(err.max()) if err.numel() else 0.0
        bad = int((err > FLOAT_TOL_REL * top).sum())
        what = f"more than {FLOAT_TOL_REL:g} x max|PEFT| (max rel err {tc.oracle:.3g})"
        score = err
    if not bad:
        return None
    i = int(score.reshape(-1).argmax())
    idx = list(torch.unravel_index(torch.tensor(i), m.shape)) if m.dim() else []
    at = [int(x) for x in idx]
    return (f"{bad} of {m.numel()} elements differ from PEFT's float64 merge by {what}; worst at {at}: merged "
            f"{float(m.reshape(-1)[i]):.6g}, PEFT {float(e.reshape(-1)[i]):.6g}")
