"""Metadata-only records shared by readers, plan, engine and writers. No tensor data lives here
(Adapter carries its small LoRA tensors, which readers load eagerly: adapters are small)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

# safetensors dtype codes <-> torch dtypes. Only dtypes torch can represent are listed.
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        ST_TO_TORCH[_code] = getattr(torch, _name)
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

# Dtypes the merge math may write. Quantized tensors go through a codec (types.Codec).
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def itemsize(code: str) -> int:
    return torch.empty((), dtype=ST_TO_TORCH[code]).element_size()


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class TensorRef:
    """Where one base tensor lives. `offset` is the absolute byte offset in a safetensors file;
    None for tensors from pickled .bin files, which are read through torch's mmap loader."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int | None
    nbytes: int


@dataclass(frozen=True)
class LoraPair:
    """One LoRA target, normalized by a reader: delta = scale * B @ A (+ scale * B.bias).

    Keys index Adapter.tensors. `module` is the module path as the training code saw it (PEFT:
    without 'base_model.model.'); `target` is the base tensor name the reader expects
    (module + '.weight' unless the format says otherwise). `layout` says how B @ A lands on the
    base tensor W (see engine/deltas.py): 'linear' W[out, in] += B @ A; 'transposed' W[in, out] +=
    (B @ A).T (GPT-2 Conv1D with fan_in_fan_out, embeddings); 'conv' W[out, in, *k] +=
    (B.flatten(1) @ A.flatten(1)).view(W.shape). `base_shape` is the W shape the factors imply.
    `magnitude_key` (DoRA) names the learned magnitude vector. `groups` (loralib MergedLinear,
    e.g. GPT-2's fused q/k/v with enable_lora=[True, False, True]) says which equal row groups of W
    the block-diagonal delta covers; `rank` then counts all groups' columns. Layout 'auto' and
    targets starting with 'flat:' are placeholders a reader resolves against the base in the plan.
    """

    module: str
    a_key: str
    b_key: str
    bias_key: str | None
    rank: int
    alpha: float
    scale: float
    base_shape: tuple[int, ...]
    layout: str = "linear"
    target: str = ""
    magnitude_key: str | None = None
    groups: tuple[bool, ...] | None = None
    # One expert's share of a PEFT ParamWrapper (a ParamTarget expanded by the plan): the factors
    # hold `experts` experts (engine/deltas.py slices expert `expert` out of them), `out_rows` the
    # rows of that expert's delta this tensor holds (gate or up of a fused gate_up_proj), and
    # `stacked` says W is the fused [E, ...] tensor whose slice W[expert] the delta lands in.
    experts: int = 0
    expert: int = 0
    out_rows: tuple[int, int] | None = None
    stacked: bool = False

    term_kind = "lora"  # the Term kind the plan gives this record (TunerTarget: 'delta' or 'scale')

    @property
    def group_rank(self) -> int:
        return self.rank // sum(self.groups) if self.groups else self.rank

    @property
    def target_name(self) -> str:
        return self.target or self.module + ".weight"


@dataclass(frozen=True)
class TunerTarget:
    """One target of a PEFT tuner other than LoRA, normalized by a reader (readers/tuners.py,
    readers/lycoris.py); its math is engine/tuners.py. Lives in Adapter.pairs beside LoRA pairs.

    `tuner` names the math: 'adalora' and 'vera' add a low-rank delta, 'loha' and 'lokr' a dense
    one (Hadamard / Kronecker products), all linear in the adapter (Term kind 'delta'); 'ia3'
    multiplies W by a learned vector along one axis (Term kind 'scale'). `keys` maps the tuner's
    tensor roles (engine/tuners.py lists them) to keys of Adapter.tensors. `scale` is the constant
    factor of the delta (alpha/r, AdaLoRA's alpha/ranknum; 1 for IA3 and VeRA). `axis` (IA3) is
    'out' (output units; the bias is scaled too) or 'in' (inputs: PEFT's feedforward_modules).
    `base_shape` is what the tensors tell of W's shape, 0 where they cannot (IA3 and VeRA see one
    axis; flattened conv factors only W's 2-D view): the plan resolves it against the base
    (readers/tuners.resolve) before anything uses it. `layout` is as for LoraPair. `origin` is
    'peft' or 'lycoris' (kohya-named files): the implementation whose math defines the delta where
    the two differ (LoKr on Conv1d with a full w2).
    """

    module: str
    tuner: str
    keys: tuple[tuple[str, str], ...]
    scale: float
    base_shape: tuple[int, ...]
    layout: str = "linear"
    rank: int = 0
    alpha: float = 0.0
    target: str = ""
    axis: str = ""
    origin: str = "peft"
    # LoRA-only features, absent here: lets the plan and --dry-run treat both records alike
    bias_key = None
    magnitude_key = None
    groups = None
    experts = 0
    stacked = False

    def key(self, role: str) -> str | None:
        return next((k for r, k in self.keys if r == role), None)

    @property
    def term_kind(self) -> str:
        return "scale" if self.tuner == "ia3" else "delta"

    @property
    def target_name(self) -> str:
        return self.target or self.module + ".weight"


