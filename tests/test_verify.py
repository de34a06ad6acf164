"""`loramerge verify`: it passes correct merges (ours for every layout, PEFT's in half precision
too) and catches wrong ones (unmerged, merged twice, sparse damage, wrong scale, missing, extra,
touched-but-untouchable tensors), naming the tensor and the numbers; delta fidelity, layer and
model outputs, JSON and the CLI."""

from __future__ import annotations

import json
import shutil
import importlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loramerge
from conftest import MANIFEST, adapter_dir, base_dir, rel_err, requires_cuda
from loramerge.cli import main

PAIRS = [(p["base"], p["adapter"]) for p in MANIFEST["pairs"]]
T = "model.layers.1.self_attn.q_proj.weight"  # the tensor the corruption tests damage
CASES = {"fp32": ("llama-fp32", "llama-basic"), "bf16": ("llama-bf16-sharded", "llama-bf16")}
VERIFY_MODULE = importlib.import_module("loramerge.verifier")


def reader_opts(adapter: str) -> dict:
    info = MANIFEST["adapters"][adapter]
    if info["format"] == "loralib":  # loralib stores neither alpha nor which q/k/v groups it covers
        return {"lora_alpha": info["lora_alpha"], "enable_lora": (True, False, True)}
    return {}


def check(base: str, adapter: str, merged: Path, **kw) -> loramerge.VerifyReport:
    kw.setdefault("outputs", False)
    return loramerge.verify(base_dir(base), adapter_dir(adapter), merged, **kw, **reader_opts(adapter))


@pytest.fixture(scope="module")
def merges(tmp_path_factory):
    """merges(base, adapter, dtype) -> a loramerge merge, made once per module."""
    root = tmp_path_factory.mktemp("merges")
    made: dict[tuple, Path] = {}

    def get(base: str, adapter: str, dtype: str = "auto") -> Path:
        if (base, adapter, dtype) not in made:
            out = root / f"{base}+{adapter}+{dtype}"
            loramerge.apply(base_dir(base), adapter_dir(adapter), out, dtype=dtype, sync=False, **reader_opts(adapter))
            made[base, adapter, dtype] = out
        return made[base, adapter, dtype]

    return get


def edited_copy(src: Path, dst: Path, edit, manifest: bool = True) -> Path:
    """Copy a merged directory and let edit(state_dict) change the shard(s) it wants (returning
    True); the index follows, so the result is a consistent checkpoint with the damage in it.
    manifest=False: without loramerge's manifest (a checkpoint another tool wrote)."""
    shutil.copytree(src, dst)
    if not manifest:
        (dst / "loramerge_manifest.json").unlink()
    index = dst / "model.safetensors.index.json"
    for f in sorted(dst.glob("*.safetensors")):
        sd = load_file(f)
        if edit(sd):
            save_file(sd, f, metadata={"format": "pt"})
            if index.exists():
                data = json.loads(index.read_text())
                data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != f.name}
                data["weight_map"].update({k: f.name for k in sd})
                index.write_text(json.dumps(data))
    return dst


# -- correct merges pass ------------------------------------------------------------------------

@pytest.mark.parametrize("base,adapter", PAIRS, ids=[f"{b}+{a}" for b, a in PAIRS])
def test_every_layout_passes_its_merge_and_fails_the_unmerged_base(base, adapter, merges):
    r = check(base, adapter, merges(base, adapter))
    assert r.ok, r.table()
    assert r.targets
    for t in r.targets:
        if t.dtype in ("BF16", "F16"):
            assert t.max_ulps == 0, f"{t.name}: loramerge rounds correctly, found {t.max_ulps} ulp"
        else:
            assert t.max_rel <= 1e-6, t.name
    # The base itself as MERGED: every target fails, by name (tied/virtual ones as missing).
    r = check(base, adapter, base_dir(base))
    assert not r.ok
    failures = "\n".join(r.failures())
    for t in r.targets:
        assert f"FAIL {t.name}: " in failures
    missing = [t.name for t in r.tensors if t.kind == "missing"]
    assert all(f"FAIL {n}: missing from MERGED" in failures for n in missing)


