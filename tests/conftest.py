"""Shared test helpers. References here are computed independently of loramerge's own code:
tensors are read with the safetensors library, scales are recomputed from the config by hand,
and rounding uses a different algorithm (nearest-neighbour search) than loramerge's round-to-odd."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

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
