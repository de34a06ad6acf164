"""What verify's own reading yields: terms per output tensor, and the recipe weights.py uses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RefTerm:
    """One adapter's contribution to one output tensor, as verify reads it.

    kind 'lora': scale * left @ right in linear orientation (the factors in the file's dtype: the
    users convert, so a large adapter is not held twice in float64), DoRA when `magnitude` is set; 'bias': scale * `value` added to a bias; 'replace': `value` stands in for the tensor."""

    adapter: int
    module: str                          # the adapter's own name for it (for messages)
    kind: str
    how: str                             # where the scale comes from, for messages
    scale: float = 1.0
    left: torch.Tensor | None = None     # [out, r]
    right: torch.Tensor | None = None    # [r, in] (in: all columns of the 2-D view)
    layout: str = "linear"               # linear | transposed | conv
    magnitude: torch.Tensor | None = None
    value: torch.Tensor | None = None
    wanted: str = ""                     # the tensor name the adapter gives (kohya: flattened module)
    flat: bool = False
    options: dict = field(default_factory=dict)   # loralib: fan_in_fan_out, enable_lora
    name: str = ""                       # the output tensor it lands on, once placed


@dataclass
class Reading:
    """Everything verify's own reading found in the adapters, placed on output tensors."""

    terms: dict[str, list[RefTerm]] = field(default_factory=dict)   # output name -> terms
    covered: set[int] = field(default_factory=set)                   # adapters read here
    skipped: dict[int, str] = field(default_factory=dict)            # adapter -> why not read here
    partial: dict[int, str] = field(default_factory=dict)            # adapter -> what parts were not
    unplaced: list[tuple[str, str]] = field(default_factory=list)    # (module, why) not placed


@dataclass
class JobRef:
    """The expected-value recipe verify's own reading gives one output tensor: the LoRA terms and
    bias deltas of the adapters in `covered` (weight and scale folded into the factor), in
    linear orientation. weights.py uses it in place of apply's reading of those adapters."""

    transposed: bool | None = None
    covered: set[int] = field(default_factory=set)
    lora: list[tuple[tuple[torch.Tensor, torch.Tensor], float]] = field(default_factory=list)
    magnitude: torch.Tensor | None = None
    bias: list[torch.Tensor] = field(default_factory=list)
