"""inspect: base (or merged) model checkpoints, through the same lazy index apply uses (headers
only for safetensors)."""

from __future__ import annotations

from pathlib import Path

from ..readers.checkpoint import open_checkpoint
from ..types import numel
from ..report import human_bytes
from .kinds import Kind, counts

CONFIG_KEYS = ("model_type", "architectures", "torch_dtype", "dtype", "vocab_size", "hidden_size",
               "num_hidden_layers", "tie_word_embeddings")
# Tensor-name endings that quantizers write next to (or instead of) a weight.
_QUANT_TENSORS = {
    "bitsandbytes-4bit": (".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"),
    "bitsandbytes-8bit": (".SCB", ".weight_format"),
    "gptq/awq": (".qweight", ".qzeros", ".g_idx"),
    "fp8": (".weight_scale", ".weight_scale_inv", ".input_scale"),
}
_FP8 = ("F8_E4M3", "F8_E5M2")


def _claims(path: Path) -> str | None:
    if path.is_dir() or path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        return "checkpoint"  # the reader says what exactly (safetensors or bin), or why not
    return None


def quantization(tensors: dict, config: dict | None) -> dict | None:
    """How the checkpoint is quantized, from config.json's quantization_config and from the
    tensors themselves (a checkpoint saved without its config still shows its scales), or None."""
    qc = (config or {}).get("quantization_config")
    found = {method: sorted(n for n in tensors if n.endswith(ends)) for method, ends in _QUANT_TENSORS.items()}
    found = {m: names for m, names in found.items() if names}
    fp8 = sorted(n for n, ref in tensors.items() if ref.dtype in _FP8)
    if fp8:
        found.setdefault("fp8", []).extend(fp8)
    if not qc and not found:
        return None
    method = (qc or {}).get("quant_method") or next(iter(found))
    return {"method": method, "config": qc or None,
            "tensors": {m: len(names) for m, names in found.items()},
            "example": next((names[0] for names in found.values()), None)}


def describe(path: Path, fmt: str, options: dict) -> dict:
    ck = open_checkpoint(path)
    try:
        config = ck.config()
        per_file = counts(ref.file.name for ref in ck.tensors.values())
        details = {
            "format": ck.format,
            "files": [{"name": f.name, "bytes": f.stat().st_size, "tensors": per_file.get(f.name, 0)}
                      for f in sorted(ck.files, key=lambda f: f.name)],
            "index": ck.index_file.name if ck.index_file is not None else None,
            "tensors": len(ck.tensors),
            "parameters": sum(numel(ref.shape) for ref in ck.tensors.values()),
            "bytes": sum(ref.nbytes for ref in ck.tensors.values()),
            "dtypes": counts(ref.dtype for ref in ck.tensors.values()),
            "quantization": quantization(ck.tensors, config),
            "config": {k: config[k] for k in CONFIG_KEYS if k in config} if config else None,
            "carried_over": [p.name for p in ck.extra_files],
            "not_carried_over": list(ck.skipped_files),
        }
    finally:
        ck.close()
    return details


def text(d: dict) -> list[str]:
    cfg = d["config"] or {}
    lines = []
    if cfg:
        arch = ", ".join(cfg.get("architectures") or []) or cfg.get("model_type", "?")
        lines.append(f"model: {arch}" + (f" ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']})"
                                         if "num_hidden_layers" in cfg and "hidden_size" in cfg else ""))
    lines.append(f"{d['tensors']} tensors, {d['parameters']:,} parameters, {human_bytes(d['bytes'])} "
                 f"({', '.join(f'{k} x{v}' for k, v in d['dtypes'].items())})")
    lines.append(f"{len(d['files'])} file(s)" + (f" + {d['index']}" if d["index"] else "") + ": "
                 + ", ".join(f["name"] for f in d["files"][:6]) + (" ..." if len(d["files"]) > 6 else ""))
    q = d["quantization"]
    lines.append("quantization: " + ("none" if q is None else
                                     f"{q['method']} ({', '.join(f'{k}: {v} tensors' for k, v in q['tensors'].items())})"
                                     if q["tensors"] else f"{q['method']} (from config.json)"))
    if d["not_carried_over"]:
        lines.append("not carried over by a merge: " + ", ".join(d["not_carried_over"]))
    return lines


CHECKPOINT = Kind("checkpoint", _claims, describe, text, noun="checkpoint")
