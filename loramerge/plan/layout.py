"""Output files: mirror the base's shards (and names), one file, or re-shard by size."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UsageError
from ..readers.checkpoint import Checkpoint
from ..types import Job, OutputFile


def parse_size(text: str | int | None) -> int | None:
    """'5GB', '500MB', '2GiB', 1000000 -> bytes (HF's max_shard_size convention: GB = 10^9)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"--shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _out_name(base_file: Path) -> str:
    name = base_file.name
    if name.endswith(".safetensors"):
        return name
    # pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors
    stem = name[: -len(".bin")] if name.endswith(".bin") else base_file.stem
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def layout_files(base: Checkpoint, jobs: list[Job], shard_size: int | None, single_file: bool) -> list[OutputFile]:
    if single_file or (shard_size is None and len(base.files) == 1):
        name = _out_name(base.files[0]) if shard_size is None else "model.safetensors"
        return [OutputFile(name, jobs)]
    if shard_size is None:  # mirror the base's shards
        by_file: dict[Path, list[Job]] = {f: [] for f in base.files}
        for j in jobs:
            by_file[j.source.file].append(j)
        return [OutputFile(_out_name(f), js) for f, js in by_file.items() if js]
    groups: list[list[Job]] = [[]]
    size = 0
    for j in jobs:
        if groups[-1] and size + j.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(j)
        size += j.nbytes
    if len(groups) == 1:
        return [OutputFile("model.safetensors", groups[0])]
    n = len(groups)
    return [OutputFile(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]
