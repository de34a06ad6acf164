"""The types of an adapter_config.json's fields, checked before any of them is used.

PEFT writes these fields itself, so a wrong type means a hand-edited, truncated-and-repaired or
foreign file. Every field the readers interpret (LoRA and the other tuners) is checked here for
its JSON type, and every pattern for whether it compiles the way PEFT uses it, so that a bad
value is one line naming the field, never a TypeError or re.error from deep inside matching.
What the values mean (r > 0, a supported bias mode, ...) is checked by the readers.
"""

from __future__ import annotations

import math
import re

NUMBERS = ("r", "lora_alpha", "init_r", "target_r", "alpha", "rank_dropout", "module_dropout", "lora_dropout")
BOOLS = ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "inference_mode", "use_effective_conv2d",
         "decompose_both", "save_projection")
NAME_LISTS = ("modules_to_save", "target_parameters")
PATTERNS = ("target_modules", "exclude_modules", "feedforward_modules")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _compiles(pattern: str, template: str = "{}") -> bool:
    try:
        re.compile(template.format(pattern))
        return True
    except (re.error, RecursionError, OverflowError):
        return False


def type_problems(config: dict) -> list[str]:
    """One line per field whose type (or pattern) cannot be what PEFT wrote."""
    problems = []

    def bad(key, want):
        problems.append(f"{key}={config[key]!r}: expected {want}")

    for key in NUMBERS:
        if config.get(key) is not None and not _number(config[key]):
            bad(key, "a finite number")
    for key in BOOLS:
        if config.get(key) is not None and not isinstance(config[key], bool):
            bad(key, "true or false")
    for key in NAME_LISTS:
        v = config.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            bad(key, "a list of module names")
    for key in PATTERNS:
        v = config.get(key)
        if v is None:
            continue
        if isinstance(v, str):
            if not _compiles(v):
                bad(key, "a regular expression that compiles, or a list of module names")
        elif not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            bad(key, "a regular expression or a list of module names")
    for key in ("rank_pattern", "alpha_pattern"):
        v = config.get(key)
        if v is None:
            continue
        ok_value = (lambda x: _number(x) or (isinstance(x, list) and all(isinstance(b, bool) for b in x))) \
            if key == "rank_pattern" else _number  # AdaLoRA keeps per-module rank masks in rank_pattern
        if not isinstance(v, dict) or not all(isinstance(k, str) and _compiles(k, r"(.*\.)?({})$") and ok_value(x)
                                              for k, x in v.items()):
            bad(key, "an object of module-name patterns (regular expressions that compile) to numbers")
    v = config.get("layers_to_transform")
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool)
                              or isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                                             for x in v)):
        bad("layers_to_transform", "a layer number or a list of them")
    v = config.get("layers_pattern")
    if v is not None and not (isinstance(v, str) and _compiles(v, r"(?:^|.*?\.){}\.")
                              or isinstance(v, list) and all(isinstance(x, str) and _compiles(x, r"(?:^|.*?\.){}\.")
                                                             for x in v)):
        bad("layers_pattern", "a name (or list of names) of the layers' container, e.g. 'layers'")
    for key in ("bias", "peft_type", "task_type"):
        if config.get(key) is not None and not isinstance(config[key], str):
            bad(key, "a string")
    v = config.get("init_lora_weights")
    if v is not None and not isinstance(v, (bool, str)):
        bad("init_lora_weights", "true, false or the name of an initialization")
    v = config.get("projection_prng_key")
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool)):
        bad("projection_prng_key", "an integer")
    return problems


def pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern key k (in dict order) with
    re.match(rf"(.*\\.)?({k})$", module) wins; otherwise the default."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
