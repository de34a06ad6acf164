"""Which devices a merge runs on: --device auto|cpu|cuda|cuda:N|cuda:all|a,b."""

from __future__ import annotations

import threading

import torch

from ..errors import LoraMergeError


def resolve_device(device: str) -> torch.device:
    """The one device for single-device work (verify, ONNX): the first of resolve_devices()."""
    return resolve_devices(device)[0]


def resolve_devices(device: str) -> list[torch.device]:
    """'auto' (first GPU, else CPU), 'cpu', 'cuda', 'cuda:N', 'cuda:all' or a comma-separated list.
    Several devices share the tensors; the output order never changes."""
    if device == "auto":
        return [torch.device("cuda:0" if torch.cuda.is_available() else "cpu")]
    if device == "cuda:all":
        if not torch.cuda.is_available():
            raise LoraMergeError("--device cuda:all: CUDA is not available here; use --device cpu")
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    devices = []
    for name in device.split(","):
        try:
            dev = torch.device(name.strip())
        except RuntimeError as e:
            raise LoraMergeError(f"--device {name!r}: not a device name; use auto, cpu, cuda, cuda:N or cuda:all") from e
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise LoraMergeError(f"--device {name}: CUDA is not available here; use --device cpu")
            if dev.index is None:
                dev = torch.device("cuda:0")
            if dev.index >= torch.cuda.device_count():
                raise LoraMergeError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) present")
        elif dev.type != "cpu":
            raise LoraMergeError(f"--device {name}: only cpu and cuda are supported")
        devices.append(dev)
    if len(set(devices)) != len(devices):
        raise LoraMergeError(f"--device {device}: a device is listed twice")
    return devices


def warm_up(devices: list[torch.device]) -> None:
    """Start each GPU's context on a thread of its own (0.3-1 s) while the caller reads headers,
    plans and matches, instead of on the first merge, which the reader and writer would wait for;
    then run the merge's math once on a few elements per output dtype: cuBLAS's handle and the
    kernels load on first use, and the first 8B job took 0.85 s against ~60 ms for the next ones
    (H200, bench/trace_pipeline.py), a wait the writer no longer hid once a head start had copied
    the shard's first tensor. An error is left for the merge to meet and report."""
    def run(dev: torch.device) -> None:
        from .lowrank import merge

        try:
            torch.empty(1, device=dev)
            a, b = torch.ones(2, 8, device=dev), torch.ones(8, 2, device=dev)
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                merge(torch.ones(8, 8, dtype=dtype, device=dev), a, b, torch.ones(2, dtype=torch.float64),
                      dtype, torch.float32, 64)
            torch.cuda.synchronize(dev)
        except Exception:  # noqa: BLE001 - see the docstring
            pass

    for dev in devices:
        if dev.type == "cuda":
            threading.Thread(target=run, args=(dev,), name=f"loramerge-init-{dev}", daemon=True).start()