@pytest.mark.parametrize("base,adapter", [("llama-bf16-sharded", "llama-bf16"), ("qwen2", "qwen2-bias")])
@pytest.mark.parametrize("autocast", [True, False], ids=["fp32-factors", "half-factors"])
def test_peft_merges_pass_in_half_precision(base, adapter, autocast, tmp_path):
    """PEFT rounds more than once; with the adapter in half precision (autocast_adapter_dtype=False)
    it also rounds the factors and the delta. Both are correct merges and must pass."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    dtype = getattr(torch, MANIFEST["bases"][base]["dtype"])
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir(base), dtype=dtype)
    pm = peft.PeftModel.from_pretrained(model, adapter_dir(adapter), autocast_adapter_dtype=autocast)
    pm.merge_and_unload().save_pretrained(tmp_path / "peft")
    r = check(base, adapter, tmp_path / "peft", outputs=not autocast)
    assert r.ok, r.table()
    worst = max(t.max_ulps for t in r.targets)
    assert worst <= 2.0
    if not autocast:
        assert worst > 0  # the tolerance is needed: PEFT's result is not the correctly rounded one
        assert r.model.status == "ok" and r.model.rel_err["logits"] < r.model.tolerance["logits"]


# -- wrong merges fail, naming the tensor -------------------------------------------------------

def _unmerged(base_sd):
    def edit(sd):
        if T in sd:
            sd[T] = base_sd[T].clone()
            return True
    return edit


def _doubled(base_sd):
    def edit(sd):  # the change to T twice as large: a wrong scale (alpha/r vs alpha/sqrt(r), ...)
        if T in sd:
            sd[T] = (2 * sd[T].double() - base_sd[T].double()).to(sd[T].dtype)
            return True
    return edit


def _sparse(base_sd):
    def edit(sd):  # 8 elements 10% off: a corrupted shard or a buggy kernel, not a mismerge
        if T in sd:
            t = sd[T].clone()
            idx = torch.arange(8) * 331
            t.view(-1)[idx] = (t.view(-1)[idx].double() * 1.1).to(t.dtype)
            sd[T] = t
            return True
    return edit


def _missing(base_sd):
    def edit(sd):
        return sd.pop(T, None) is not None
    return edit


EXTRA = "model.layers.1.self_attn.q_proj.lora_A.weight"


def _extra(base_sd):
    def edit(sd):
        if T in sd:
            sd[EXTRA] = torch.zeros(8, 64, dtype=sd[T].dtype)
            return True
    return edit


UNTOUCHED = "model.layers.1.input_layernorm.weight"


def _untouched(base_sd):
    def edit(sd):
        if UNTOUCHED in sd:
            t = sd[UNTOUCHED].clone()
            t[5] = torch.nextafter(t[5], torch.tensor(float("inf"), dtype=t.dtype))  # one ulp
            sd[UNTOUCHED] = t
            return True
    return edit


CORRUPTIONS = {
    "unmerged": (_unmerged, T, "it was not merged"),
    "wrong-scale": (_doubled, T, "the applied change is 2x the adapter's"),
    "sparse": (_sparse, T, "8 of 4096 elements off by more than"),
    "missing": (_missing, T, "missing from MERGED"),
    "extra": (_extra, EXTRA, "but a merge of these inputs does not write it"),
    "untouched": (_untouched, UNTOUCHED, "must equal the base bit for bit, but 1 of 64 elements differ"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupted_tensor_fails_and_is_named(case, corruption, merges, tmp_path):
    base, adapter = CASES[case]
    make, name, says = CORRUPTIONS[corruption]
    base_sd = {k: v for f in sorted(base_dir(base).glob("*.safetensors")) for k, v in load_file(f).items()}
    bad = edited_copy(merges(base, adapter), tmp_path / "bad", make(base_sd))
    r = check(base, adapter, bad)
    assert not r.ok
    # the edited shard no longer has the bytes its manifest recorded: named on its own line
    changed = r.manifest["problems"]
    assert changed and all(p.split(":")[0].endswith((".safetensors", ".index.json")) and "changed" in p
                           for p in changed), changed
    lines = [line for line in r.failures() if line.removeprefix("FAIL ") not in changed]
    assert lines and all(line.startswith(f"FAIL {name}: ") for line in lines), lines
    assert says in lines[0], lines[0]
    assert f"FAIL {name}: " in r.table()


@pytest.mark.parametrize("case", CASES)
def test_merged_twice_fails_everywhere_with_the_factor(case, merges, tmp_path):
    base, adapter = CASES[case]
    twice = tmp_path / "twice"
    loramerge.apply(merges(base, adapter), adapter_dir(adapter), twice, sync=False)  # merge into the merge
    r = check(base, adapter, twice)
    assert not r.ok
    failing = {line.split(":")[0].removeprefix("FAIL ") for line in r.failures()}
    assert failing == {t.name for t in r.targets}
    for t in r.targets:
        assert 1.9 < t.delta_ratio < 2.1, (t.name, t.delta_ratio)
    assert any("the applied change is 2x the adapter's" in line for line in r.failures())


def test_tolerance_boundary_in_bf16(merges, tmp_path):
    """One ulp off (what double rounding does) passes; eight ulps off at the tensor's largest
    element fails, and the report gives that element's index and values."""
    base, adapter = CASES["bf16"]
    merged = merges(base, adapter)
    m = next(load_file(f)[T] for f in merged.glob("*.safetensors") if T in load_file(f))
    i = int(m.abs().argmax())
    row, col = divmod(i, m.shape[1])

    def nudge(steps):
        def edit(sd):
            if T in sd:
                t = sd[T].clone()
                v = t.view(-1)[i:i + 1]
                for _ in range(steps):
                    v = torch.nextafter(v, torch.full_like(v, float("inf")))
                t.view(-1)[i] = v[0]
                sd[T] = t
                return True
        return edit

    # as another tool (PEFT) would have written them: no loramerge manifest
    r = check(base, adapter, edited_copy(merged, tmp_path / "one", nudge(1), manifest=False))
    assert r.ok, r.table()
    assert 0 < next(t for t in r.tensors if t.name == T).max_ulps <= 2
    r = check(base, adapter, edited_copy(merged, tmp_path / "eight", nudge(8), manifest=False))
    assert not r.ok
    t = next(t for t in r.tensors if t.name == T)
    assert t.bad_elements == 1 and t.worst["index"] == [row, col]
    assert "1 of 4096 elements off by more than 2 ulp of BF16" in r.failures()[0]
    assert f"worst at [{row}, {col}]" in r.failures()[0]


