"""Lazy base-checkpoint index: safetensors (single, sharded with index) and legacy pickled .bin.

Only headers are read here. Tensor bytes are read one tensor at a time when the engine asks.
Every structural problem (truncated shard, garbage header, index naming a missing file) is
found up front, before any output is written.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError
from . import quantized
from .st_header import MAX_HEADER  # a larger header is not a real one (the reference reader caps it too)
from ..types import ST_TO_TORCH, TORCH_TO_ST, TensorRef, itemsize, numel

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Files in a model directory that hold weights; never copied as-is into a merged output, since
# they would carry unmerged (stale) weights next to the merged ones.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
NON_WEIGHT_BIN = ("training_args.bin",)
OWN_MANIFEST = "loramerge_manifest.json"  # writers/manifest.py: a merged base's evidence, not carried over


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorRef], dict]:
    """Parse and validate one safetensors file's header. Returns (tensors, __metadata__)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors "
                                      "(it is truncated or empty); re-download or re-save it")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER or hlen + 8 > size:
                raise CheckpointError(
                    f"{path}: not a valid safetensors file (header length {hlen} does not fit in a "
                    f"{size}-byte file); the file is corrupt or truncated, re-download or re-save it")
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file (header is not JSON: {e}); "
                              "the file is corrupt, re-download or re-save it") from e

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + hlen
    data_len = size - data_start
    tensors: dict[str, TensorRef] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                  and isinstance(offsets, list) and len(offsets) == 2
                  and all(type(o) is int and o >= 0 for o in offsets))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry ({info!r})") from e
        if not ok:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry ({info!r}): shape and "
                                  "data_offsets must be lists of non-negative integers; the file is corrupt")
        shape, (begin, end) = tuple(shape), offsets
        if not isinstance(dtype, str) or dtype not in ST_TO_TORCH:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}, which this torch "
                                  f"cannot represent (known: {', '.join(ST_TO_TORCH)})")
        nbytes = numel(shape) * itemsize(dtype)
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} ({dtype} {list(shape)}) needs {nbytes} bytes "
                                  f"but its data_offsets span {end - begin}; the header is corrupt")
        if end > data_len:
            raise CheckpointError(
                f"{path}: file is truncated: tensor {name!r} ends at byte {data_start + end} but the file "
                f"has {size} bytes; re-download or re-save this shard")
        spans.append((begin, end, name))
        tensors[name] = TensorRef(name, path, dtype, shape, data_start + begin, nbytes)
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise CheckpointError(f"{path}: tensor {name!r} overlaps another tensor's bytes; the header is corrupt")
        pos = end
    return tensors, metadata


