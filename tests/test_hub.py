"""Hugging Face Hub ids (loramerge/readers/hub.py), against a real huggingface_hub cache layout
built in a temp dir (models--OWNER--NAME/{blobs, snapshots/COMMIT, refs/REV}, snapshot files
symlinked to content-addressed blobs, as huggingface_hub lays them out).

Nothing here can reach the network: every test runs with HF_HUB_OFFLINE=1 or with the Hub
endpoint pointed at a closed local port (a test that tried to download would fail at once, not
hang). The download path itself is exercised with huggingface_hub's three calls replaced by
fakes that serve a local "remote" folder and record what was asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import adapter_dir, base_dir
from loramerge.cli import main
from loramerge.errors import HubError
from loramerge.readers import hub

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402

BOGUS_ENDPOINT = "http://127.0.0.1:9"  # discard port, closed: a connection is refused at once
pytestmark = pytest.mark.timeout(120)


def cache_repo(cache: Path, repo: str, files: dict[str, Path], refs=("main",), commit: str | None = None) -> str:
    """Lay `files` (path in repo -> local source) out as huggingface_hub's cache does; point each
    ref in `refs` at the snapshot. Returns the commit hash."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    if commit is None:
        digest = hashlib.sha1()
        for rel in sorted(files):
            digest.update(rel.encode() + files[rel].read_bytes())
        commit = digest.hexdigest()
    for rel, src in files.items():
        data = src.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = storage / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)  # huggingface_hub writes no newline
    return commit


