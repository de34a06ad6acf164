"""Quantized base checkpoints: which stored tensors form one weight, and the codec that reads it.

Two layouts, recognized from config.json's quantization_config and checked tensor by tensor when
the checkpoint is opened (an unsupported variant is an error up front, never a silent copy):

- FP8, block-scaled (quant_method "fp8", fmt "e4m3", weight_block_size [bm, bn], as DeepSeek-V3
  and Qwen3-FP8 ship and transformers' FineGrainedFP8 loads): `X.weight` float8_e4m3fn with
  `X.weight_scale_inv` float32 [..., ceil(R/bm), ceil(C/bn)].
- bitsandbytes 4-bit (quant_method "bitsandbytes", load_in_4bit; the `*-bnb-4bit` repositories):
  `X.weight` packed codes, `X.weight.absmax`, `X.weight.quant_map`, with double quantization
  `X.weight.nested_absmax` and `X.weight.nested_quant_map`, and the JSON blob
  `X.weight.quant_state.bitsandbytes__nf4` (or __fp4) holding shape, dtype, blocksize and offset.
  The blob is a few hundred bytes: it is read here, as metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import CheckpointError
from ..types import Codec, TensorRef, numel

FP8_SCALE = "_scale_inv"          # X.weight -> X.weight_scale_inv
BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
BNB_STATE = "quant_state.bitsandbytes__"
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BNB_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The weight_scale_inv shape of an FP8 weight of `shape` with bm x bn blocks."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


@dataclass(frozen=True)
class QuantGroup:
    """One quantized weight: its stored tensors and how to read them."""

    weight: str
    parts: tuple[str, ...]          # companion tensors, in the order the codec takes them
    codec: Codec
    shape: tuple[int, ...]          # the weight's logical shape
    dropped: tuple[str, ...] = ()   # stored tensors the codec reads once at open time (quant_state)


@dataclass
class QuantLayout:
    method: str                                         # 'fp8' | 'bnb4'
    config: dict
    groups: dict[str, QuantGroup] = field(default_factory=dict)

    @property
    def companions(self) -> set[str]:
        return {p for g in self.groups.values() for p in (*g.parts, *g.dropped)}

    def describe(self) -> str:
        codec = next(iter(self.groups.values())).codec.label() if self.groups else self.method
        return f"{len(self.groups)} quantized weights ({codec})"


def detect(tensors: dict[str, TensorRef], config: dict | None, where, read_bytes) -> QuantLayout | None:
    """The quantized layout of a checkpoint, None for plain floats. `read_bytes(ref)` returns a
    small tensor's raw bytes (the bitsandbytes quant_state blobs). Raises CheckpointError with
    every problem found for a layout this tool cannot read exactly."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict):
        return None  # (FP8 tensors without a config stay plain tensors: copied, never merged into)
    method = qc.get("quant_method")
    if method == "fp8":
        return _fp8(tensors, qc, where)
    if method == "bitsandbytes":
        if qc.get("load_in_8bit"):
            raise CheckpointError(f"{where}: a bitsandbytes 8-bit (LLM.int8) checkpoint; loramerge reads bitsandbytes "
                                  "4-bit (NF4/FP4) and FP8 bases: merge into the unquantized base instead")
        if qc.get("load_in_4bit") or any(BNB_STATE in n for n in tensors):
            return _bnb4(tensors, qc, where, read_bytes)
    return None


