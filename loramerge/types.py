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

# Dtypes the merge math may write. float8 bases are quantized: merging into them is refused.
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

    @property
    def group_rank(self) -> int:
        return self.rank // sum(self.groups) if self.groups else self.rank

    @property
    def target_name(self) -> str:
        return self.target or self.module + ".weight"


@dataclass
class Adapter:
    path: Path
    format: str
    pairs: list[LoraPair]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    config: dict = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list)
    # Full tensors that replace base tensors (PEFT modules_to_save, saved embedding base layers,
    # trained biases): base tensor name as the training code saw it -> key in `tensors`.
    replacements: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Term:
    """One adapter's contribution to one output tensor. `weight` is the user's c_i; the
    effective factor is weight * pair.scale. kind 'lora' adds a low-rank delta to a weight (or,
    with pair.magnitude_key, applies DoRA), 'bias' adds scale * lora_B.bias to a bias, 'replace'
    substitutes the adapter's full tensor `key` for the base tensor (applied before any delta)."""

    adapter: int
    pair: LoraPair | None
    weight: float
    kind: str = "lora"
    key: str | None = None

    @property
    def factor(self) -> float:
        return self.weight * self.pair.scale


@dataclass(frozen=True)
class Job:
    """One output tensor: the base tensor `source`, cast to `dtype`, plus `terms`.
    No terms and dtype == source dtype means a bit-for-bit copy."""

    name: str
    source: TensorRef
    dtype: str
    terms: tuple[Term, ...] = ()
    out_shape: tuple[int, ...] | None = None   # set when a replacement changes the shape

    @property
    def shape(self) -> tuple[int, ...]:
        return self.out_shape or self.source.shape

    @property
    def replacement(self) -> Term | None:
        return next((t for t in self.terms if t.kind == "replace"), None)

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)

    @property
    def kind(self) -> str:
        if self.terms:
            return "merge"
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

    @property
    def jobs(self) -> list[Job]:
        return [j for f in self.files for j in f.jobs]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)
