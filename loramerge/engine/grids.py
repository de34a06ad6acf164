"""The output formats' bit layouts and the decision rule's slack, by name: the one table rounding.py
(torch) and the numba kernels read. Standard library only: the premerge worker
(engine/premerge_worker.py) runs the kernels in a process that never imports torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """An output format's bits."""
    mbits: int            # stored mantissa bits
    mag_mask: int         # all bits but the sign
    inf_bits: int         # the +Inf pattern (exponent all ones, mantissa 0)
    top_ulp: float        # spacing just below the largest finite value: max + top_ulp/2 overflows
    # (smallest normal, first power of two past the largest finite value): the range where the
    # grid's step at x is x's binade's, which the quick test relies on
    quick: tuple[float, float]


LAYOUTS = {
    "bfloat16": Layout(7, 0x7FFF, 0x7F80, 2.0 ** 120, (2.0 ** -126, 2.0 ** 128)),
    "float16": Layout(10, 0x7FFF, 0x7C00, 32.0, (2.0 ** -14, 2.0 ** 16)),
    "float32": Layout(23, 0x7FFFFFFF, 0x7F800000, 2.0 ** 104, (2.0 ** -126, 2.0 ** 128)),
}
# The largest finite value of each 16-bit format, and the smallest magnitude that rounds to Inf
# (ties to even go up from the largest finite value, whose mantissa is odd)
MAX_FINITE = {"bfloat16": (2 - 2.0 ** -7) * 2.0 ** 127, "float16": 65504.0,
              "float32": (2 - 2.0 ** -23) * 2.0 ** 127}
OVERFLOW = {k: MAX_FINITE[k] + LAYOUTS[k].top_ulp / 2 for k in LAYOUTS}
# Relative slack on every bound, for the few roundings in computing the distances and the bound
# itself (each at most 2^-24 relative in float32): far below any bound's own looseness.
BOUND_SLACK = 1 + 2.0 ** -16
# Unit roundoffs, and what underflow can lose: the bounds' constants (lowrank, kernels)
U32, U64 = 2.0 ** -24, 2.0 ** -53
TINY32 = 2.0 ** -126   # float32's smallest normal: more than underflow loses, flushed or not
TINY64 = 2.0 ** -1074  # float64's smallest subnormal: twice what gradual underflow loses
