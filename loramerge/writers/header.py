"""A safetensors header from the entries it lists (standard library only: the head start
computes a shard's header before torch is imported)."""

from __future__ import annotations

import json

# What the writer puts in every file's __metadata__ (transformers reads "format" to pick its loader).
METADATA = {"format": "pt"}
ALIGN = 8  # the header is padded with spaces to a multiple of 8, as the reference writer does


def build_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict | None) -> bytes:
    """Header bytes for tensors in the given order: (name, dtype code, shape, nbytes). Compact JSON
    with __metadata__ first and space padding: for the same tensor order, byte for byte what
    safetensors' own serializer writes (it sorts by dtype, then name; we keep the base's order)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % ALIGN)
    return len(raw).to_bytes(8, "little") + raw


def data_offsets(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict | None) -> list[int]:
    """The file offset of each entry's first byte in the file build_header() starts."""
    pos, offsets = len(build_header(entries, metadata)), []
    for *_, nbytes in entries:
        offsets.append(pos)
        pos += nbytes
    return offsets
