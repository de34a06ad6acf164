"""A safetensors file's header as JSON, unvalidated: for the guesses made before torch is imported
(the head start's output layout, the premerge worker's targets), which are checked against the
plan before anything they did is used. The checkpoint reader (checkpoint.py) validates headers
and reports what is wrong; here any error only means no guess. Standard library only."""

from __future__ import annotations

import json
import struct
from pathlib import Path

# A header larger than this is not a real safetensors header (the reference reader caps it too;
# checkpoint.py's limit)
MAX_HEADER = 100 * 1024 * 1024


def raw_header(path: Path) -> tuple[dict, int]:
    """(the header without __metadata__, where the data starts); raises OSError, ValueError or
    struct.error for anything that is not a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise ValueError(f"{path}: header of {n} bytes")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n
