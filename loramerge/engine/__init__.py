"""The engine executes a plan: pipeline.run streams every job through compute (the math of one
output tensor, with ops/kernels/deltas) into the writers, on the devices resolve_devices picks."""

from .compute import compute
from .devices import resolve_device, resolve_devices, warm_up
from .pipeline import EngineStats, run
from .threads import BufferPool

__all__ = ["run", "EngineStats", "BufferPool", "compute", "resolve_device", "resolve_devices", "warm_up"]
