"""Hugging Face Hub ids wherever a path is accepted: `meta-llama/Llama-3.1-8B`, `me/adapter@v2`,
`me/loras/style.safetensors` (a file or folder inside a repo), `hf://gpt2` (explicit: also a
name without an owner, and never taken for a local path).

Rules, in order:
1. An argument that exists on disk is a local path, always (a local `me/adapter` folder wins
   over the Hub repo of that spelling; write `hf://me/adapter` to mean the repo).
2. One that looks like a repo id (`owner/name[@REV][/path/in/repo]`) is resolved with
   huggingface_hub. REV (branch, tag or commit) comes from `@REV`, else from `revision`
   (the CLI's --revision), else the default branch.
3. Anything else is returned as given, and the readers report it as not found.

Online, only what the merge needs is downloaded, into huggingface_hub's cache: for a base the
top-level weights of ONE format (sharded safetensors: the index and exactly the shards it
names; `.bin` only when there are no safetensors; never subfolders such as `original/`) plus
every top-level non-weight file (config, tokenizer, chat template), i.e. what a merge carries
over; for an adapter `adapter_config.json` + `adapter_model.safetensors` (or `.bin` when that
is all there is), or the one weights file of a kohya/loralib repo; for an ONNX graph the
`.onnx` file and the external data files it names. Offline (HF_HUB_OFFLINE=1), or when the Hub
cannot be reached, the snapshot already in the cache is used, and checked for those files.

huggingface_hub is imported only here and only for an argument that takes rule 2, so local
paths cost no import time.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import HubError

KINDS = ("base", "adapter", "onnx", "auto")
_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_SPEC = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[^/@\s]+))?(?:/(?P<sub>[^@\s]+))?$")
_EXPLICIT = re.compile(rf"^hf://(?P<repo>(?:{_PART}/)?{_PART})(?:@(?P<rev>[^/@\s]+))?(?:/(?P<sub>[^@\s]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SINGLE_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
LOOKUP_TIMEOUT = 15.0  # seconds for the one request that lists a repo's files


@dataclass
class HubRef:
    spec: str                 # as the user wrote it
    repo: str
    revision: str | None
    sub: str                  # path inside the repo ('' = its root)

    @property
    def label(self) -> str:
        return self.repo + (f" (revision {self.revision})" if self.revision else "")


def parse(spec: str) -> HubRef | None:
    """The repo id, revision and path inside the repo that `spec` names, or None if it does not
    look like a Hub id."""
    m = _EXPLICIT.match(spec) or _SPEC.match(spec)
    if m is None:
        return None
    repo, sub = m.group("repo"), (m.group("sub") or "").strip("/")
    if "--" in repo or ".." in repo or repo.endswith(".git"):
        return None
    if sub and any(p in ("", ".", "..") for p in sub.split("/")):
        return None
    return HubRef(spec, repo, m.group("rev"), sub)


def looks_like_hub_id(spec) -> bool:
    return parse(str(spec)) is not None


def resolve(spec, kind: str = "auto", revision: str | None = None) -> Path:
    """A local path for `spec` (see the module docstring). kind: what the caller reads: 'base'
    (a checkpoint), 'adapter', 'onnx' (a graph file) or 'auto' (decided from the repo's files)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    ref = _local_or_ref(spec, revision)
    if not isinstance(ref, HubRef):
        return Path(os.fspath(spec)) if ref is None else ref
    hf = _hub()
    offline = bool(hf.constants.HF_HUB_OFFLINE)
    files, reason = None, "while offline (HF_HUB_OFFLINE=1)"
    if not offline:
        try:
            # one request, no retries (list_repo_files retries a dead connection for ~25 s)
            info = hf.HfApi().repo_info(ref.repo, revision=ref.revision, timeout=LOOKUP_TIMEOUT)
            files = [s.rfilename for s in (info.siblings or [])]
        except Exception as e:  # noqa: BLE001 - sorted below: user errors raise, the rest means "no Hub"
            _raise_if_user_error(hf, ref, e)
            reason = f"and the Hub cannot be reached ({type(e).__name__}: {_first_line(e)})"
    if files is None:
        return _from_cache(hf, ref, kind, reason)
    try:
        return _download(hf, ref, kind, files)
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001 - a gated repo, a dropped connection, a full disk ...
        _raise_if_user_error(hf, ref, e)
        raise HubError(f"{ref.spec}: downloading {ref.label} failed ({type(e).__name__}: {_first_line(e)}); "
                       "what was downloaded stays in the Hugging Face cache, run the command again to resume") from e


def cached(spec, kind: str = "auto", revision: str | None = None) -> Path | None:
    """A local path for `spec` without the network: the path itself, or for a Hub id the cached
    snapshot holding what `kind` needs; None where there is neither (the CLI's head start then
    does nothing: resolve() is what decides, and reports, once the command runs)."""
    ref = _local_or_ref(spec, revision)
    if not isinstance(ref, HubRef):
        return ref
    try:
        return _from_cache(_hub(), ref, kind, "")
    except (HubError, OSError, ValueError):
        return None


def _local_or_ref(spec, revision: str | None) -> Path | HubRef | None:
    """Rules 1 and 2 of the module docstring: the existing local path, or the Hub reference (its
    revision defaulting to `revision`), or None for neither."""
    text = os.fspath(spec)
    if not text.startswith("hf://") and Path(text).exists():
        return Path(text)
    ref = parse(text)
    if ref is not None and ref.revision is None:
        ref.revision = revision
    return ref


def resolve_all(specs, kind: str, revision: str | None = None) -> list[Path]:
    return [resolve(s, kind, revision) for s in specs]


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401
    except ImportError as e:
        raise HubError("reading a Hugging Face Hub id needs huggingface_hub: pip install huggingface_hub "
                       "(it is a dependency of loramerge; the install is incomplete)") from e
    return huggingface_hub


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""


def _raise_if_user_error(hf, ref: HubRef, e: Exception) -> None:
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = hf.constants.ENDPOINT
    if isinstance(e, GatedRepoError):
        raise HubError(f"{ref.spec}: {ref.repo} is gated on the Hugging Face Hub: accept its terms at "
                       f"{endpoint}/{ref.repo} and log in (`hf auth login`, or set HF_TOKEN)") from e
    if isinstance(e, RepositoryNotFoundError):
        raise HubError(f"{ref.spec}: no such local path, and no model repository {ref.repo} on the Hugging Face "
                       "Hub (if it is private, log in with `hf auth login` or set HF_TOKEN)") from e
    if isinstance(e, RevisionNotFoundError):
        raise HubError(f"{ref.spec}: {ref.repo} has no revision {ref.revision!r} (a branch, tag or commit "
                       "hash); check --revision or @REV") from e
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status in (401, 403):
        raise HubError(f"{ref.spec}: the Hugging Face Hub refused access to {ref.repo} ({status}); log in with "
                       "`hf auth login` or set HF_TOKEN") from e


# -- which files -------------------------------------------------------------------------

def _weight_rules():
    from .checkpoint import BIN_INDEX, NON_WEIGHT_BIN, SAFETENSORS_INDEX, WEIGHT_SUFFIXES
    return SAFETENSORS_INDEX, BIN_INDEX, WEIGHT_SUFFIXES, NON_WEIGHT_BIN


def kind_of(files: list[str], sub: str) -> str:
    """'onnx', 'adapter' or 'base', from the repo's file list and the path inside it."""
    if sub.endswith(".onnx"):
        return "onnx"
    prefix = sub + "/" if sub else ""
    return "adapter" if prefix + "adapter_config.json" in files or sub.startswith("adapter_model.") else "base"


def select_files(files: list[str], kind: str, sub: str = "") -> tuple[list[str], str | None]:
    """(files to download, index whose shards must be added) for `kind` at `sub` in a repo
    whose files (paths relative to its root) are `files`. Raises HubError when `sub` is not in
    the repo or the choice is ambiguous."""
    if kind == "auto":
        kind = kind_of(files, sub)
    if sub in files:  # one file: a kohya/loralib adapter, a single .safetensors base, a graph
        return [sub], None
    prefix = sub + "/" if sub else ""
    here = [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
    if not here:
        raise HubError(f"no file or folder {sub!r} in the repo" if sub else "the repo has no files")
    here = [f for f in here if not f.startswith(".")]
    st_index, bin_index, weight_suffixes, non_weight = _weight_rules()
    if kind == "adapter":
        if "adapter_config.json" in here:
            weights = [w for w in ADAPTER_WEIGHTS if w in here][:1]
            return [prefix + f for f in ["adapter_config.json", *weights]], None
        singles = [f for f in here if f.endswith(SINGLE_FILE_SUFFIXES)]
        if len(singles) != 1:
            raise HubError(f"no adapter_config.json and {len(singles)} weight files"
                           + (f" ({', '.join(singles[:5])})" if singles else "")
                           + "; name the adapter file, e.g. OWNER/NAME/FILE.safetensors")
        return [prefix + singles[0]], None
    if kind == "onnx":
        raise HubError("name the .onnx file inside the repo, e.g. OWNER/NAME/model.onnx")
    # base: the weights the checkpoint reader will use (its own order of preference), plus
    # every top-level non-weight file, which the merge carries over.
    extras = [f for f in here if f in non_weight or not (f.endswith(weight_suffixes) or f.endswith(".index.json"))]
    for index, single in ((st_index, "model.safetensors"), (bin_index, "pytorch_model.bin")):
        if index in here:
            return [prefix + f for f in extras + [index]], prefix + index
        if single in here:
            return [prefix + f for f in extras + [single]], None
    found = [f for f in here if f.endswith(".safetensors")]
    if len(found) == 1:
        return [prefix + f for f in extras + found], None
    if found:
        raise HubError(f"{len(found)} .safetensors files but no {st_index}; name the one to merge, "
                       "e.g. OWNER/NAME/FILE.safetensors")
    graphs = [f for f in files if f.startswith(prefix) and f.endswith(".onnx")]
    hint = f"; for an ONNX graph name the file, e.g. OWNER/NAME/{graphs[0]}" if graphs else ""
    raise HubError(f"no model.safetensors, {st_index}, pytorch_model.bin or {bin_index}: not a model checkpoint{hint}")


def _shards(index_file: Path) -> list[str]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise HubError(f"{index_file}: invalid index file ({e})") from e


def _onnx_data_files(graph: Path) -> list[str]:
    """External data files a graph names (relative to its folder), read from the proto alone."""
    try:
        import onnx
    except ImportError as e:
        raise HubError("reading an ONNX graph needs the onnx package: pip install 'loramerge[onnx]'") from e
    model = onnx.load(str(graph), load_external_data=False)
    locations = set()
    for t in model.graph.initializer:  # where loramerge's graph reader looks for external data too
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in t.external_data if e.key == "location")
    return sorted(locations)


# -- online and offline --------------------------------------------------------------------

def _download(hf, ref: HubRef, kind: str, files: list[str]) -> Path:
    try:
        want, index = select_files(files, kind, ref.sub)
    except HubError as e:
        raise HubError(f"{ref.spec}: {ref.label}: {e}") from None
    rev = ref.revision
    if index is not None:
        folder = Path(index).parent.as_posix()
        local = Path(hf.hf_hub_download(ref.repo, index, revision=rev))
        want += [n if folder == "." else f"{folder}/{n}" for n in _shards(local)]
    if ref.sub.endswith(".onnx") and ref.sub in files:
        local = Path(hf.hf_hub_download(ref.repo, ref.sub, revision=rev))
        folder = Path(ref.sub).parent.as_posix()
        want += [n if folder == "." else f"{folder}/{n}" for n in _onnx_data_files(local)]
    missing = sorted(set(want) - set(files))
    if missing:
        raise HubError(f"{ref.spec}: {ref.label} lacks {', '.join(missing[:5])}, which its own files name; "
                       "the repo is incomplete")
    snapshot = hf.snapshot_download(ref.repo, revision=rev, allow_patterns=[glob.escape(f) for f in want])
    return Path(snapshot) / ref.sub if ref.sub else Path(snapshot)


def cached_snapshot(hf, repo: str, revision: str | None) -> Path | None:
    """The snapshot folder huggingface_hub's cache holds for repo at revision (a branch or tag
    is looked up in refs/, a commit hash directly), or None."""
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(hf.constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    rev = revision or hf.constants.DEFAULT_REVISION
    commit = rev if _COMMIT.match(rev) else None
    if commit is None:
        ref_file = storage / "refs" / rev
        if ref_file.is_file():
            commit = ref_file.read_text().strip()
    if commit is None:
        return None
    folder = storage / "snapshots" / commit
    return folder if folder.is_dir() else None


def _from_cache(hf, ref: HubRef, kind: str, reason: str) -> Path:
    fetch = f"`hf download {ref.repo}" + (f" --revision {ref.revision}" if ref.revision else "") + "`"
    snapshot = cached_snapshot(hf, ref.repo, ref.revision)
    if snapshot is None:
        raise HubError(f"{ref.spec}: no such local path, and {ref.label} is not in the Hugging Face cache "
                       f"({hf.constants.HF_HUB_CACHE}) {reason}; download it where there is network with {fetch} "
                       "(or point HF_HUB_CACHE at a cache that has it), or pass a local path")
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file() or p.is_symlink()]
    try:
        want, index = select_files(files, kind, ref.sub)
        if index is not None and (snapshot / index).is_file():
            folder = Path(index).parent.as_posix()
            want += [n if folder == "." else f"{folder}/{n}" for n in _shards(snapshot / index)]
        if ref.sub.endswith(".onnx") and (snapshot / ref.sub).is_file():
            folder = Path(ref.sub).parent.as_posix()
            want += [n if folder == "." else f"{folder}/{n}" for n in _onnx_data_files(snapshot / ref.sub)]
    except HubError as e:
        raise HubError(f"{ref.spec}: the cached snapshot {snapshot} of {ref.label}: {e} ({reason})") from None
    # a file whose blob is missing is a dangling symlink: is_file() is false
    missing = [f for f in want if not (snapshot / f).is_file()]
    if missing:
        raise HubError(f"{ref.spec}: the cached snapshot {snapshot} of {ref.label} lacks "
                       f"{', '.join(missing[:5])}{' and more' if len(missing) > 5 else ''} {reason}; complete it "
                       f"where there is network with {fetch}")
    return snapshot / ref.sub if ref.sub else snapshot
