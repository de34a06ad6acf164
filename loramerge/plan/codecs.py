"""Codecs in the plan: which jobs read or write quantized tensors, and what travels with them.

- FP8 base, dtype auto: a merged weight becomes one job reading weight + weight_scale_inv and
  writing both back (requantized with fresh scales); untouched weights and their scales are
  plain copies, bit for bit. With --dtype: every FP8 weight is dequantized into the dtype, the
  scales are dropped, and so is quantization_config.
- bitsandbytes 4-bit base: every quantized weight is dequantized (to its quant_state dtype, or
  --dtype); absmax, code tables and quant_state are consumed by its job; quantization_config goes.
- --qlora on a plain base: a merged linear weight starts from its bitsandbytes round trip.
"""

from __future__ import annotations

from dataclasses import replace

from ..codecs import bnb4
from ..errors import UsageError
from ..readers.checkpoint import Checkpoint
from ..types import Codec, Job, Output, TensorRef

# bitsandbytes (via transformers) does not quantize these: embeddings are not nn.Linear, and the
# output embedding is in transformers' default modules_to_not_convert.
QLORA_SKIPS = ("lm_head.weight", "embed_tokens.weight", "wte.weight", "word_embeddings.weight",
               "embed_in.weight", "tok_embeddings.weight", "shared.weight", "embed_out.weight")


def qlora_codec(quant_type: str | None, double_quant: bool = True, kernel: str = "cuda") -> Codec | None:
    """The Codec of --qlora TYPE [--no-qlora-double-quant] [--qlora-kernel K], or None."""
    if quant_type is None:
        if not double_quant:
            raise UsageError("--no-qlora-double-quant applies to --qlora nf4|fp4; add --qlora or drop it")
        return None
    if quant_type not in bnb4.QUANT_TYPES:
        raise UsageError(f"--qlora {quant_type!r}: expected nf4 or fp4 (the bitsandbytes 4-bit type the adapter "
                         "was trained on: bnb_4bit_quant_type)")
    if kernel not in bnb4.KERNELS:
        raise UsageError(f"--qlora-kernel {kernel!r}: expected cuda or cpu")
    return Codec("qlora", quant_type=quant_type, blocksize=64, double_quant=double_quant, kernel=kernel)


def check_base(base: Checkpoint, qlora: Codec | None) -> list[str]:
    """Refuse a quantized layout loramerge cannot read, and --qlora where it cannot mean anything;
    warnings for where it is redundant."""
    if base.quant_error is not None:
        raise base.quant_error
    if qlora is None or base.quant is None:
        return []
    if base.quant.method == "fp8":
        raise UsageError(f"--qlora {qlora.quant_type}: {base.path} is an FP8 checkpoint; QLoRA quantizes a "
                         "floating-point base with bitsandbytes. Pass the bf16/fp16 base the adapter was trained on")
    stored = next(iter(base.quant.groups.values())).codec
    if stored.quant_type != qlora.quant_type:
        raise UsageError(f"--qlora {qlora.quant_type}: {base.path} is already quantized with bitsandbytes "
                         f"{stored.quant_type}; drop --qlora (the stored quantization is what the adapter saw) or "
                         "pass the unquantized base")
    return [f"{base.path} is already a bitsandbytes {stored.quant_type} checkpoint: merged into its stored "
            "quantization; --qlora adds nothing"]


def decodable(base: Checkpoint, name: str) -> bool:
    return base.quant is not None and name in base.quant.groups


def logical_shape(base: Checkpoint, name: str, ref: TensorRef) -> tuple[int, ...]:
    """The shape the model sees (a bitsandbytes weight is stored packed, [n/2, 1])."""
    group = base.quant.groups.get(name) if base.quant is not None else None
    return group.shape if group is not None else ref.shape


def consumed(base: Checkpoint, terms: dict, out_code: str | None) -> set[str]:
    """Base tensors that are not jobs of their own: read (and, for FP8, rewritten) by their
    weight's job, or dropped with the quantization."""
    quant = base.quant
    if quant is None:
        return set()
    if quant.method == "fp8" and out_code is None:  # only merged weights rewrite their scales
        return {p for name, g in quant.groups.items() if name in terms for p in g.parts}
    return quant.companions


def config_removals(base: Checkpoint, out_code: str | None) -> list[str]:
    quant = base.quant
    if quant is None or (quant.method == "fp8" and out_code is None):
        return []
    return ["quantization_config"]  # the output holds plain floats


def with_codecs(job: Job, base: Checkpoint, out_code: str | None, qlora: Codec | None) -> Job:
    """The job with the codecs (and the companion tensors) its base tensor needs."""
    group = base.quant.groups.get(job.name) if base.quant is not None else None
    if group is None:
        if qlora is not None and _qlora_target(job):
            return replace(job, decode=qlora)
        return job
    parts = tuple(base.tensors[p] for p in group.parts)
    codec = group.codec
    if codec.kind == "bnb4":
        return replace(job, dtype=out_code or codec.dtype, out_shape=job.out_shape or group.shape,
                       inputs=parts, decode=codec)
    if out_code is not None:  # FP8 -> plain floats
        return replace(job, dtype=out_code, inputs=parts, decode=codec)
    if not job.terms:
        return job  # untouched: the weight (and, as its own job, its scale) copied bit for bit
    scale = parts[0]
    return replace(job, dtype=job.source.dtype, inputs=parts, decode=None if job.replacement else codec,
                   encode=codec, outputs=(Output(scale.name, scale.dtype, scale.shape),))


def _qlora_target(job: Job) -> bool:
    """A weight bitsandbytes would have quantized: a linear-layout LoRA target of a Linear layer,
    not an embedding or lm_head (nor a weight the adapter replaces wholesale), nor a parameter
    PEFT adapted directly (target_parameters: MoE experts are 3-D parameters in memory, not
    Linear layers, so bitsandbytes left them unquantized)."""
    lora = [t for t in job.terms if t.kind == "lora"]
    return (bool(lora) and job.replacement is None and len(job.source.shape) == 2
            and all(t.pair.layout == "linear" and not t.pair.experts for t in lora)
            and not job.name.endswith(QLORA_SKIPS))
