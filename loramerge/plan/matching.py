"""Adapter module paths -> base tensor names: exact, by unique dot-suffix in either direction
(wrapper vs bare model checkpoints), or kohya's flattened names (by suffix either way, too).
One prefix rewrite for all."""

from __future__ import annotations


class ModuleMatcher:
    """Maps an adapter module path to one base module (tensor name without '.weight').

    Users train on a wrapper (LlamaForCausalLM: 'model.layers.0...') and merge into a checkpoint
    saved from the bare model ('layers.0...'), or the reverse. We accept an exact match, else the
    unique match where one path is a dot-suffix of the other, and require that every non-exact
    match used the same prefix rewrite (so two different modules can never be conflated).
    """

    def __init__(self, base_names):
        self.modules = {n[: -len(".weight")] for n in base_names if n.endswith(".weight")}
        self._by_suffix = _suffix_index(self.modules, ".", first=1)  # proper suffixes only
        self.rewrites: dict[tuple[str, str], list[str]] = {}
        self._flat: dict[str, list[str]] | None = None
        self._flat_whole: dict[str, list[str]] = {}

    def match(self, module: str) -> tuple[str | None, list[str]]:
        """(base module or None, candidates when ambiguous)."""
        if module in self.modules:
            return module, []
        parts = module.split(".")
        for k in range(1, len(parts)):  # adapter path longer: strip its leading components
            tail = ".".join(parts[k:])
            if tail in self.modules:
                self.rewrites.setdefault((".".join(parts[:k]) + ".", ""), []).append(module)
                return tail, []
        longer = self._by_suffix.get(module, [])  # base path longer: base has an extra prefix
        if len(longer) == 1:
            self.rewrites.setdefault(("", longer[0][: -len(module)]), []).append(module)
            return longer[0], []
        return None, sorted(longer)

    def match_flat(self, flat: str) -> tuple[str | None, list[str]]:
        """kohya-style names: dots flattened to underscores, matched against the base flattened
        the same way. Exactly one base module must match: one whose flattened path ends with the
        name (single-file checkpoints nest the model under prefixes such as
        'model.diffusion_model.'), else one whose whole flattened path is what is left of the name
        without its leading components (a CLIP text encoder trained as 'text_model.encoder...',
        saved by transformers 5 as 'encoder...'). The split points of a flattened name are not
        known, so the name is cut at each underscore, longest rest first; only a whole base path
        may match the rest, so a bare component such as 'proj' never does."""
        if self._flat is None:
            self._flat = _suffix_index(self.modules, "_", first=0)  # every suffix, the whole path included
            self._flat_whole = {}
            for mod in self.modules:
                self._flat_whole.setdefault(mod.replace(".", "_"), []).append(mod)
        found = sorted(set(self._flat.get(flat, [])))
        if found:
            return (found[0], []) if len(found) == 1 else (None, found)
        parts = flat.split("_")
        for k in range(1, len(parts)):  # the adapter's name is longer: cut its leading components
            rest = "_".join(parts[k:])
            whole = sorted(self._flat_whole.get(rest, []))
            if len(whole) == 1:
                self.rewrites.setdefault(("_".join(parts[:k]) + "_", ""), []).append(flat)
                return whole[0], []
            if whole:
                return None, whole
        return None, []


def _suffix_index(modules, sep: str, first: int) -> dict[str, list[str]]:
    """Each module path's dot-boundary suffixes, from the one without `first` leading components
    on, joined with `sep` -> the modules that end that way."""
    index: dict[str, list[str]] = {}
    for mod in modules:
        parts = mod.split(".")
        for k in range(first, len(parts)):
            index.setdefault(sep.join(parts[k:]), []).append(mod)
    return index
