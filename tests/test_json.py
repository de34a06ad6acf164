"""--json on every command: stdout is exactly one JSON object with the documented keys, human
text goes to stderr, and errors are still `Error:` lines (plus a JSON error object) with the same
exit codes. Values are checked against the fixtures' configs, not just their presence."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from conftest import adapter_dir, base_dir
from loramerge.cli import main
from loramerge.report import jsonable

APPLY_KEYS = {"command", "ok", "out", "dry_run", "device", "tensors_merged", "tensors_copied", "tensors_cast",
              "bytes_written", "seconds", "exact_fixups", "files", "carried_over", "not_carried_over", "warnings",
              "stage_seconds", "verification", "plan", "gbps"}
PLAN_KEYS = {"base", "adapters", "targets", "copied", "cast", "files", "indexed", "carried_over", "not_carried_over",
             "config_updates", "bytes", "warnings"}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def parse(r) -> dict:
    data = json.loads(r.stdout)  # raises if anything else reached stdout
    assert isinstance(data, dict)
    return data


def test_apply_json(tmp_path):
    out = tmp_path / "m"
    r = run("apply", base_dir("llama-fp32"), adapter_dir("llama-basic"), out, "--json")
    assert r.exit_code == 0, r.output
    d = parse(r)
    assert set(d) >= APPLY_KEYS and d["command"] == "apply" and d["ok"] is True
    assert d["out"] == str(out) and d["dry_run"] is False and d["verification"] is None
    assert (d["tensors_merged"], d["tensors_copied"], d["tensors_cast"]) == (21, 9, 0)
    assert d["files"] == ["model.safetensors"]
    from safetensors.torch import load_file
    tensors = load_file(str(out / "model.safetensors"))
    assert d["bytes_written"] == d["plan"]["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert "config.json" in d["carried_over"]
    assert set(d["plan"]) >= PLAN_KEYS and len(d["plan"]["targets"]) == 21
    cfg = json.loads((adapter_dir("llama-basic") / "adapter_config.json").read_text())
    for t in d["plan"]["targets"]:
        (term,) = t["terms"]
        assert term["kind"] == "lora" and term["rank"] == cfg["r"] and term["alpha"] == cfg["lora_alpha"]
        assert term["scale"] == cfg["lora_alpha"] / cfg["r"] and term["weight"] == 1.0
        assert t["tensor"] == term["module"] + ".weight" and t["dtype"] == t["source_dtype"] == "F32"
    assert "merged 21 tensors" in r.stderr  # the human summary still shows, on stderr


def test_dry_run_and_verify_json(tmp_path):
    r = run("apply", base_dir("llama-fp32"), adapter_dir("llama-patterns"), tmp_path / "m", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    d = parse(r)
    assert d["dry_run"] is True and d["tensors_merged"] == 0 and not (tmp_path / "m").exists()
    ranks = {t["tensor"]: t["terms"][0]["rank"] for t in d["plan"]["targets"]}
    assert ranks["model.layers.0.self_attn.q_proj.weight"] == 4  # rank_pattern {q_proj: 4}
    assert ranks["model.layers.1.mlp.down_proj.weight"] == 2
    assert d["plan"]["targets"][0]["terms"][0]["alpha"] in (16.0, 32.0)
    r = run("apply", base_dir("llama-fp32"), adapter_dir("llama-basic"), tmp_path / "v", "--verify", "--json")
    assert r.exit_code == 0, r.output
    d = parse(r)
    assert d["ok"] is True and d["verification"]["ok"] is True
    assert len([t for t in d["verification"]["tensors"] if t["kind"] == "merge"]) == 21


def test_unmerge_and_combine_json(tmp_path):
    assert run("apply", base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16"), tmp_path / "m").exit_code == 0
    r = run("unmerge", tmp_path / "m", adapter_dir("llama-bf16"), tmp_path / "u", "--json")
    assert r.exit_code == 0, r.output
    d = parse(r)
    assert d["command"] == "unmerge" and d["tensors_merged"] == 21 and len(d["files"]) == 4
    assert any(line.startswith("bfloat16 (21 tensors): NOT exactly recoverable") for line in d["recovery"])
    assert all(term["weight"] == -1.0 for t in d["plan"]["targets"] for term in t["terms"])

    r = run("combine", adapter_dir("llama-basic"), adapter_dir("llama-patterns"), tmp_path / "c",
            "--weights", "1,-0.5", "--json")
    assert r.exit_code == 0, r.output
    d = parse(r)
    assert d["command"] == "combine" and d["method"] == "cat" and d["weights"] == [1.0, -0.5]
    assert d["targets"] == 21 and d["ranks"]["model.layers.0.self_attn.q_proj"] == 8 + 4
    assert d["ranks"]["model.layers.0.mlp.gate_proj"] == 8  # only llama-basic targets it
    assert d["bytes_written"] > 0 and d["adapters"] == [str(adapter_dir("llama-basic")),
                                                        str(adapter_dir("llama-patterns"))]


def test_errors_with_json(tmp_path):
    r = run("apply", base_dir("llama-fp32"), adapter_dir("llama-basic"), tmp_path / "m", "--weights", "1,2", "--json")
    assert r.exit_code == 2
    d = parse(r)
    assert d == {"command": "apply", "ok": False, "error": {
        "type": "UsageError", "message": "--weights has 2 value(s) for 1 adapter(s); give one per adapter",
        "problems": [], "exit_code": 2}}
    assert r.stderr.startswith("Error: --weights has 2 value(s)")
    # several problems at once: listed in `problems`, and on stderr as before
    r = run("apply", base_dir("bert"), adapter_dir("llama-basic"), tmp_path / "m", "--json")
    assert r.exit_code == 1
    d = parse(r)
    assert d["error"]["type"] == "PlanError" and len(d["error"]["problems"]) == 21
    assert d["error"]["message"].startswith("21 problem(s) matching the adapter(s) to the base")
    assert r.stderr.startswith("Error: 21 problem(s)") and not (tmp_path / "m").exists()


def test_without_json_stdout_is_the_summary(tmp_path):
    r = run("apply", base_dir("llama-fp32"), adapter_dir("llama-basic"), tmp_path / "m")
    assert r.exit_code == 0 and r.stdout.startswith("merged 21 tensors") and r.stderr == ""


def test_jsonable_conventions(tmp_path):
    from dataclasses import dataclass

    import torch

    @dataclass
    class Inner:
        x: tuple

    assert jsonable({"p": tmp_path, "f": math.inf, "n": math.nan, "t": (1, 2), "s": {"b", "a"}, "d": torch.float16,
                     "i": Inner((3,)), 4: torch.tensor(2.5)}) == {
        "p": str(tmp_path), "f": None, "n": None, "t": [1, 2], "s": ["a", "b"], "d": "torch.float16",
        "i": {"x": [3]}, "4": 2.5}


@pytest.mark.parametrize("command", ["apply", "verify", "unmerge", "combine", "export-onnx", "inspect"])
def test_every_command_has_json(command):
    if command not in main.commands:
        pytest.skip(f"{command} not registered")
    r = run(command, "--help")
    assert "--json" in r.stdout and "--revision" in r.stdout


@pytest.mark.parametrize("args, command, message", [
    (["apply", "--json"], "apply", "Missing argument 'BASE'."),
    (["verify", "--json", "--bogus"], "verify", "No such option '--bogus'"),
    (["apply", "b", "a", "o", "--dtype", "float8", "--json"], "apply", "Invalid value for '--dtype'"),
    (["nosuch", "--json"], None, "No such command 'nosuch'."),
])
def test_command_lines_click_cannot_parse_are_json_errors_too(args, command, message):
    """Click reports these before the command runs; with --json stdout still parses."""
    r = run(*args)
    assert r.exit_code == 2
    d = parse(r)
    assert d["command"] == command and d["ok"] is False
    assert d["error"]["type"] == "UsageError" and d["error"]["exit_code"] == 2
    assert d["error"]["message"].startswith(message)
    assert f"Error: {d['error']['message']}" in r.stderr
    assert run(*[a for a in args if a != "--json"]).stdout == ""  # without --json: stderr only, as before