class Checkpoint:
    """A base model checkpoint, indexed lazily.

    `tensors` maps tensor name -> TensorRef, in file order then byte order (the order reads are
    sequential in). `files` lists weight files in order. `extra_files` are the non-weight files
    (config, tokenizer, ...) a merged output should carry over.
    """

    def __init__(self, path: Path):
        self.path = path
        self.tensors: dict[str, TensorRef] = {}
        self.files: list[Path] = []
        self.format = ""           # "safetensors" | "bin"
        self.index_file: Path | None = None
        self.extra_files: list[Path] = []
        self.skipped_files: list[str] = []
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self.quant: quantized.QuantLayout | None = None   # FP8 / bitsandbytes 4-bit weights, if any
        self.quant_error: CheckpointError | None = None    # a quantized layout loramerge cannot read

    @property
    def root(self) -> Path | None:
        return self.path if self.path.is_dir() else None

    def config(self) -> dict | None:
        if self.root is None or not (self.root / "config.json").is_file():
            return None
        try:
            return json.loads((self.root / "config.json").read_text())
        except ValueError as e:
            raise CheckpointError(f"{self.root / 'config.json'}: invalid JSON ({e})") from e

    # -- reading tensor data ---------------------------------------------------------------
    def read(self, ref: TensorRef, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return the tensor's values on the CPU. For safetensors, bytes are read with one
        readinto() into `out` (a uint8 buffer of ref.nbytes, e.g. pinned) or a fresh buffer, so
        memory is exactly one tensor and no page-cache mapping is kept alive."""
        if ref.offset is None:
            return self._bin_tensor(ref)
        buf = out if out is not None else torch.empty(ref.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()).cast("B")[: ref.nbytes]  # a pooled buffer may be larger
        with open(ref.file, "rb", buffering=0) as f:
            f.seek(ref.offset)
            got = 0
            while got < ref.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{ref.file}: file ended while reading tensor {ref.name!r}; "
                                          "it was truncated after it was opened")
                got += n
        return buf[: ref.nbytes].view(ST_TO_TORCH[ref.dtype]).reshape(ref.shape)

    def read_rows(self, ref: TensorRef, rows: list[int]) -> torch.Tensor:
        """Rows `rows` (indices along the first axis) of a tensor with at least one dimension, as
        [len(rows), *shape[1:]] in its own memory: from safetensors only those rows' bytes are read
        (one pread each), so sampling a big tensor costs a few pages, not the tensor."""
        if ref.offset is None:
            return self._bin_tensor(ref)[rows].clone()
        row_bytes = ref.nbytes // ref.shape[0] if ref.shape and ref.shape[0] else 0
        buf = torch.empty(len(rows) * row_bytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()).cast("B")
        fd = os.open(ref.file, os.O_RDONLY)
        try:
            for k, i in enumerate(rows):
                if not 0 <= i < ref.shape[0]:
                    raise IndexError(f"{ref.name}: row {i} of {ref.shape[0]}")
                got = os.preadv(fd, [view[k * row_bytes:(k + 1) * row_bytes]], ref.offset + i * row_bytes)
                if got != row_bytes:
                    raise CheckpointError(f"{ref.file}: file ended while reading tensor {ref.name!r}; "
                                          "it was truncated after it was opened")
        finally:
            os.close(fd)
        return buf.view(ST_TO_TORCH[ref.dtype]).reshape(len(rows), *ref.shape[1:])

    def _bin_tensor(self, ref: TensorRef) -> torch.Tensor:
        sd = self._load_bin(ref.file)
        return sd[ref.name]

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._bin_cache:
            self._bin_cache[file] = load_bin_state_dict(file)
        return self._bin_cache[file]

    def close(self) -> None:
        self._bin_cache.clear()


def load_bin_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Load a pickled state dict without running arbitrary code (weights_only=True), memory-mapped
    where the file is in torch's zip format, so tensor bytes are paged in only when used."""
    try:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            # Pre-1.6 (non-zip) pickles cannot be mmapped; they are loaded whole, still safely.
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; all mean "not a safe weights file"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{file}: cannot load as a weights-only PyTorch checkpoint ({msg}); loramerge never runs "
            "pickled code: re-save the weights with safetensors or torch.save(state_dict)") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{file}: expected a flat dict of tensors (a state_dict), found "
                              f"{type(sd).__name__}; save model.state_dict() instead")
    return sd


