"""The plan's state: what build_plan has decided so far, shared by its passes (build.py) and
the rules for particular kinds of target (tokens.py, experts.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..readers.checkpoint import Checkpoint
from ..types import Adapter, LoraPair, TensorRef, Term, TokenRows, TunerTarget
from .codecs import logical_shape
from .matching import ModuleMatcher

# Names of input-embedding tensors an output embedding (lm_head) can be tied to.
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                    "tok_embeddings.weight", "shared.weight")
OUTPUT_EMBEDDING = "lm_head.weight"


@dataclass(frozen=True)
class Target:
    """One adapter target and the output tensor `name` it resolved to: a LoRA pair, trained token
    `rows`, or (neither) the full tensor the adapter saves as `saved` under `key`."""

    adapter: int
    weight: float
    name: str
    pair: LoraPair | TunerTarget | None = None
    saved: str = ""
    key: str | None = None
    rows: TokenRows | None = None


class PlanState:
    """What build_plan has decided: the output tensors (the base's, plus `extra` ones it lacks,
    each starting from a base tensor), the terms on each, the shapes that change, and problems."""

    def __init__(self, base: Checkpoint, adapters: list[Adapter]):
        self.base = base
        self.adapters = adapters
        self.config = base.config() or {}
        self.matcher = ModuleMatcher(base.tensors)
        self.tied = tied_embeddings(base, self.config)
        self.untied = False                        # tie_word_embeddings must become false
        self.extra: dict[str, TensorRef] = {}      # output tensors the base lacks -> where they start
        self.aliases: dict[str, str] = {}          # tied, unwritten tensors that share another's changes
        self.terms: dict[str, list[Term]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.problems: list[str] = []

    def source(self, name: str) -> TensorRef | None:
        return self.base.tensors.get(name) or self.extra.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape `name` has before any LoRA delta: a replacement's, else its own; an extra
        tensor starts as the tensor it is split from (e.g. a resized embedding)."""
        if name in self.shapes:
            return self.shapes[name]
        if name in self.extra:
            origin = self.extra[name].name
            return self.shapes.get(origin, self.extra[name].shape)
        return logical_shape(self.base, name, self.base.tensors[name])

    def add(self, name: str, term: Term) -> None:
        self.terms.setdefault(name, []).append(term)


def tied_embeddings(base: Checkpoint, config: dict) -> tuple[str, ...] | None:
    """(input embedding name[, lm_head name]) when the base ties them, else None. Without an
    explicit tie_word_embeddings, a language-model checkpoint that stores no lm_head is tied
    (transformers' default is to tie; GPT-2 style configs omit the key)."""
    inputs = [n for n in base.tensors if n.endswith(INPUT_EMBEDDINGS)]
    if len(inputs) != 1:
        return None
    tie = config.get("tie_word_embeddings")
    if tie is None:
        lm = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                 for a in config.get("architectures") or [])
        tie = lm and OUTPUT_EMBEDDING not in base.tensors
    if not tie:
        return None
    return (inputs[0],) + ((OUTPUT_EMBEDDING,) if OUTPUT_EMBEDDING in base.tensors else ())