@dataclass(frozen=True)
class ParamTarget:
    """A PEFT LoRA on an nn.Parameter (LoraConfig.target_parameters, PEFT's ParamWrapper), as the
    reader finds it, before the base is known: typically the MoE experts transformers 5 holds fused
    in memory (`mlp.experts.gate_up_proj` [E, 2I, H]). `module` is the parameter's in-memory path
    (module path + '.' + `param`, without PEFT's prefix and nested base_layer); lora_A is
    [rank * experts, in_features] (expert-major rows), lora_B [out_features, rank * experts]
    (rank-major columns). Which checkpoint tensors it lands on (one per expert, or the fused one)
    depends on the architecture: the plan resolves it (plan/experts.py, tables in
    readers/experts.py) into LoraPairs, one per expert and tensor."""

    module: str
    param: str
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    experts: int
    in_features: int
    out_features: int
    depth: int = 0          # ParamWrappers inside this one on the same module (the keys' base_layer count)
    layout: str = "experts"
    bias_key = None
    magnitude_key = None
    groups = None
    stacked = False
    term_kind = "lora"

    @property
    def target_name(self) -> str:
        return self.module

    @property
    def base_shape(self) -> tuple[int, int, int]:
        """[E, out, in] as PEFT sees the parameter (a transposed module holds it [E, in, out])."""
        return (self.experts, self.out_features, self.in_features)


@dataclass(frozen=True)
class TokenRows:
    """PEFT TrainableTokens (trainable_token_indices, beside LoRA): rows `indices` of the tensor
    `target` (named as the training code saw it: an input embedding or an lm_head) become the
    adapter's tensor `key` [len(indices), dim]. Not a delta: the trained rows are the new values."""

    target: str
    key: str
    indices: tuple[int, ...]