# -- delta fidelity -----------------------------------------------------------------------------

def test_tiny_delta_in_bf16_is_reported_lost_with_the_fix(merges, tmp_path):
    """bf16 keeps 8 bits: a delta 1000x smaller than the fixture's mostly rounds away. The merge is
    correct (no failure) but the user is told how much was lost and what to do."""
    tiny = tmp_path / "tiny"
    shutil.copytree(adapter_dir("llama-bf16"), tiny)
    sd = load_file(tiny / "adapter_model.safetensors")
    save_file({k: v * 1e-3 if "lora_B" in k else v for k, v in sd.items()}, tiny / "adapter_model.safetensors")
    base = base_dir("llama-bf16-sharded")
    loramerge.apply(base, tiny, tmp_path / "bf16", sync=False)
    r = loramerge.verify(base, tiny, tmp_path / "bf16", outputs=False)
    assert r.ok, r.table()
    fid = r.fidelity()
    assert fid["worst"] > 0.5 and fid["median"] > 0.5
    assert len(r.warnings) == 1
    assert "kept only" in r.warnings[0] and "--dtype float32" in r.warnings[0] and "--dtype float16" in r.warnings[0]
    assert "warning: " in r.table() and "delta fidelity" in r.table()
    # the same adapter merged into float32 keeps (nearly) all of it
    loramerge.apply(base, tiny, tmp_path / "fp32", dtype="float32", sync=False)
    r = loramerge.verify(base, tiny, tmp_path / "fp32", outputs=False)
    assert r.ok and r.fidelity()["worst"] < 0.01 and not r.warnings


# -- layer and model outputs --------------------------------------------------------------------

@pytest.mark.parametrize("base,adapter", [("llama-fp32", "llama-basic"), ("gpt2", "gpt2-dora"),
                                          ("llama-fp32", "llama-resized"), ("qwen2", "qwen2-lmhead"),
                                          ("bert", "bert")])
