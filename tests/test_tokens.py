"""Trained token rows beside LoRA (PEFT trainable_token_indices; issue 11, item 2).

Oracles: the UNMERGED PeftModel's outputs (float32), PEFT's merge_and_unload where PEFT merges
right, and the saved rows themselves (a row is the trained value rounded once to the output
dtype; every other row of the tensor is the base's, bit for bit). Fixtures: fixtures/tokens/."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loramerge
from conftest import FIXTURES, correctly_rounded, expected_delta64, load_dir, rel_err
from loramerge.errors import AdapterError, PlanError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

T = FIXTURES / "tokens"
INDEX = json.loads((T / "ADAPTERS.json").read_text())
CLASSES = {"llama-fp32": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _base(name: str):
    return FIXTURES / "bases" / INDEX[name]["base"]


def _rows(name: str) -> dict[str, tuple[list[int], torch.Tensor]]:
    """module tensor -> (ids, trained rows), read by hand from the adapter files."""
    cfg = json.loads((T / name / "adapter_config.json").read_text())
    sd = load_file(str(T / name / "adapter_model.safetensors"))
    spec = cfg["trainable_token_indices"]
    out = {}
    for key, v in sd.items():
        if key.endswith("token_adapter.trainable_tokens_delta"):
            mod = key.removeprefix("base_model.model.").removesuffix(".token_adapter.trainable_tokens_delta")
            ids = spec if isinstance(spec, list) else spec[mod.rsplit(".", 1)[-1]]
            out[mod + ".weight"] = (ids, v)
    return out


def _unmerged(name: str):
    model = CLASSES[INDEX[name]["base"]].from_pretrained(_base(name), dtype=torch.float32)
    if INDEX[name]["resized_to"]:
        model.resize_token_embeddings(INDEX[name]["resized_to"], mean_resizing=False)
    return peft.PeftModel.from_pretrained(model, T / name).eval()


@pytest.mark.parametrize("name", list(INDEX))
def test_merged_model_reproduces_unmerged_peft_outputs(name, tmp_out):
    loramerge.apply(_base(name), T / name, tmp_out, dtype="float32", sync=False)
    merged = CLASSES[INDEX[name]["base"]].from_pretrained(tmp_out, dtype=torch.float32).eval()
    vocab = merged.config.vocab_size
    ids = torch.tensor([[3, 17, 5, 9, 100, 250 % vocab, 1, 2, vocab - 1, 290 % vocab]])
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, _unmerged(name)(input_ids=ids).logits
    assert rel_err(a, b) <= 1e-5


# where lm_head ends up: tied (not stored), or its own tensor with these trained rows
EXPECTED_HEAD = {"llama-tokens": "own, untouched", "llama-tokens-head": "own rows",
                 "qwen2-tokens": "tied", "qwen2-tokens-lmhead-lora": "embedding's rows + LoRA",
                 "qwen2-tokens-split": "own rows", "qwen2-tokens-resized": "embedding's rows"}


@pytest.mark.parametrize("name", list(INDEX))
def test_rows_are_the_trained_values_rounded_once(name, tmp_out):
    """Default dtype: the base's own (fp32 llama, fp16 qwen2). Trained rows: the saved values
    rounded once; every other element of an embedding/lm_head: the base's (or the saved resized
    copy's) bit for bit, or W + delta correctly rounded where a LoRA also targets lm_head."""
    loramerge.apply(_base(name), T / name, tmp_out, sync=False)
    out, base, rows = load_dir(tmp_out), load_dir(_base(name)), _rows(name)
    sd = load_file(str(T / name / "adapter_model.safetensors"))
    saved = {k.removeprefix("base_model.model.").replace(".token_adapter.base_layer", ""): v
             for k, v in sd.items() if "token_adapter.base_layer" in k}
    cfg = json.loads((_base(name) / "config.json").read_text())
    out_cfg = json.loads((tmp_out / "config.json").read_text())
    head = EXPECTED_HEAD[name]
    if head == "tied":
        assert HEAD not in out and out_cfg.get("tie_word_embeddings", True) is True
    else:
        assert HEAD in out
        assert out_cfg.get("tie_word_embeddings") is False or HEAD in base
    for tensor in (EMB, HEAD):
        if tensor not in out:
            continue
        start = saved.get(tensor, base.get(tensor, base[EMB]))  # an untied lm_head starts from the embedding
        expect = start.double().clone()
        owner = tensor if tensor in rows else (EMB if head.startswith("embedding's rows") and tensor == HEAD else None)
        if owner is not None:
            ids, values = rows[owner]
            expect[ids] = values.double()
        if tensor == HEAD and "LoRA" in head:
            expect += expected_delta64(T / name)["lm_head"]
        ref = correctly_rounded(expect, out[tensor].dtype)
        assert out[tensor].dtype == base[EMB].dtype
        assert torch.equal(out[tensor], ref), tensor
    if head == "own, untouched":
        assert torch.equal(out[HEAD], base[HEAD])
    if name == "qwen2-tokens-resized":
        assert out_cfg["vocab_size"] == 296 and cfg["vocab_size"] != 296


