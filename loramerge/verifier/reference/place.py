"""Which output tensor an adapter's target lands on, found by name alone.

PEFT and loralib name modules with dotted paths as the training code saw them; the checkpoint may
name the same tensor with a prefix more (a bare model inside a wrapper) or less (a wrapper's
weights saved bare). kohya flattens the dots of the path to underscores. Rules, in order: the exact
name; a name that is the adapter's with leading components removed (the longest such); the one
name that is the adapter's with components added in front. More than one candidate where one is
needed is ambiguous: the term is not placed, and verify reports it.
"""

from __future__ import annotations


def place_dotted(wanted: str, names) -> tuple[str | None, str]:
    """(output name, '') or (None, why) for a dotted tensor name such as 'model.layers.0.q.weight'."""
    if wanted in names:
        return wanted, ""
    shorter = [n for n in names if wanted.endswith("." + n)]
    if shorter:
        return max(shorter, key=len), ""
    longer = [n for n in names if n.endswith("." + wanted)]
    if len(longer) == 1:
        return longer[0], ""
    if longer:
        return None, f"matches {len(longer)} tensors ({', '.join(sorted(longer)[:3])}, ...)"
    return None, f"no tensor of the merge is named {wanted} or a prefixed/unprefixed variant of it"


def place_flat(wanted: str, names) -> tuple[str | None, str]:
    """(output name, '') or (None, why) for a kohya module name with its lora_unet_/lora_te_ prefix
    removed, e.g. 'down_blocks_0_attentions_0_proj_in': compared with every '.weight' tensor's
    module path flattened the same way."""
    flat = {n[: -len(".weight")].replace(".", "_"): n for n in names if n.endswith(".weight")}
    if wanted in flat:
        return flat[wanted], ""
    longer = [n for f, n in flat.items() if f.endswith("_" + wanted)]
    if len(longer) == 1:
        return longer[0], ""
    if longer:
        return None, f"matches {len(longer)} tensors ({', '.join(sorted(longer)[:3])}, ...)"
    shorter = [(len(f), n) for f, n in flat.items() if wanted.endswith("_" + f)]
    if shorter:
        return max(shorter)[1], ""
    return None, f"no tensor of the merge has a module path that flattens to {wanted}"