def test_outputs_pass_for_correct_merges(base, adapter, merges):
    """Conv1D + DoRA, replaced tensors with a resized vocabulary, an untied lm_head, a bare encoder."""
    pytest.importorskip("transformers")
    r = check(base, adapter, merges(base, adapter), outputs=True)
    assert r.ok, r.table()
    assert r.model.status == "ok", r.model
    for key, err in r.model.rel_err.items():
        assert err < r.model.tolerance[key]
        if r.model.adapter_effect[key]:  # the check has power: the adapter moves this output a lot more
            assert r.model.adapter_effect[key] > 20 * err, key
    assert any(t.layer_rel is not None for t in r.targets)


@pytest.mark.parametrize("adapter", ["llama-basic", "llama-dora", "llama-embed"])
def test_hooks_reproduce_peft_unmerged_model(adapter):
    """The model check's reference (our hooks on the base) is PEFT's unmerged model."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from loramerge.plan import build_plan
    from loramerge.readers.adapters import load_adapters
    from loramerge.readers.checkpoint import open_checkpoint
    from loramerge.verifier.model import apply_unmerged

    base = base_dir("llama-fp32")
    adapters = load_adapters([adapter_dir(adapter)])
    jobs = build_plan(open_checkpoint(base), adapters).jobs
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ours = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = ours(input_ids=ids).logits
        assert apply_unmerged(ours, jobs, adapters) is None
        hooked = ours(input_ids=ids).logits
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(model, adapter_dir(adapter)).eval()(input_ids=ids).logits
    assert rel_err(hooked, theirs) < 1e-5
    assert rel_err(plain, theirs) > 1e-3


def test_model_check_catches_what_weights_cannot(merges, tmp_path):
    """Right tensors, wrong config.json: only running the model shows it."""
    pytest.importorskip("transformers")
    bad = tmp_path / "bad"
    shutil.copytree(merges("llama-fp32", "llama-basic"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (bad / "config.json").write_text(json.dumps(cfg))
    r = check("llama-fp32", "llama-basic", bad, outputs=True)
    # the manifest names the edited file...
    assert r.failures()[1].startswith("FAIL config.json: ") and "the file changed after loramerge wrote it" \
        in r.failures()[1]
    # ...and without one (a checkpoint from elsewhere), the model's outputs still show it
    (bad / "loramerge_manifest.json").unlink()
    r = check("llama-fp32", "llama-basic", bad, outputs=True)
    assert all(t.ok for t in r.tensors) and r.manifest is None
    assert not r.ok and r.model.status == "FAIL"
    assert r.model.rel_err["logits"] > r.model.tolerance["logits"] == 1e-4
    assert r.failures() == [f"FAIL model outputs: {r.model.reason}"] and "logits rel err" in r.model.reason


def test_model_check_in_bf16_fails_without_the_adapter():
    """Half precision: the merged model must be closer to the unmerged adapter than to the base."""
    pytest.importorskip("transformers")
    base, adapter = CASES["bf16"]
    r = check(base, adapter, base_dir(base), outputs=True)
    m = r.model
    assert m.status == "FAIL" and m.rel_err["logits"] == pytest.approx(m.adapter_effect["logits"])
    assert m.tolerance["logits"] == max(8 * 2.0 ** -8, m.adapter_effect["logits"] / 2)
    assert f"FAIL model outputs: logits rel err {m.rel_err['logits']:.3g} > " in r.table()


def test_model_check_is_skipped_with_the_reason(merges):
    r = check("convnet", "convnet-lora", merges("convnet", "convnet-lora"), outputs=True)
    assert r.ok and r.model.status == "skipped"
    assert "not a model directory with config.json" in r.table()
    r = check("convnet", "convnet-lora", merges("convnet", "convnet-lora"), outputs=False)
    assert r.model is None and all(t.layer_rel is None for t in r.targets)
    assert "not checked (--no-outputs)" in r.table()


# -- machine-readable report and the command line ------------------------------------------------

def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_json_report(merges):
    base, adapter = CASES["bf16"]
    data = json.loads(json.dumps(check(base, adapter, merges(base, adapter), outputs=True).to_json()))
    assert data["ok"] is True and data["failures"] == []
    assert data["tolerance"] == {"half_ulps": 2.0, "float_rel": 1e-6, "fp8_ulps": 0.5 + 1e-6, "fp8_scale_rel": 2.0 ** -23,
                                 "fidelity_warn": 0.1}
    by_name = {t["name"]: t for t in data["tensors"]}
    assert by_name[T]["kind"] == "merge" and by_name[T]["dtype"] == "BF16" and by_name[T]["shape"] == [64, 64]
    assert by_name[T]["max_ulps"] == 0 and by_name[T]["ok"] is True and 0 < by_name[T]["delta_loss"] < 0.1
    assert by_name["model.norm.weight"]["kind"] == "copy"
    assert sum(t["kind"] == "merge" for t in data["tensors"]) == 21
    assert set(data["fidelity"]) == {"worst", "worst_tensor", "median", "targets"}
    assert data["model"]["status"] == "ok" and set(data["model"]["rel_err"]) == {"logits"}


def test_cli_verify_exit_codes_and_output(merges, tmp_path):
    base, adapter = CASES["fp32"]
    good = merges(base, adapter)
    r = run("verify", base_dir(base), adapter_dir(adapter), good, "--no-outputs")
    assert r.exit_code == 0, r.output
    assert "result: OK (21 target(s), 9 untouched, 0 failure(s)" in r.output
    assert T in r.output  # every target gets a table row

    base_sd = load_file(base_dir(base) / "model.safetensors")
    bad = edited_copy(good, tmp_path / "bad", _sparse(base_sd))
    r = run("verify", base_dir(base), adapter_dir(adapter), bad, "--no-outputs")
    assert r.exit_code == 1
    assert f"FAIL {T}: 8 of 4096 elements" in r.output and "result: FAILED" in r.output
    r = run("verify", base_dir(base), adapter_dir(adapter), bad, "--no-outputs", "--json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)  # only the JSON object on stdout; the table goes to stderr
    assert "result: FAILED" in r.stderr and data["command"] == "verify"
    assert data["ok"] is False and len(data["failures"]) == 2 and data["failures"][0].startswith(f"FAIL {T}: ")
    assert data["failures"][1].startswith("FAIL model.safetensors: its bytes changed after loramerge wrote it")
    assert data["manifest"]["files"] == 6 and len(data["manifest"]["problems"]) == 1

    r = run("verify", base_dir(base), adapter_dir(adapter), good, "--weights", "1,2")
    assert r.exit_code == 2 and r.output.startswith("Error: --weights has 2 value(s) for 1 adapter(s)")
    r = run("verify", base_dir(base), adapter_dir(adapter), tmp_path / "nope")
    assert r.exit_code == 1 and r.output.startswith(f"Error: {tmp_path / 'nope'}: merged checkpoint not found")


def test_apply_verify(tmp_path, monkeypatch):
    base, adapter = CASES["fp32"]
    r = run("apply", base_dir(base), adapter_dir(adapter), tmp_path / "out", "--verify", "--quiet")
    assert r.exit_code == 0, r.output
    assert "merged 21 tensors" in r.output and "result: OK" in r.output
    # a failed verification fails the command (the merge itself stays: it completed)
    failing = loramerge.VerifyReport(base=base_dir(base), adapters=[adapter_dir(adapter)], merged=tmp_path / "o2",
                                     device="cpu")
    failing.tensors.append(VERIFY_MODULE.TensorCheck(T, "merge", problems=["made up"]))
    monkeypatch.setattr(VERIFY_MODULE, "verify", lambda *a, **k: failing)
    r = run("apply", base_dir(base), adapter_dir(adapter), tmp_path / "o2", "--verify", "--quiet")
    assert r.exit_code == 1 and f"FAIL {T}: made up" in r.output


@requires_cuda
def test_cuda_gives_the_cpu_numbers(merges):
    base, adapter = CASES["bf16"]
    cpu = check(base, adapter, merges(base, adapter), device="cpu", outputs=True)
    gpu = check(base, adapter, merges(base, adapter), device="cuda", outputs=True)
    assert gpu.ok and gpu.device.startswith("cuda")
    for a, b in zip(cpu.tensors, gpu.tensors):
        assert (a.name, a.max_ulps, a.bad_elements) == (b.name, b.max_ulps, b.bad_elements)
        assert a.delta_loss == pytest.approx(b.delta_loss, rel=1e-9, abs=1e-12)