def _bin_refs(file: Path, sd: dict[str, torch.Tensor]) -> dict[str, TensorRef]:
    refs = {}
    for name, t in sd.items():
        if t.dtype not in TORCH_TO_ST:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        code = TORCH_TO_ST[t.dtype]
        refs[name] = TensorRef(name, file, code, tuple(t.shape), None, t.numel() * itemsize(code))
    return refs


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight_map, checked: tensor names to plain file names in the same directory
    (an index naming ../x or /etc/passwd would make the reader open files outside the model)."""
    try:
        data = json.loads(index.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
            raise ValueError("no weight_map object")
        weight_map = data["weight_map"]
        bad = [f for f in weight_map.values() if not isinstance(f, str) or not f or f in (".", "..")
               or Path(f).name != f or "\\" in f]
        if bad:
            raise ValueError(f"a tensor is mapped to {bad[0]!r}, not a file name in the model's directory")
        if not weight_map:
            raise ValueError("weight_map is empty")
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{index}: invalid index file ({e}); expected {{\"weight_map\": {{tensor: file}}}}") from e
    return weight_map


def _is_weight_file(p: Path) -> bool:
    if p.name in NON_WEIGHT_BIN:
        return False
    return p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json")


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Index a base checkpoint: a directory (model.safetensors, sharded safetensors + index,
    pytorch_model.bin with or without index) or a single .safetensors / .bin file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: base checkpoint not found")
    ck = Checkpoint(path)
    if path.is_file():
        weight_files = [path]
    else:
        weight_files = _discover(path, ck)
        # Everything else at top level is carried over; subfolders are listed as skipped, since
        # they often hold unmerged weights (e.g. original/consolidated.00.pth).
        for p in sorted(path.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir():
                ck.skipped_files.append(p.name + "/")
            elif _is_weight_file(p):
                if p not in weight_files and p != ck.index_file:
                    ck.skipped_files.append(p.name)
            elif p.name == OWN_MANIFEST:  # it describes this checkpoint, not an output made from it
                ck.skipped_files.append(p.name)
            else:
                ck.extra_files.append(p)

    if weight_files[0].suffix == ".safetensors":
        ck.format = "safetensors"
        for f in weight_files:
            refs, _ = read_safetensors_header(f)
            for name, ref in sorted(refs.items(), key=lambda kv: kv[1].offset):
                if name in ck.tensors:
                    raise CheckpointError(f"{f}: tensor {name!r} also appears in {ck.tensors[name].file.name}; "
                                          "the shards overlap, re-save the checkpoint")
                ck.tensors[name] = ref
    else:
        ck.format = "bin"
        for f in weight_files:
            sd = ck._load_bin(f)
            for name, ref in _bin_refs(f, sd).items():
                if name in ck.tensors:
                    raise CheckpointError(f"{f}: tensor {name!r} also appears in {ck.tensors[name].file.name}")
                ck.tensors[name] = ref
    ck.files = weight_files
    if ck.index_file is not None:
        _check_index(ck)
    if not ck.tensors:
        raise CheckpointError(f"{path}: checkpoint holds no tensors")
    try:
        ck.quant = quantized.detect(ck.tensors, ck.config(), path, ck.read)
    except CheckpointError as e:  # raised by whatever merges or verifies it; `inspect` still describes it
        ck.quant_error = e
    return ck


def _discover(root: Path, ck: Checkpoint) -> list[Path]:
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = root / index_name
        if index.is_file():
            ck.index_file = index
            weight_map = _read_index(index)
            names = list(dict.fromkeys(weight_map.values()))
            if (root / single).is_file() and names != [single]:
                # two models in one directory: transformers loads the single file, a reader of
                # the index the shards; merging into either could be merging into the wrong one
                raise CheckpointError(
                    f"{root}: holds both {single} and {index_name} (with its shards): which one is the model is "
                    f"ambiguous (transformers loads {single}); remove the stale one, or pass {root / single} "
                    "itself as the base")
            missing = [n for n in names if not (root / n).is_file()]
            if missing:
                raise CheckpointError(f"{index}: names shard(s) that do not exist: {', '.join(missing)}; "
                                      "the download is incomplete")
            return [root / n for n in names]
        if (root / single).is_file():
            return [root / single]
    found = sorted(p for p in root.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise CheckpointError(f"{root}: {len(found)} .safetensors files but no {SAFETENSORS_INDEX}; "
                              "pass the one file to merge, or add the index")
    raise CheckpointError(f"{root}: no model.safetensors, {SAFETENSORS_INDEX}, pytorch_model.bin or "
                          f"{BIN_INDEX} found; pass a model directory or a .safetensors file")


def _check_index(ck: Checkpoint) -> None:
    weight_map = _read_index(ck.index_file)
    problems = []
    for name, fname in weight_map.items():
        ref = ck.tensors.get(name)
        if ref is None:
            problems.append(f"{name!r} is mapped to {fname} but that file has no such tensor")
        elif ref.file.name != fname:
            problems.append(f"{name!r} is mapped to {fname} but lives in {ref.file.name}")
    if problems:
        raise CheckpointError(f"{ck.index_file}: index does not match the shards", problems)