@pytest.mark.parametrize("name", ["llama-tokens", "llama-tokens-head", "qwen2-tokens"])
def test_matches_peft_merge_and_unload(name, tmp_out):
    """Where PEFT's merge is right (untied bases; a tied one whose lm_head shares the rows), it is
    ours: float32 within 1e-6, and the same rows (PEFT rounds them once too, to the base dtype)."""
    info = INDEX[name]
    dtype = torch.float16 if info["base"] == "qwen2" else torch.float32
    loramerge.apply(_base(name), T / name, tmp_out, sync=False)
    ours = load_dir(tmp_out)
    model = CLASSES[info["base"]].from_pretrained(_base(name), dtype=dtype)
    theirs = peft.PeftModel.from_pretrained(model, T / name).merge_and_unload().state_dict()
    assert set(ours) <= set(theirs)
    for tensor, t in ours.items():
        if tensor in (EMB, HEAD):  # the rows: the same values, however PEFT rounds the LoRA deltas
            assert torch.equal(t, theirs[tensor]), tensor
        elif dtype == torch.float32:
            assert rel_err(t, theirs[tensor]) <= 1e-6, tensor


@pytest.mark.parametrize("name", list(INDEX))
def test_verify_passes_and_catches_a_missing_row(name, tmp_path):
    out = tmp_path / "m"
    loramerge.apply(_base(name), T / name, out, sync=False)
    report = loramerge.verify(_base(name), T / name, out)
    assert report.ok, report.failures()
    assert report.model is not None and report.model.status == "ok"
    # undo one trained row: verify must name the embedding
    f = out / "model.safetensors"
    sd = load_file(str(f))
    ids, _ = _rows(name).get(EMB, (None, None))
    if ids is None:
        return
    sd[EMB][ids[0]] += 1.0  # any other value than the trained one

    save_file(sd, str(f), metadata={"format": "pt"})
    bad = loramerge.verify(_base(name), T / name, out, outputs=False)
    assert not bad.ok and any(t.name == EMB and not t.ok for t in bad.tensors)


def test_dry_run_names_the_rows(tmp_out):
    r = loramerge.apply(_base("qwen2-tokens"), T / "qwen2-tokens", tmp_out, dry_run=True)
    assert f"{EMB} [288, 64] F16: 3 token rows replaced by saved" in r.plan_text


def _copy(name, tmp_path, edit_config=None, edit_tensors=None):
    d = tmp_path / name
    shutil.copytree(T / name, d)
    if edit_config:
        cfg = json.loads((d / "adapter_config.json").read_text())
        edit_config(cfg)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        sd = load_file(str(d / "adapter_model.safetensors"))
        edit_tensors(sd)
        save_file(sd, str(d / "adapter_model.safetensors"))
    return d