def _fp8(tensors: dict[str, TensorRef], qc: dict, where) -> QuantLayout:
    problems = []
    fmt = qc.get("fmt", "e4m3")
    block = qc.get("weight_block_size")
    if fmt != "e4m3":
        problems.append(f"quantization_config fmt {fmt!r}: only e4m3 (float8_e4m3fn) FP8 is supported")
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        problems.append(f"quantization_config weight_block_size {block!r}: expected [rows, cols] of the scale blocks; "
                        "per-tensor or per-channel FP8 scales are not supported")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        problems.append(f"quantization_config activation_scheme {qc.get('activation_scheme')!r}: only 'dynamic' is "
                        "supported (static activation scales are calibrated for the unmerged weights)")
    if qc.get("scale_fmt") not in (None, "float"):
        problems.append(f"quantization_config scale_fmt {qc.get('scale_fmt')!r}: only float32 scales are supported")
    layout = QuantLayout("fp8", qc)
    if problems:
        raise CheckpointError(f"{where}: an FP8 checkpoint in a layout loramerge does not support", problems)
    block = tuple(block)
    codec = Codec("fp8", block=block)
    for name, ref in tensors.items():
        if ref.dtype == "F8_E5M2":
            problems.append(f"{name}: float8_e5m2; only float8_e4m3fn FP8 weights are supported")
        elif ref.dtype == "F8_E4M3":
            sname = name + FP8_SCALE
            sref = tensors.get(sname)
            want = scale_shape(ref.shape, block) if len(ref.shape) >= 2 else None
            if want is None:
                problems.append(f"{name}: an FP8 tensor of shape {list(ref.shape)}; block-scaled weights have 2 or "
                                "more dimensions")
            elif sref is None:
                problems.append(f"{name}: FP8 weight without {sname}; expected float32 scales {list(want)}")
            elif sref.dtype != "F32" or sref.shape != want:
                problems.append(f"{sname}: {sref.dtype} {list(sref.shape)}, expected F32 {list(want)} (one scale per "
                                f"{block[0]}x{block[1]} block of {list(ref.shape)}); per-channel or per-tensor scales "
                                "are not supported")
            else:
                layout.groups[name] = QuantGroup(name, (sname,), codec, ref.shape)
        elif name.endswith(FP8_SCALE) and tensors.get(name[: -len(FP8_SCALE)], ref).dtype != "F8_E4M3":
            problems.append(f"{name}: a scale without an FP8 weight {name[: -len(FP8_SCALE)]}")
    if problems:
        raise CheckpointError(f"{where}: FP8 tensors loramerge cannot read exactly", problems)
    return layout


def _bnb4(tensors: dict[str, TensorRef], qc: dict, where, read_bytes) -> QuantLayout:
    layout = QuantLayout("bnb4", qc)
    problems = []
    for name in tensors:
        head, sep, qtype = name.partition("." + BNB_STATE)
        if not sep:
            continue
        try:
            state = json.loads(bytes(read_bytes(tensors[name])).decode("utf-8"))
            group = _bnb_group(head, qtype, state, tensors)
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"{name}: {e}")
            continue
        if isinstance(group, str):
            problems.append(group)
        else:
            layout.groups[head] = group
    covered = layout.companions | set(layout.groups)
    for name, ref in tensors.items():
        if ref.dtype == "U8" and name not in covered and (name.endswith(".weight") or any(
                name.endswith("." + p) for p in BNB_PARTS)):
            problems.append(f"{name}: packed 4-bit data without a complete quant_state; the checkpoint is incomplete")
    if problems:
        raise CheckpointError(f"{where}: bitsandbytes 4-bit tensors loramerge cannot read exactly", problems)
    return layout


def _bnb_group(head: str, qtype: str, state: dict, tensors: dict[str, TensorRef]) -> QuantGroup | str:
    """One bitsandbytes weight from its quant_state, with every size checked against the tensors."""
    quant_type, blocksize, dtype = state["quant_type"], int(state["blocksize"]), state["dtype"]
    shape = tuple(int(d) for d in state["shape"])
    nested = "nested_absmax" in state or head + ".nested_absmax" in tensors
    if quant_type != qtype or quant_type not in ("nf4", "fp4"):
        return f"{head}: quant_state says {quant_type!r} under the key for {qtype!r}"
    if blocksize not in BNB_BLOCKSIZES or dtype not in BNB_DTYPES:
        return f"{head}: quant_state blocksize {blocksize} / dtype {dtype!r} is not one bitsandbytes writes"
    parts = [f"{head}.absmax", f"{head}.quant_map"] + ([f"{head}.nested_absmax", f"{head}.nested_quant_map"]
                                                       if nested else [])
    missing = [p for p in [head, *parts] if p not in tensors]
    if missing:
        return f"{head}: missing {', '.join(missing)}"
    n = numel(shape)
    blocks = -(-n // blocksize)
    nested_bs = int(state.get("nested_blocksize", 256))
    want = {head: (n + 1) // 2, parts[0]: blocks * (1 if nested else 4), parts[1]: 64}
    if nested:
        want.update({parts[2]: 4 * -(-blocks // nested_bs), parts[3]: 1024})
    for p, nbytes in want.items():
        if tensors[p].nbytes != nbytes:
            return (f"{p}: {tensors[p].nbytes} bytes, expected {nbytes} for a {quant_type} weight of shape "
                    f"{list(shape)} (blocksize {blocksize}); the checkpoint is corrupt or from another bitsandbytes")
    codec = Codec("bnb4", quant_type=quant_type, blocksize=blocksize, double_quant=nested,
                  nested_blocksize=nested_bs, offset=float(state.get("nested_offset", 0.0)),
                  dtype=BNB_DTYPES[dtype])
    return QuantGroup(head, tuple(parts), codec, shape, dropped=(f"{head}.{BNB_STATE}{qtype}",))
