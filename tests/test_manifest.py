"""loramerge_manifest.json (issue 14): every output of apply, unmerge and combine records its inputs,
targets and the sha256 of every file written; verify checks it and names a file whose bytes
changed. Hashes are compared against hashlib over the files as they lie on disk, computed here
independently of the hashing the writers do while writing."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import adapter_dir, base_dir

import loramerge
from loramerge.cli import main
from loramerge.writers import manifest


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def load(out: Path) -> dict:
    return json.loads(manifest.location(out).read_text())


def test_apply_directory_lists_every_file_with_its_hash(tmp_path):
    base, adapter = base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16")
    out = tmp_path / "out"
    loramerge.apply(base, adapter, out)
    m = load(out)
    on_disk = sorted(p.name for p in out.iterdir() if p.name != manifest.NAME)
    assert sorted(m["files"]) == on_disk and len(on_disk) == 10
    for name, rec in m["files"].items():
        assert rec == {"sha256": sha(out / name), "bytes": (out / name).stat().st_size}, name
    assert m["command"] == "apply" and m["tool"]["name"] == "loramerge" and m["tool"]["version"] == loramerge.__version__
    # inputs: the adapter's files whole; the base's index whole and each shard's header
    a = m["inputs"]["adapters"][0]
    assert a["path"] == str(adapter.resolve()) and a["weight"] == 1.0
    assert a["files"] == {n: {"sha256": sha(adapter / n), "bytes": (adapter / n).stat().st_size}
                          for n in ("adapter_config.json", "adapter_model.safetensors")}
    files = m["inputs"]["base"]["files"]
    assert files["model.safetensors.index.json"]["sha256"] == sha(base / "model.safetensors.index.json")
    for shard in base.glob("*.safetensors"):
        raw = shard.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        assert files[shard.name] == {"header_sha256": hashlib.sha256(raw[:8 + n]).hexdigest(),
                                     "header_bytes": 8 + n, "bytes": len(raw)}
    # per target: rank, alpha, scale, weight as the adapter config gives them
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert m["targets"] and all(t["terms"][0]["rank"] == cfg["r"] and t["terms"][0]["alpha"] == cfg["lora_alpha"]
                                and t["terms"][0]["scale"] == cfg["lora_alpha"] / cfg["r"]
                                and t["terms"][0]["weight"] == 1.0 for t in m["targets"])
    assert m["output_dtypes"] == {"BF16": 30}


def test_ranges_copied_inside_the_kernel_and_by_the_fallback_hash_the_same(tmp_path, monkeypatch):
    """Untouched tensors go file to file (copy_file_range): their bytes are hashed from the
    source; where the kernel cannot copy, the pread/write fallback hashes what it writes."""
    base, adapter = base_dir("llama-fp32"), adapter_dir("llama-patterns")  # leaves many tensors untouched
    loramerge.apply(base, adapter, tmp_path / "a")

    def no_cfr(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", no_cfr)
    loramerge.apply(base, adapter, tmp_path / "b")
    ma, mb = load(tmp_path / "a"), load(tmp_path / "b")
    assert ma["files"] == mb["files"]
    assert ma["files"]["model.safetensors"]["sha256"] == sha(tmp_path / "a" / "model.safetensors")


def test_single_file_output_has_a_sibling_manifest_replaced_with_it(tmp_path):
    out = tmp_path / "merged.safetensors"
    rep = loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), out)
    side = tmp_path / "merged.safetensors.loramerge_manifest.json"
    # the base's other files do not go with one .safetensors file: said, not dropped silently
    extras = sorted(p.name for p in base_dir("llama-fp32").iterdir() if p.suffix != ".safetensors")
    assert "config.json" in extras and sorted(rep.not_carried_over) == extras
    assert any("single .safetensors file: " + ", ".join(extras) in w for w in rep.warnings), rep.warnings
    assert sorted(os.listdir(tmp_path)) == ["merged.safetensors", side.name]
    assert load(out)["files"] == {"merged.safetensors": {"sha256": sha(out), "bytes": out.stat().st_size}}
    loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-rslora"), out, overwrite=True)
    assert load(out)["files"]["merged.safetensors"]["sha256"] == sha(out)
    assert load(out)["inputs"]["adapters"][0]["path"].endswith("llama-rslora")
    assert sorted(os.listdir(tmp_path)) == ["merged.safetensors", side.name]
    r = loramerge.verify(base_dir("llama-fp32"), [adapter_dir("llama-rslora")], out, outputs=False)
    assert r.ok and r.manifest["files"] == 1 and not r.manifest["problems"]


def test_unmerge_and_combine_write_manifests(tmp_path):
    merged, back = tmp_path / "m", tmp_path / "back"
    loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), merged)
    loramerge.unmerge(merged, adapter_dir("llama-basic"), back)
    m = load(back)
    assert m["command"] == "unmerge" and all(t["terms"][0]["weight"] == -1.0 for t in m["targets"])
    assert "loramerge_manifest.json" not in m["files"]  # the merged base's own manifest is not carried over
    assert all(rec["sha256"] == sha(back / n) for n, rec in m["files"].items())
    comb = tmp_path / "comb"
    loramerge.combine([adapter_dir("llama-basic"), adapter_dir("llama-rslora")], comb, weights=[1.0, 0.5])
    m = load(comb)
    assert m["command"] == "combine" and sorted(m["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(rec == {"sha256": sha(comb / n), "bytes": (comb / n).stat().st_size} for n, rec in m["files"].items())
    assert [a["weight"] for a in m["inputs"]["adapters"]] == [1.0, 0.5]
    assert all(len(t["terms"]) == 2 for t in m["targets"] if t["module"].endswith("q_proj"))


def test_verify_names_a_file_whose_bytes_changed_where_tensors_cannot_tell(tmp_path):
    """A change the tensor checks cannot see (the header's padding, a tokenizer file): only the
    manifest catches it, and verify names the file and exits 1."""
    base, adapter = base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16")
    out = tmp_path / "out"
    loramerge.apply(base, adapter, out)
    args = ["verify", str(base), str(adapter), str(out), "--no-outputs"]
    assert CliRunner().invoke(main, args).exit_code == 0
    shard = out / "model-00002-of-00004.safetensors"
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert raw[8:8 + n].count(b'"format":"pt"') == 1
    shard.write_bytes(raw.replace(b'"format":"pt"', b'"format":"PT"', 1))  # same tensors, other metadata
    with open(out / "tokenizer.json", "a") as f:
        f.write(" ")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert f"FAIL {shard.name}: its bytes changed after loramerge wrote it" in res.output
    assert "FAIL tokenizer.json: " in res.output and "the file changed after loramerge wrote it" in res.output
    assert "untouched: 9 tensor(s), all as in the base" in res.output  # the tensors themselves are fine
    (out / "README.md").write_text("notes")
    (out / "config.json").unlink()
    res = CliRunner().invoke(main, args)
    assert "FAIL config.json: missing (the manifest lists it)" in res.output
    assert "note: not listed in loramerge_manifest.json (added later?): README.md" in res.output


def test_verify_notes_an_adapter_that_changed_since_the_merge(tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir("llama-basic"), adapter)
    out = tmp_path / "out"
    loramerge.apply(base_dir("llama-fp32"), adapter, out)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg, indent=4))  # same settings, other bytes
    r = loramerge.verify(base_dir("llama-fp32"), [adapter], out, outputs=False)
    assert r.ok and any("adapter_config.json: differs from the adapter file this output was made from" in n
                        for n in r.manifest["notes"])


@pytest.mark.parametrize("content", ["{", '{"files": 3}', '{"files": {"../x": {}}}'])
def test_a_damaged_manifest_is_a_failure_not_a_traceback(content, tmp_path):
    out = tmp_path / "out"
    loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), out)
    (out / manifest.NAME).write_text(content)
    r = loramerge.verify(base_dir("llama-fp32"), [adapter_dir("llama-basic")], out, outputs=False)
    assert not r.ok and r.manifest["problems"] and all(t.ok for t in r.tensors)


def test_edited_options_in_a_manifest_are_a_note_not_a_traceback(tmp_path):
    out = tmp_path / "out"
    loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), out)
    m = load(out)
    # the weights note reads each adapter's own record (its "weight"), the qlora note the options
    m["inputs"]["adapters"][0]["weight"] = "x"
    m["inputs"]["adapters"].append({"path": 3, "files": [1]})
    m["options"]["qlora"] = ["x"]
    (out / manifest.NAME).write_text(json.dumps(m))
    r = loramerge.verify(base_dir("llama-fp32"), [adapter_dir("llama-basic")], out, outputs=False, weights=[0.5])
    assert any(n.startswith("this output was made with --qlora ['x'] (loramerge_manifest.json)")
               for n in r.manifest["notes"]), r.manifest["notes"]
    assert "this output was also made from 3 (loramerge_manifest.json), not given here" in r.manifest["notes"]
    m["inputs"]["adapters"].pop()
    (out / manifest.NAME).write_text(json.dumps(m))
    r = loramerge.verify(base_dir("llama-fp32"), [adapter_dir("llama-basic")], out, outputs=False, weights=[0.5])
    assert f"{manifest.NAME}: its recorded weights are unreadable" in r.manifest["notes"]


def test_verify_notes_adapters_and_weights_against_the_merges_own(tmp_path):
    """The notes name what the merge recorded: its weights (not ones made up per adapter given), an
    adapter it did not use, one it used that is not given; a moved copy is the same adapter."""
    import shutil

    base, basic, rs = base_dir("llama-fp32"), adapter_dir("llama-basic"), adapter_dir("llama-rslora")
    out = tmp_path / "out"
    loramerge.apply(base, basic, out)
    r = loramerge.verify(base, [basic, rs], out, outputs=False, weights=[1.0, 0.0])
    notes = r.manifest["notes"]
    assert not any("--weights" in n for n in notes), notes  # the old note: "made with --weights 1,1"
    assert any(n.startswith(f"{rs}: not an adapter this output was made from (loramerge_manifest.json lists "
                            f"{basic.resolve()})") for n in notes), notes
    r = loramerge.verify(base, [basic], out, outputs=False, weights=[0.5])
    assert not r.ok and r.manifest["notes"] == [
        "this output was made with --weights 1 (loramerge_manifest.json), checked here with 0.5: pass the "
        "merge's weights"]
    moved = tmp_path / "moved"
    shutil.copytree(basic, moved)
    r = loramerge.verify(base, [moved], out, outputs=False)
    assert r.ok and r.manifest["notes"] == []
    two = tmp_path / "two"
    loramerge.apply(base, [basic, rs], two, weights=[0.7, -1.3])
    r = loramerge.verify(base, [rs], two, outputs=False)
    assert r.manifest["notes"] == [f"this output was also made from {basic.resolve()} (loramerge_manifest.json), "
                                   "not given here"]
    r = loramerge.verify(base, [basic, rs], two, outputs=False, weights=[0.7, -1.3])
    assert r.ok and r.manifest["notes"] == []
    r = loramerge.verify(base, [rs, basic], two, outputs=False, weights=[-1.3, 0.7])  # the order given
    assert r.ok and r.manifest["notes"] == []
    # the weights file of a PEFT directory, given to apply and to verify alike: the directory
    single = tmp_path / "single"
    loramerge.apply(base, basic / "adapter_model.safetensors", single)
    r = loramerge.verify(base, [basic / "adapter_model.safetensors"], single, outputs=False)
    assert r.ok and r.manifest["notes"] == []
    # an edited record (a digest that is a list) is a note, not an internal error
    m = load(out)
    m["inputs"]["adapters"][0]["files"]["adapter_config.json"]["sha256"] = ["x"]
    (out / manifest.NAME).write_text(json.dumps(m))
    r = loramerge.verify(base, [moved], out, outputs=False)
    assert r.manifest["notes"] == [f"{moved}: not an adapter this output was made from (loramerge_manifest.json "
                                   f"lists {basic.resolve()})", f"this output was also made from {basic.resolve()} "
                                   "(loramerge_manifest.json), not given here"]