@dataclass
class Adapter:
    path: Path
    format: str
    pairs: list[LoraPair | TunerTarget | ParamTarget]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    config: dict = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list)
    # Full tensors that replace base tensors (PEFT modules_to_save, saved embedding base layers,
    # trained biases): base tensor name as the training code saw it -> key in `tensors`.
    replacements: dict[str, str] = field(default_factory=dict)
    tokens: list[TokenRows] = field(default_factory=list)

    @property
    def label(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Term:
    """One adapter's contribution to one output tensor. `weight` is the user's c_i; the
    effective factor is weight * pair.scale. kind 'lora' adds a low-rank delta to a weight (or,
    with pair.magnitude_key, applies DoRA), 'bias' adds scale * lora_B.bias to a bias, 'replace'
    substitutes the adapter's full tensor `key` for the base tensor (applied before any delta).
    With a TunerTarget: 'delta' adds weight * scale * its delta (AdaLoRA, LoHa, LoKr, VeRA);
    'scale' multiplies the weight or bias by IA3's vector to the power `weight` (1 merges, -1
    divides it out again). 'rows' writes the adapter's tensor `key` into rows `rows` of the tensor
    (trainable tokens), after any replacement and before any delta."""

    adapter: int
    pair: LoraPair | TunerTarget | None
    weight: float
    kind: str = "lora"
    key: str | None = None
    rows: tuple[int, ...] | None = None

    @property
    def factor(self) -> float:
        return self.weight * self.pair.scale


@dataclass(frozen=True)
class Codec:
    """How stored tensors become values (a job's `decode`) or values become stored tensors (its
    `encode`); the math lives in loramerge.codecs. kind 'fp8': float8_e4m3fn + float32
    weight_scale_inv per `block` (rows, cols); 'bnb4': a bitsandbytes 4-bit checkpoint (packed
    codes, absmax, quant_map[, nested_absmax, nested_quant_map]; `dtype`, `offset` and `shape`
    from its quant_state); 'qlora': a plain float weight seen through bitsandbytes'
    quantize/dequantize (what a QLoRA adapter was trained against)."""

    kind: str
    block: tuple[int, int] = (0, 0)
    quant_type: str = ""               # bnb4/qlora: 'nf4' | 'fp4'
    blocksize: int = 64
    double_quant: bool = False
    nested_blocksize: int = 256
    offset: float = 0.0                # bnb4 with double quantization: absmax's stored mean
    dtype: str = ""                    # bnb4: the dtype bitsandbytes dequantizes to
    kernel: str = "cuda"               # qlora: which bitsandbytes backend's rounding to reproduce

    def label(self) -> str:
        if self.kind == "fp8":
            return f"fp8 e4m3, {self.block[0]}x{self.block[1]} blocks"
        dq = ", double-quantized absmax" if self.double_quant else ""
        if self.kind == "bnb4":
            return f"bitsandbytes {self.quant_type}, blocksize {self.blocksize}{dq}"
        return f"QLoRA base: {self.quant_type} round trip, blocksize {self.blocksize}{dq}, {self.kernel} kernel"


@dataclass(frozen=True)
class Output:
    """A further tensor a job writes after its main one (e.g. an FP8 weight's scales)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class Job:
    """One unit of work: the output tensor `name` from the base tensor `source`, cast to `dtype`,
    plus `terms`. No terms, no codecs and dtype == source dtype means a bit-for-bit copy.

    A job may read further base tensors (`inputs`, after source: an FP8 weight's scales, a
    bitsandbytes weight's absmax and code tables) and write further tensors (`outputs`, right
    after `name` in the same file: the requantized weight's fresh scales). `decode` turns the
    stored tensors into the values the float math starts from, `encode` turns its result back
    into stored tensors; None means plain floats."""

    name: str
    source: TensorRef
    dtype: str
    terms: tuple[Term, ...] = ()
    out_shape: tuple[int, ...] | None = None   # set when a replacement or a codec changes the shape
    inputs: tuple[TensorRef, ...] = ()
    outputs: tuple[Output, ...] = ()
    decode: Codec | None = None
    encode: Codec | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.out_shape or self.source.shape

    @property
    def replacement(self) -> Term | None:
        return next((t for t in self.terms if t.kind == "replace"), None)

    @property
    def main_nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.main_nbytes + sum(o.nbytes for o in self.outputs)

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        """(name, dtype, shape, nbytes) of every tensor the job writes, in file order."""
        return [(self.name, self.dtype, self.shape, self.main_nbytes)] + [
            (o.name, o.dtype, o.shape, o.nbytes) for o in self.outputs]

    @property
    def kind(self) -> str:
        if self.terms:
            return "merge"
        if self.decode is not None or self.encode is not None:
            return "cast"
        return "copy" if self.dtype == self.source.dtype else "cast"


@dataclass
class OutputFile:
    name: str
    jobs: list[Job]

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


@dataclass
class Plan:
    base_path: Path
    adapter_paths: list[Path]
    files: list[OutputFile]
    indexed: bool                      # write model.safetensors.index.json
    single_file: bool                  # OUT is a .safetensors file, not a directory
    extra_files: list[Path]            # non-weight files copied from the base directory
    skipped_files: list[str]           # base directory entries deliberately not copied
    config_updates: dict
    warnings: list[str]
    # matching problems, kept (not raised) only by build_plan(strict=False), e.g. for `inspect --base`
    problems: list[str] = field(default_factory=list)
    config_removals: list[str] = field(default_factory=list)   # config.json keys the output drops
    # output tensors that stay tied to another and take its changes (an lm_head sharing the input
    # embedding's trained token rows): not written, the model ties them on load -> the tensor
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def jobs(self) -> list[Job]:
        return [j for f in self.files for j in f.jobs]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)