def test_rows_cannot_be_weighted_nor_unmerged(tmp_path):
    with pytest.raises(PlanError, match="cannot be weighted"):
        loramerge.apply(_base("llama-tokens"), T / "llama-tokens", tmp_path / "o", weights=[0.5], dry_run=True)
    with pytest.raises(AdapterError) as e:
        loramerge.unmerge(_base("llama-tokens"), T / "llama-tokens", tmp_path / "o")
    assert "does not save the rows they overwrote" in " ".join(e.value.problems)


def test_overlapping_ids_of_two_adapters_are_refused(tmp_path):
    other = _copy("llama-tokens", tmp_path)  # ids [3, 17, 200] against llama-tokens-head's [3, 9]
    with pytest.raises(PlanError, match="several adapters train token id 3"):
        loramerge.apply(_base("llama-tokens"), [T / "llama-tokens-head", other], tmp_path / "o", dry_run=True)


def test_reader_and_plan_refusals(tmp_path):
    dup = _copy("llama-tokens", tmp_path, edit_config=lambda c: c.update(trainable_token_indices=[3, 3, 200]))
    with pytest.raises(AdapterError, match="cannot merge|do not match") as e:
        loramerge.apply(_base("llama-tokens"), dup, tmp_path / "o", dry_run=True)
    assert "repeat an id" in " ".join(e.value.problems)
    (tmp_path / "x").mkdir()
    far = _copy("qwen2-tokens", tmp_path / "x", edit_config=lambda c: c.update(trainable_token_indices=[3, 17, 400]))
    with pytest.raises(PlanError) as e:
        loramerge.apply(_base("qwen2-tokens"), far, tmp_path / "o", dry_run=True)
    assert "token id 400 is beyond the 288 rows" in " ".join(e.value.problems)


def test_a_tied_copy_that_disagrees_is_refused(tmp_path):
    def skew(sd):
        sd["base_model.model.lm_head.token_adapter.trainable_tokens_delta"] += 1.0
    bad = _copy("qwen2-tokens-resized", tmp_path, edit_tensors=skew)
    with pytest.raises(PlanError) as e:
        loramerge.apply(_base("qwen2-tokens-resized"), bad, tmp_path / "o", dry_run=True)
    assert "hold different values" in " ".join(e.value.problems)


def test_combine_and_base_less_onnx_refuse_rows(tmp_path):
    from loramerge.cli import main
    r = CliRunner().invoke(main, ["combine", str(T / "llama-tokens"), str(T / "llama-tokens-head"),
                                  str(tmp_path / "c")])
    assert r.exit_code == 1 and "trains token rows" in r.output
    from loramerge.onnx.targets import collect_targets
    from loramerge.readers.adapters import load_adapters
    with pytest.raises(PlanError) as e:
        collect_targets(load_adapters([T / "llama-tokens"]), None, None)
    assert "pass --base" in " ".join(e.value.problems)


@pytest.fixture(scope="module")
def qwen2_graph(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    import test_onnx as o
    return o.export_graph(o._load("qwen2"), "logits", "dynamo", tmp_path_factory.mktemp("g") / "qwen2.onnx")


@pytest.mark.parametrize("name", ["qwen2-tokens", "qwen2-tokens-split"])
def test_onnx_fold_matches_unmerged_peft(name, qwen2_graph, tmp_path):
    """export-onnx folds the rows into an existing graph (with --base: the plan places them). The
    tied qwen2 graph shares one table between the embedding Gather and lm_head: shared rows must
    reach both uses, split rows each its own."""
    import test_onnx as o
    from loramerge.onnx import fold

    f = o.feeds()
    ids = torch.from_numpy(f["input_ids"]).clone()
    ids[0, :4] = torch.tensor([3, 17, 5, 9])  # trained rows of every fixture
    with torch.no_grad():
        ref = o.Wrapper(_unmerged(name), "logits")(ids, torch.from_numpy(f["attention_mask"]))
    fold(qwen2_graph, tmp_path / "o.onnx", [T / name], base=_base(name))
    out = o.run(tmp_path / "o.onnx", {"input_ids": ids.numpy()})
    assert o.rel(out, ref) <= 1e-5
    assert o.rel(o.run(qwen2_graph, {"input_ids": ids.numpy()}), ref) > 1e-2
