"""LoHa and LoKr tensors (LyCORIS' algorithms, also in PEFT): which tensors form one target, the
base shape they imply, and their rank. Shared by the PEFT reader (readers/tuners.py) and the
kohya reader, which name the same tensors alike (`hada_w1_a`, `lokr_w2_b`, ...); only the scale
rules differ and stay with the callers. The math is engine/tuners.py.

LoHa: hada_w1_a [out, r], hada_w1_b [r, in*k] (twice, w1 and w2), or with Tucker cores
      (PEFT use_effective_conv2d / LyCORIS use_tucker) hada_t1 [r, r, *k], hada_w1_a [r, out],
      hada_w1_b [r, in].
LoKr: lokr_w1 [a, b] or lokr_w1_a [a, r] @ lokr_w1_b [r, b]; lokr_w2 [c, d, *k] or lokr_w2_a
      [c, r] @ lokr_w2_b [r, d*k] (LyCORIS may keep w2_b as [r, d, *k]) or, with a Tucker core,
      lokr_t2 [r, r, *k], lokr_w2_a [r, c], lokr_w2_b [r, d]. W is [a*c, b*d, *k].
"""

from __future__ import annotations

import math

import torch

from .files import float_problem

# key suffix -> role in engine/tuners.py
SLOTS = {
    "loha": {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
             "hada_t1": "t1", "hada_t2": "t2"},
    "lokr": {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a",
             "lokr_w2_b": "w2b", "lokr_t2": "t2"},
}


def tuner_of(suffix: str) -> str | None:
    return next((t for t, slots in SLOTS.items() if suffix in slots), None)


def shapes(tuner: str, roles: dict[str, str], tensors: dict[str, torch.Tensor]):
    """(base_shape, rank or None, None) for one target's tensors (roles -> keys), or
    (None, None, problem). base_shape is W's shape as far as the factors tell it: the full shape
    with Tucker cores or a full lokr_w2, else W's 2-D view [out, in*k]. rank is None for a LoKr
    made of two full matrices (no rank anywhere)."""
    problem = float_problem(roles, tensors)
    if problem:
        return None, None, problem
    s = {role: tuple(tensors[key].shape) for role, key in roles.items()}
    try:
        return (*(_loha if tuner == "loha" else _lokr)(s), None)
    except _Bad as e:
        return None, None, str(e)


class _Bad(Exception):
    pass


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise _Bad(what)


def _found(s: dict) -> str:
    return ", ".join(f"{r} {list(v)}" for r, v in s.items())


def _loha(s: dict):
    missing = [r for r in ("w1a", "w1b", "w2a", "w2b") if r not in s]
    _need(not missing, f"LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b; missing {', '.join(missing)}")
    _need(("t1" in s) == ("t2" in s), "LoHa Tucker cores come in pairs: hada_t1 without hada_t2 or the reverse")
    if "t1" in s:  # Tucker: t [r, r, *k], wa [r, out], wb [r, in]
        t, w1a, w1b = s["t1"], s["w1a"], s["w1b"]
        ok = (len(t) >= 3 and t[0] == t[1] and len(w1a) == 2 and len(w1b) == 2 and w1a[0] == t[0] == w1b[0]
              and s["t2"] == t and s["w2a"] == w1a and s["w2b"] == w1b)
        _need(ok, f"LoHa tensors with Tucker cores do not fit together ({_found(s)})")
        return (w1a[1], w1b[1], *t[2:]), t[0]
    w1a, w1b = s["w1a"], s["w1b"]
    ok = (len(w1a) == 2 and len(w1b) >= 2 and w1a[1] == w1b[0] and s["w2a"] == w1a
          and math.prod(s["w2b"]) == math.prod(w1b) and s["w2b"][0] == w1b[0])
    _need(ok, f"LoHa factors do not form (w1a @ w1b) * (w2a @ w2b) ({_found(s)})")
    return (w1a[0], math.prod(w1b[1:])), w1a[1]


def _lokr(s: dict):
    if "w1" in s:
        _need(len(s["w1"]) == 2 and "w1a" not in s and "w1b" not in s,
              f"LoKr has lokr_w1 {list(s['w1'])} and also lokr_w1_a/_b, or lokr_w1 is not 2-D")
        (a, b), r1 = s["w1"], None
    else:
        _need("w1a" in s and "w1b" in s, "LoKr needs lokr_w1, or lokr_w1_a and lokr_w1_b")
        (a, r1), (r1b, b) = s["w1a"], s["w1b"]
        _need(r1 == r1b, f"lokr_w1_a {list(s['w1a'])} and lokr_w1_b {list(s['w1b'])} do not multiply")
    if "w2" in s:
        _need(len(s["w2"]) >= 2 and not {"w2a", "w2b", "t2"} & set(s),
              f"LoKr has lokr_w2 {list(s['w2'])} and also lokr_w2_a/_b or lokr_t2, or lokr_w2 is not 2-D+")
        c, d, *k = s["w2"]
        shape, r2 = (a * c, b * d, *k), None
    else:
        _need("w2a" in s and "w2b" in s, "LoKr needs lokr_w2, or lokr_w2_a and lokr_w2_b")
        w2a, w2b = s["w2a"], s["w2b"]
        if "t2" in s:  # Tucker: t2 [r, r, *k], w2a [r, c], w2b [r, d]
            t = s["t2"]
            _need(len(t) >= 3 and len(w2a) == 2 and len(w2b) == 2 and t[0] == t[1] == w2a[0] == w2b[0],
                  f"LoKr Tucker tensors do not fit together ({_found(s)})")
            shape, r2 = (a * w2a[1], b * w2b[1], *t[2:]), t[0]
        else:  # w2a [c, r] @ w2b [r, d*k] (or [r, d, *k])
            _need(len(w2a) == 2 and len(w2b) >= 2 and w2a[1] == w2b[0],
                  f"lokr_w2_a {list(w2a)} and lokr_w2_b {list(w2b)} do not multiply")
            r2 = w2a[1]
            shape = (a * w2a[0], b * w2b[1], *w2b[2:]) if len(w2b) > 2 else (a * w2a[0], b * w2b[1])
    _need(r1 is None or r2 is None or r1 == r2, f"LoKr factors disagree on the rank ({_found(s)})")
    return shape, r1 if r1 is not None else r2


def fits(base_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Does a base tensor of `shape` take a LoHa/LoKr delta of `base_shape` (see shapes())? The
    2-D views must agree, and a shape the factors give in full must match W's input channels
    (PEFT's Conv1d keeps a trailing 1 on Tucker kernels: [out, in, k, 1] for W [out, in, k])."""
    def v2(t):
        return t[0], math.prod(t[1:])
    if len(shape) < 2 or v2(shape) != v2(base_shape):
        return False
    return len(base_shape) == 2 or (len(shape) > 2 and shape[1] == base_shape[1])
