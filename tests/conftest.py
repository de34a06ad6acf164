"""Shared test helpers. References here are computed independently of loramerge's own code:
tensors are read with the safetensors library, scales are recomputed from the config by hand,
and rounding uses a different algorithm (nearest-neighbour search) than loramerge's round-to-odd."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())


def base_dir(name: str) -> Path:
    return FIXTURES / MANIFEST["bases"][name]["path"]


def adapter_dir(name: str) -> Path:
    return FIXTURES / "adapters" / name


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory or file (safetensors or .bin), via the reference libraries."""
    from safetensors.torch import load_file

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.name == "training_args.bin":
            continue
        sd = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)
        out.update(sd)
    return out


def expected_delta64(adapter: Path) -> dict[str, torch.Tensor]:
    """module path -> float64 delta s*B@A computed from the raw files and the config, by hand."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_dir(adapter / "adapter_model.safetensors") if (adapter / "adapter_model.safetensors").exists() \
        else torch.load(adapter / "adapter_model.bin", weights_only=True)
    out = {}
    for key, a in sd.items():
        if not key.endswith("lora_A.weight"):
            continue
        mod = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        b = sd[key.replace("lora_A", "lora_B")]
        r, alpha = cfg["r"], cfg["lora_alpha"]
        for pat, val in (cfg.get("rank_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pat})$", mod):
                r = val
                break
        for pat, val in (cfg.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pat})$", mod):
                alpha = val
                break
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[mod] = s * (b.double() @ a.double())
        bias = sd.get(key.replace("lora_A.weight", "lora_B.bias"))
        if bias is not None:
            out[mod + ".bias"] = s * bias.double()
    return out


def correctly_rounded(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 to bfloat16/float16 by picking the nearest of three neighbouring grid values
    (ties to even mantissa). Deliberately a different algorithm from loramerge's round-to-odd."""
    if dtype in (torch.float32, torch.float64):
        return x64.to(dtype)
    itype = torch.int16
    c1 = x64.to(dtype)  # may be off by one ulp (torch rounds float64 -> float32 -> half)
    bits = c1.view(itype).to(torch.int32)
    cands = []
    for d in (-1, 0, 1):
        # stepping the integer representation moves one ulp away from/toward zero
        cb = (bits + d).to(itype).view(dtype)
        cands.append(cb)
    best = cands[1].clone()
    best_err = (cands[1].to(torch.float64) - x64).abs()
    for c in (cands[0], cands[2]):
        cf = c.to(torch.float64)
        ok = torch.isfinite(cf)
        err = (cf - x64).abs()
        even = (c.view(itype) & 1) == 0
        better = ok & ((err < best_err) | ((err == best_err) & even))
        best = torch.where(better, c, best)
        best_err = torch.where(better, err, best_err)
    return best


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def cuda_ok() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path / "merged"


# -- TIES / DARE references in numpy float64, written from the papers (Yadav et al. 2023,
# arXiv:2306.01708; Yu et al. 2023, arXiv:2311.03099), not from loramerge.arithmetic ---------------

def dare_masks(seed: int, name: str, count: int, shape, density: float) -> list:
    """The keep-masks DARE draws for one target: loramerge's documented randomness contract is a
    CPU torch generator seeded with the first 8 bytes (little endian, 63 bits) of
    sha256(f"{seed}\\0{name}"), one torch.rand(shape, float32) per task vector in adapter order,
    an entry kept where the draw is below the density."""
    import hashlib

    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return [(torch.rand(tuple(shape), generator=gen, dtype=torch.float32) < density).numpy() for _ in range(count)]


def dare_np(taus, masks, density: float) -> list:
    """Drop And REscale: the kept entries divided by the density, the rest zero."""
    return [np.where(m, t / density, 0.0) for t, m in zip(taus, masks)]


def elect_np(taus):
    """TIES steps 2-3: per entry the sign of the total mass (zero elects +), then the mean of the
    non-zero entries that agree with it (zero where none does)."""
    stack = np.stack(taus)
    sign = np.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(stack) == sign
    return (stack * agree).sum(0) / np.maximum(agree.sum(0), 1)


def ties_np(taus, density: float):
    """TIES-Merging: each task vector trimmed to its ceil(density * n) largest magnitudes, then
    elected and averaged."""
    trimmed = []
    for t in taus:
        k = math.ceil(density * t.size)
        keep = np.zeros(t.size, dtype=bool)
        keep[np.argsort(-np.abs(t).ravel(), kind="stable")[:k]] = True
        trimmed.append(np.where(keep.reshape(t.shape), t, 0.0))
    return elect_np(trimmed)


def truncate_np(d, rank: int):
    """The best rank-`rank` approximation (Eckart-Young) by numpy's SVD."""
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]
