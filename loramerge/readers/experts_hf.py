"""An ExpertLayout read off transformers' own conversion mapping, for architectures the tables in
experts.py do not list, when transformers is installed (it never is needed otherwise: this module
is imported only for such an architecture).

Only the forms the tables use are understood: literal renames of module path fragments
(WeightRenaming), and per-expert tensors stacked by MergeModulelist(dim=0), several parts then
joined by Concatenate(dim=1) ([E, out, in], not transposed). Anything else (transposes, splits,
regular expressions, quantized experts) yields None: the plan then names the missing mapping.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .experts import NESTING_ORDER, ExpertLayout, ExpertParam

_LITERAL = re.compile(r"^[\w.]*$")
_SOURCE = re.compile(r"^(?P<pre>[\w.]*?)experts\.\*\.(?P<part>\w+)\.weight$")
_TARGET = re.compile(r"^(?P<pre>[\w.]*?)experts\.(?P<param>\w+)$")


@lru_cache(maxsize=None)
def derive(model_type: str) -> ExpertLayout | None:
    try:
        from transformers import conversion_mapping
    except ImportError:
        return None
    key = getattr(conversion_mapping, "_MODEL_TO_CONVERSION_PATTERN", {}).get(model_type, model_type)
    try:
        transforms = conversion_mapping.get_checkpoint_conversion_mapping(key) or []
    except Exception:  # noqa: BLE001 - a transformers version whose mapping we cannot read: no layout
        return None
    renames, params = [], []
    for t in transforms:
        sources = list(getattr(t, "_original_source_patterns", t.source_patterns))
        targets = list(getattr(t, "_original_target_patterns", t.target_patterns))
        ops = getattr(t, "operations", None)
        if ops is None:  # a renaming
            if len(sources) != 1 or len(targets) != 1 or not (_LITERAL.match(sources[0]) and _LITERAL.match(targets[0])):
                return None
            renames.append((targets[0], sources[0]))  # (in memory, checkpoint)
            continue
        param = _param(sources, targets, ops)
        if param is None:
            return None
        params.append(param)
    if not params or any(p.name not in NESTING_ORDER for p in params):
        return None
    params.sort(key=lambda p: NESTING_ORDER.index(p.name))
    return ExpertLayout(f"{model_type} (from transformers' conversion mapping)", tuple(params),
                        renames=tuple(renames))


def _param(sources: list[str], targets: list[str], ops) -> ExpertParam | None:
    names = [type(o).__name__ for o in ops]
    dims = [getattr(o, "dim", None) for o in ops]
    want = [("MergeModulelist", 0)] + ([("Concatenate", 1)] if len(sources) > 1 else [])
    if list(zip(names, dims)) != want or len(targets) != 1:
        return None
    target = _TARGET.match(targets[0])
    parts = [_SOURCE.match(s) for s in sources]
    if target is None or not all(parts) or any(p.group("pre") != target.group("pre") for p in parts):
        return None
    return ExpertParam(target.group("param"), tuple(p.group("part") for p in parts))
