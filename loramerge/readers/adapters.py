"""Read adapters of any supported format, telling the format from the files: a PEFT directory,
a loralib checkpoint or a kohya file. Everything downstream sees normalized Adapter records."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError, UsageError
from ..types import Adapter
from . import kohya, loralib, tuners
from .files import load_adapter_file
from .peft import read_config, read_peft_adapter


def load_adapters(paths, lora_alpha: float | None = None, fan_in_fan_out: bool | None = None,
                  enable_lora: tuple[bool, ...] | None = None, only: str | None = None) -> list[Adapter]:
    """Read adapters of any supported format (PEFT directory, loralib or kohya file). `only` keeps
    the targets whose module path (or kohya key) starts with that prefix, e.g. 'lora_unet_'."""
    adapters = []
    for p in map(Path, paths):
        adapter = read_adapter(p, lora_alpha, fan_in_fan_out, enable_lora)
        if only is not None:
            adapter.pairs = [q for q in adapter.pairs if q.module.startswith(only)]
            adapter.replacements = {k: v for k, v in adapter.replacements.items() if k.startswith(only)}
            adapter.tokens = [tr for tr in adapter.tokens if tr.target.startswith(only)]
            if not adapter.pairs and not adapter.replacements and not adapter.tokens:
                raise UsageError(f"{p}: --only {only!r} keeps none of the adapter's targets")
        adapters.append(adapter)
    return adapters


def read_adapter(path: Path, lora_alpha=None, fan_in_fan_out=None, enable_lora=None) -> Adapter:
    """Tell the format by its files and keys: a directory with adapter_config.json is PEFT (LoRA, or
    by its peft_type another tuner: readers/tuners.py); a weights file is loralib
    (`*.lora_A`/`*.lora_B` keys) or kohya (`lora_unet_*`/`lora_te_*`)."""
    if path.is_dir() or path.name.startswith("adapter_model."):
        if path.is_dir() and not (path / "adapter_config.json").exists():
            files = [f for f in path.iterdir() if f.suffix in (".safetensors", ".pt", ".bin", ".pth")]
            if len(files) == 1:
                return read_adapter(files[0], lora_alpha, fan_in_fan_out, enable_lora)
        given = [o for o, v in (("--lora-alpha", lora_alpha), ("--fan-in-fan-out", fan_in_fan_out),
                                ("--enable-lora", enable_lora)) if v is not None]
        if given:
            raise UsageError(f"{path}: {', '.join(given)} are for loralib checkpoints; a PEFT adapter stores "
                             "its own settings in adapter_config.json")
        root, cfg_path, config = read_config(path)
        if str(config.get("peft_type", "LORA")).upper() in tuners.PEFT_TYPES:
            return tuners.read_tuner_adapter(path, root, cfg_path, config)
        return read_peft_adapter(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter not found")
    tensors = load_adapter_file(path)
    if kohya.looks_like_kohya(tensors):
        return kohya.read_kohya(path, tensors)
    if loralib.looks_like_loralib(tensors):
        return loralib.read_loralib(path, tensors, lora_alpha, fan_in_fan_out, enable_lora)
    raise AdapterError(f"{path}: not a recognized adapter: expected a PEFT directory (adapter_config.json), "
                       f"a loralib checkpoint (*.lora_A/*.lora_B) or a kohya file (lora_unet_*); first key: "
                       f"{next(iter(tensors), '(none)')!r}")


def detect_format(path: Path) -> str | None:
    """'peft', 'kohya', 'loralib', or None when `path` is not an adapter: read_adapter's tests,
    from file names and tensor names only (a safetensors header, not its data). Used by
    `inspect` to tell adapters from checkpoints; a new adapter format adds its test here and its
    reader in read_adapter."""
    path = Path(path)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return "peft"
        files = [f for f in path.iterdir() if f.suffix in (".safetensors", ".pt", ".bin", ".pth")]
        return detect_format(files[0]) if len(files) == 1 else None
    if not path.is_file():
        return None
    if path.name.startswith("adapter_model.") and (path.parent / "adapter_config.json").is_file():
        return "peft"
    if path.suffix == ".safetensors":
        from .checkpoint import read_safetensors_header

        keys = list(read_safetensors_header(path)[0])
    elif path.suffix in (".pt", ".bin", ".pth"):
        keys = list(load_adapter_file(path))
    else:
        return None
    if kohya.looks_like_kohya(keys):
        return "kohya"
    if loralib.looks_like_loralib(keys):
        return "loralib"
    return None