def tree(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _offline_env(tmp_path: Path, offline: bool = True) -> dict[str, str]:
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
            "HF_HUB_OFFLINE": "1" if offline else "0", "HF_ENDPOINT": BOGUS_ENDPOINT,
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty cache under tmp_path, offline, for this process (env and huggingface_hub's
    constants, which it read at import)."""
    env = _offline_env(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", BOGUS_ENDPOINT)
    cache = Path(env["HF_HUB_CACHE"])
    cache.mkdir(parents=True)
    return cache


def run(*args, cwd: Path | None = None):
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)


def same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    assert all(ta[k].equal(tb[k]) for k in ta)


# -- spelling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, repo, rev, sub", [
    ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B", None, ""),
    ("me/adapter@v2", "me/adapter", "v2", ""),
    ("me/loras/style.safetensors", "me/loras", None, "style.safetensors"),
    ("me/loras@0123abc/ckpt-500", "me/loras", "0123abc", "ckpt-500"),
    ("hf://gpt2", "gpt2", None, ""),
    ("hf://me/adapter@main/sub/", "me/adapter", "main", "sub"),
])
def test_hub_ids_are_parsed(spec, repo, rev, sub):
    ref = hub.parse(spec)
    assert (ref.repo, ref.revision, ref.sub) == (repo, rev, sub)


@pytest.mark.parametrize("spec", ["model", "./me/adapter", "/abs/me/adapter", "me/../adapter", "a--b/c",
                                  "me/adapter.git", "me/a b", "~/models/x", "me/adapter/../../etc"])
def test_paths_that_are_not_hub_ids(spec):
    assert hub.parse(spec) is None
    assert hub.resolve(spec, "base") == Path(spec)  # handed on as a path: the readers say "not found"


# -- which files a merge needs ---------------------------------------------------------------

LLAMA_31 = [".gitattributes", "LICENSE", "README.md", "config.json", "generation_config.json",
            "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
            "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors", "model.safetensors.index.json",
            "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
            "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def test_base_files_sharded_safetensors_never_bin_or_subfolders():
    want, index = hub.select_files(LLAMA_31 + ["pytorch_model.bin", "pytorch_model.bin.index.json"], "base")
    assert index == "model.safetensors.index.json"
    assert set(want) == {"LICENSE", "README.md", "config.json", "generation_config.json", "special_tokens_map.json",
                         "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"}
    # the shards come from the index (not from a glob), so a stray consolidated.safetensors is not fetched
    want, index = hub.select_files(["config.json", "consolidated.safetensors", "model-00001-of-00002.safetensors",
                                    "model-00002-of-00002.safetensors", "model.safetensors.index.json"], "base")
    assert "consolidated.safetensors" not in want and index == "model.safetensors.index.json"


@pytest.mark.parametrize("files, expected", [
    (["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"],
     {"config.json", "model.safetensors"}),
    (["config.json", "pytorch_model.bin", "training_args.bin", "vocab.txt"],
     {"config.json", "pytorch_model.bin", "training_args.bin", "vocab.txt"}),
    (["unet.safetensors", "README.md"], {"unet.safetensors", "README.md"}),
])
def test_base_files_one_format(files, expected):
    want, index = hub.select_files(files, "base")
    assert set(want) == expected and index is None


def test_adapter_files():
    files = ["README.md", "adapter_config.json", "adapter_model.bin", "adapter_model.safetensors",
             "training_args.bin", "checkpoint-500/adapter_config.json", "checkpoint-500/adapter_model.bin"]
    assert hub.select_files(files, "adapter") == (["adapter_config.json", "adapter_model.safetensors"], None)
    assert hub.select_files(files, "adapter", "checkpoint-500") == \
        (["checkpoint-500/adapter_config.json", "checkpoint-500/adapter_model.bin"], None)
    assert hub.select_files(files, "auto", "checkpoint-500")[0][0] == "checkpoint-500/adapter_config.json"
    kohya = ["README.md", "style_v1.safetensors", "style_v2.safetensors", "sample.png"]
    with pytest.raises(HubError, match="2 weight files"):
        hub.select_files(kohya, "adapter")
    assert hub.select_files(kohya, "adapter", "style_v2.safetensors") == (["style_v2.safetensors"], None)
    with pytest.raises(HubError, match="no file or folder 'style_v3.safetensors'"):
        hub.select_files(kohya, "adapter", "style_v3.safetensors")
    with pytest.raises(HubError, match="for an ONNX graph name the file, e.g. OWNER/NAME/onnx/model.onnx"):
        hub.select_files(["README.md", "onnx/model.onnx", "onnx/model.onnx_data"], "auto")
    assert hub.kind_of(["onnx/model.onnx"], "onnx/model.onnx") == "onnx"


# -- offline: from the cache -------------------------------------------------------------------

def test_apply_and_verify_hub_ids_from_the_cache(hf_cache, tmp_path):
    cache_repo(hf_cache, "acme/llama", tree(base_dir("llama-fp32")))
    cache_repo(hf_cache, "me/adapter", tree(adapter_dir("llama-basic")))
    local = tmp_path / "local"
    assert run("apply", base_dir("llama-fp32"), adapter_dir("llama-basic"), local).exit_code == 0
    r = run("apply", "acme/llama", "me/adapter", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["ok"] and data["tensors_merged"] == 21
    assert data["plan"]["base"].startswith(str(hf_cache / "models--acme--llama" / "snapshots"))
    same_checkpoint(tmp_path / "out", local)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (base_dir("llama-fp32") / "tokenizer.json").read_bytes()
    r = run("verify", "acme/llama", "me/adapter", tmp_path / "out", "--no-outputs", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True


def test_revisions_tags_and_commits(hf_cache, tmp_path):
    cache_repo(hf_cache, "acme/llama", tree(base_dir("llama-fp32")))
    cache_repo(hf_cache, "me/adapter", tree(adapter_dir("llama-basic")))
    v1 = cache_repo(hf_cache, "me/adapter", tree(adapter_dir("llama-patterns")), refs=("v1",))
    expected = tmp_path / "expected"
    assert run("apply", base_dir("llama-fp32"), adapter_dir("llama-patterns"), expected).exit_code == 0
    for i, spec in enumerate(["me/adapter@v1", f"me/adapter@{v1}"]):
        r = run("apply", "acme/llama", spec, tmp_path / f"o{i}")
        assert r.exit_code == 0, r.output
        same_checkpoint(tmp_path / f"o{i}", expected)
    # --revision applies to every Hub id without its own @REV: the base has no v1
    r = run("apply", "acme/llama", "me/adapter", tmp_path / "o3", "--revision", "v1")
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [
        f"Error: acme/llama: no such local path, and acme/llama (revision v1) is not in the Hugging Face cache "
        f"({hf_cache}) while offline (HF_HUB_OFFLINE=1); download it where there is network with "
        "`hf download acme/llama --revision v1` (or point HF_HUB_CACHE at a cache that has it), or pass a local path"]
    assert not (tmp_path / "o3").exists()
    r = run("apply", "acme/llama@main", "me/adapter", tmp_path / "o4", "--revision", "v1")
    assert r.exit_code == 0, r.output
    same_checkpoint(tmp_path / "o4", expected)


def test_missing_id_is_one_error_line_and_json(hf_cache, tmp_path):
    cache_repo(hf_cache, "acme/llama", tree(base_dir("llama-fp32")))
    r = run("apply", "acme/llama", "me/missing", tmp_path / "out", "--json")
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: me/missing: no such local path, and me/missing is not "
                                                   "in the Hugging Face cache")
    assert "`hf download me/missing`" in lines[0]
    err = json.loads(r.stdout)
    assert err["ok"] is False and err["command"] == "apply" and err["error"]["type"] == "HubError"
    assert err["error"]["exit_code"] == 1 and err["error"]["message"] == lines[0][len("Error: "):]


def test_a_local_path_wins_over_a_hub_id_of_the_same_spelling(hf_cache, tmp_path):
    cache_repo(hf_cache, "acme/llama", tree(base_dir("llama-fp32")))
    cache_repo(hf_cache, "me/adapter", tree(adapter_dir("llama-basic")))
    work = tmp_path / "work"
    shutil.copytree(adapter_dir("llama-patterns"), work / "me" / "adapter")
    for name, adapter in (("patterns", "llama-patterns"), ("basic", "llama-basic")):
        assert run("apply", base_dir("llama-fp32"), adapter_dir(adapter), tmp_path / name).exit_code == 0
    r = run("apply", "acme/llama", "me/adapter", tmp_path / "local-wins", cwd=work)
    assert r.exit_code == 0, r.output
    same_checkpoint(tmp_path / "local-wins", tmp_path / "patterns")
    r = run("apply", "acme/llama", "hf://me/adapter", tmp_path / "explicit", cwd=work)  # hf:// means the Hub
    assert r.exit_code == 0, r.output
    same_checkpoint(tmp_path / "explicit", tmp_path / "basic")


def test_incomplete_snapshot_names_the_missing_files(hf_cache, tmp_path):
    commit = cache_repo(hf_cache, "acme/sharded", tree(base_dir("llama-bf16-sharded")))
    cache_repo(hf_cache, "me/bf16", tree(adapter_dir("llama-bf16")))
    r = run("apply", "acme/sharded", "me/bf16", tmp_path / "ok")
    assert r.exit_code == 0, r.output
    snap = hf_cache / "models--acme--sharded" / "snapshots" / commit
    blob = (snap / "model-00003-of-00004.safetensors").resolve()
    blob.unlink()  # an interrupted download: the snapshot's symlink dangles
    r = run("apply", "acme/sharded", "me/bf16", tmp_path / "bad")
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"Error: acme/sharded: the cached snapshot {snap} of acme/sharded lacks "
                                "model-00003-of-00004.safetensors while offline (HF_HUB_OFFLINE=1); complete it "
                                "where there is network with `hf download acme/sharded`")


def test_adapter_in_a_subfolder_of_a_repo(hf_cache, tmp_path):
    cache_repo(hf_cache, "acme/llama", tree(base_dir("llama-fp32")))
    files = {**tree(adapter_dir("llama-basic"), "ckpt-100/"), **tree(adapter_dir("llama-patterns"), "ckpt-200/")}
    cache_repo(hf_cache, "me/run", files)
    assert run("apply", base_dir("llama-fp32"), adapter_dir("llama-patterns"), tmp_path / "expected").exit_code == 0
    r = run("apply", "acme/llama", "me/run/ckpt-200", tmp_path / "out")
    assert r.exit_code == 0, r.output
    same_checkpoint(tmp_path / "out", tmp_path / "expected")


def test_no_network_falls_back_to_the_cache(hf_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, but the endpoint refuses connections
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    cache_repo(hf_cache, "acme/llama", tree(base_dir("llama-fp32")))
    cache_repo(hf_cache, "me/adapter", tree(adapter_dir("llama-basic")))
    r = run("apply", "acme/llama", "me/adapter", tmp_path / "out")
    assert r.exit_code == 0, r.output
    r = run("apply", "acme/llama", "me/missing", tmp_path / "out2")
    assert r.exit_code == 1
    msg = r.stderr.strip()
    assert msg.startswith("Error: me/missing: no such local path, and me/missing is not in the Hugging Face cache")
    assert "the Hub cannot be reached" in msg and "\n" not in msg


def test_cli_in_a_fresh_process_offline(tmp_path):
    """As users run it: environment variables only, a new process (huggingface_hub reads them at import)."""
    env = {**os.environ, **_offline_env(tmp_path)}
    cache = Path(env["HF_HUB_CACHE"])
    cache_repo(cache, "acme/llama", tree(base_dir("llama-fp32")))
    cache_repo(cache, "me/adapter", tree(adapter_dir("llama-basic")))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "loramerge", "apply", "acme/llama", "me/adapter", str(out), "--json"],
                       env=env, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["tensors_merged"] == 21
    p = subprocess.run([sys.executable, "-m", "loramerge", "apply", "acme/llama", "me/nope", str(tmp_path / "x")],
                       env=env, capture_output=True, text=True, timeout=100)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "not in the Hugging Face cache" in p.stderr


def test_local_paths_do_not_import_huggingface_hub():
    code = ("import sys; from loramerge.readers import hub; import loramerge.cli; "
            f"hub.resolve({str(base_dir('llama-fp32'))!r}, 'base'); hub.resolve('nope.safetensors', 'base'); "
            "print('huggingface_hub' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


# -- online: what gets downloaded ----------------------------------------------------------------

class FakeHub:
    """huggingface_hub's repo_info / hf_hub_download / snapshot_download over a local
    folder per repo; downloads land in the real cache layout and are recorded."""

    def __init__(self, cache: Path, remotes: dict[str, dict[str, Path]]):
        self.cache, self.remotes, self.fetched = cache, remotes, []

    def repo_info(self, repo_id, revision=None, **kw):  # set on HfApi as a bound method of the fake
        from types import SimpleNamespace
        if repo_id not in self.remotes:
            from huggingface_hub.utils import RepositoryNotFoundError
            raise RepositoryNotFoundError(f"404 {repo_id}", response=_Response(404))
        return SimpleNamespace(sha="c" * 40, siblings=[SimpleNamespace(rfilename=n) for n in sorted(self.remotes[repo_id])])

    def _fetch(self, repo_id, names):
        files = {n: self.remotes[repo_id][n] for n in names}
        self.fetched += [f"{repo_id}:{n}" for n in names]
        commit = cache_repo(self.cache, repo_id, files, commit="c" * 40) if files else "c" * 40
        return self.cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit

    def hf_hub_download(self, repo_id, filename, revision=None, **kw):
        return str(self._fetch(repo_id, [filename]) / filename)

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, **kw):
        import fnmatch
        if repo_id.startswith("gated/"):  # listing is public, downloading needs accepted terms
            from huggingface_hub.utils import GatedRepoError
            raise GatedRepoError(f"403 {repo_id}", response=_Response(403))
        names = [n for n in self.remotes[repo_id] if any(fnmatch.fnmatch(n, p) for p in allow_patterns)]
        names = [n for n in names if not (self.cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" /
                                          ("c" * 40) / n).exists()]
        return str(self._fetch(repo_id, names))


class _Response:
    def __init__(self, status_code):
        self.status_code, self.headers, self.request, self.url = status_code, {}, None, ""


@pytest.fixture
def fake_online(hf_cache, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not needed")
    remote = {**tree(base_dir("llama-bf16-sharded")), "original/consolidated.00.pth": junk,
              "pytorch_model.bin": junk, "consolidated.safetensors": junk, ".gitattributes": junk}
    adapter = {**tree(adapter_dir("llama-bf16")), "adapter_model.bin": junk, "training_args.bin": junk}
    fake = FakeHub(hf_cache, {"acme/sharded": remote, "me/bf16": adapter, "gated/bf16": adapter})
    monkeypatch.setattr(hf.HfApi, "repo_info", fake.repo_info)
    monkeypatch.setattr(hf, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(hf, "snapshot_download", fake.snapshot_download)
    return fake


def test_download_fetches_only_what_the_merge_needs(fake_online, tmp_path):
    r = run("apply", "acme/sharded", "me/bf16", tmp_path / "out")
    assert r.exit_code == 0, r.output
    shards = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(fake_online.fetched) == sorted(
        [f"acme/sharded:{n}" for n in ["chat_template.jinja", "config.json", "generation_config.json",
                                       "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                                       *shards]]
        + ["me/bf16:adapter_config.json", "me/bf16:adapter_model.safetensors"])
    expected = tmp_path / "expected"
    assert run("apply", base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16"), expected).exit_code == 0
    for name in shards:
        a, b = load_file(str(tmp_path / "out" / name)), load_file(str(expected / name))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # now offline, the same ids resolve from what was downloaded
    fake_online.fetched.clear()
    constants.HF_HUB_OFFLINE = True
    r = run("apply", "acme/sharded", "me/bf16", tmp_path / "again")
    assert r.exit_code == 0, r.output
    assert fake_online.fetched == []


def test_unknown_repo_online_is_one_error_line(fake_online, tmp_path):
    r = run("apply", "acme/sharded", "me/nope", tmp_path / "out")
    assert r.exit_code == 1
    assert r.stderr.strip() == ("Error: me/nope: no such local path, and no model repository me/nope on the Hugging "
                                "Face Hub (if it is private, log in with `hf auth login` or set HF_TOKEN)")


def test_gated_repo_is_one_error_line(fake_online, tmp_path):
    r = run("apply", "acme/sharded", "gated/bf16", tmp_path / "out")
    assert r.exit_code == 1 and not (tmp_path / "out").exists()
    assert r.stderr.strip() == ("Error: gated/bf16: gated/bf16 is gated on the Hugging Face Hub: accept its terms at "
                                f"{BOGUS_ENDPOINT}/gated/bf16 and log in (`hf auth login`, or set HF_TOKEN)")
