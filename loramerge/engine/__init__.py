"""The engine executes a plan: pipeline.run streams every job through compute (the math of one
output tensor, with ops/kernels/deltas) into the writers, on the devices resolve_devices picks.

The names below are loaded on first use: importing a submodule (the premerge worker imports the
kernels, in a process without torch) must not import the pipeline, and with it torch."""

import importlib

_WHERE = {"compute": "job_math", "resolve_device": "devices", "resolve_devices": "devices", "warm_up": "devices",
          "run": "pipeline", "EngineStats": "pipeline", "BufferPool": "threads"}

__all__ = ["run", "EngineStats", "BufferPool", "compute", "resolve_device", "resolve_devices", "warm_up"]


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
