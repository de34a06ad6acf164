"""Check a merged checkpoint against its inputs: `loramerge verify BASE ADAPTER... MERGED`.

A merge that went wrong (a key skipped, a scale applied twice, a shard from another run) loads
and runs; users notice only from degraded generations. This module recomputes what every tensor
of MERGED must be and says which ones are not, with the numbers. It does not trust the merge
code, nor apply's reading of the adapters: the adapter files are read a second time by code of
verify's own (reference/), both readings must agree tensor by tensor (crosscheck.py), and the
expected values are computed in float64 from verify's reading wherever it covers the adapter
(apply's reading for the tuners it does not: the report says which); layer outputs go through
the unmerged LoRA branch.

Checks, per tensor of the base (plan.build_plan says which adapter terms hit it):

1. Weights. E = W + sum_i c_i * s_i * B_i @ A_i in float64, M = the merged tensor. DoRA:
   E = m * (W + dW) / ||W + dW|| per output unit (PEFT's formula, computed here, not by
   ops.dora_merge). A tensor the adapter saves whole (modules_to_save, resized embeddings)
   starts from that copy instead of W, which then stands for W below.
   Pass rules, by M's dtype:
     bfloat16 / float16: every element within 2 ulps of E correctly rounded (ops.round_to), the
       ulp taken at the element's magnitude max(|W|, |E|, S), S = sum over terms and ranks of
       |c s B_ik A_kj|. loramerge is 0 ulp (it rounds once, correctly). PEFT with float32
       adapter weights adds a float32 delta to the half-precision W and rounds again, which can
       land on E's other neighbour: 1 ulp. PEFT with half-precision adapter weights (bf16 adapter
       files loaded with autocast_adapter_dtype=False, or the PeftModel cast .to(bfloat16))
       rounds the factors and the delta too; those errors scale with S, not with |E|, and reach
       1.25 ulp on the fixtures (14 ulp at |E| alone). Real mistakes are tens to hundreds of ulps.
     float32 / float64: max |M - E| <= 1e-6 * max |E| over the tensor (float32 accumulation,
       ours or PEFT's, is ~1e-7 off).
   A tensor no adapter touches must be bit-identical to the base; if MERGED stores it in
   another float dtype (apply --dtype), it is held to the rule above with E = W. Tensors missing
   from MERGED or not in the base are failures.
2. Delta fidelity: loss = ||M - E|| / ||E - W||, the fraction of the adapter's change that the
   output dtype did not keep (bf16 keeps ~8 bits, so a delta far below W's magnitude is mostly
   rounded away). Reported per target, summarised (worst, median) and warned about above 0.1;
   not a failure: the merge is as good as the dtype allows.
3. Layer outputs (skipped with outputs=False): x ~ randn(8, in) (seed 0) through the merged
   weight vs the base weight plus the unmerged LoRA branch s * (x @ A^T) @ B^T in float64, in the
   weight's linear orientation (y = x @ W^T: transposed layouts are turned around, conv kernels
   flattened to im2col form). Reported as max |y_M - y_ref| / max |y_ref|; it passes when every
   output is within |x| @ tol^T, tol the per-element weight tolerance of rule 1 (plus half an ulp
   for E's own rounding in half precision): the most that rounding the merged weight explains.
4. Model outputs (skipped with outputs=False, or without transformers): see model.py.
5. With oracle='peft' (oracle_peft.py): every tensor against PEFT's own merge_and_unload in
   float64, by rule 1.
6. Files: when MERGED has a loramerge_manifest.json (writers/manifest.py), every file it lists
   must have its recorded size and sha256; a file whose bytes changed is a failure that names it.

Cost: checks 1-3 stream like apply (stream.py: the base and MERGED read ahead on two threads into
reused buffers while the main thread checks; untouched tensors compared byte for byte as they are
read). Rule 1 for half precision is decided in float32 under a proven error bound (compare.py; a
fused numba pass on the CPU, torch on a GPU): an element whose float32 estimate provably rounds to
MERGED's value is 0 ulps off; every other element gets the float64 rule above, so the verdicts are
the float64 ones. Layer outputs, DoRA, IA3, LoHa/LoKr and float outputs take the float64 path in row
blocks. Memory stays at a few tensors. Check 4 loads the model with transformers (one copy at a time, in
float32) and is skipped with a note when that would not fit in memory.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ..engine.devices import resolve_device
from ..engine.precision import guarded
from ..errors import CheckpointError, UsageError
from ..plan import build_plan
from ..plan.codecs import qlora_codec
from ..readers import hub
from ..readers.adapters import load_adapters
from ..readers.checkpoint import open_checkpoint
from ..types import DTYPE_NAMES, FLOAT_CODES
from ..writers import manifest
from . import oracle_peft
from .crosscheck import attach, cross_check
from .experts import check_stacked, is_stacked
from .model import check_model
from .quantized import check_coded
from .reference import read_adapters
from .report import TensorCheck, VerifyReport, fidelity_warning
from .stream import TensorStream
from .weights import check_tensor


@guarded  # IEEE float32 matmuls for the expected values and model outputs (engine/precision.py)
def verify(
    base: str | Path,
    adapters: str | Path | list,
    merged: str | Path,
    *,
    weights: list[float] | None = None,
    outputs: bool = True,
    device: str = "auto",
    lora_alpha: float | None = None,
    fan_in_fan_out: bool | None = None,
    enable_lora: tuple[bool, ...] | None = None,
    only: str | None = None,
    revision: str | None = None,
    qlora: str | None = None,
    qlora_double_quant: bool = True,
    qlora_kernel: str = "cuda",
    oracle: str | None = None,
) -> VerifyReport:
    """Check that `merged` is `base` with `adapters` (times `weights`) merged in; see the module
    docstring for the checks and their tolerances. The reader options (lora_alpha, fan_in_fan_out,
    enable_lora, only) are apply's: pass the ones the merge used. Raises a LoraMergeError for
    unreadable inputs; a wrong merge is not an exception but a report with ok == False. Any of the
    paths may be a Hugging Face Hub id (readers/hub.py; `revision` for those without @REV). Pass
    apply's `qlora` options for a QLoRA merge: the expected values then start from the 4-bit round
    trip of the base, and the report says how far a plain merge would be from them. oracle='peft'
    also holds every tensor against PEFT's own merge (oracle_peft.py)."""
    t0 = time.perf_counter()
    qlora_spec = qlora_codec(qlora, qlora_double_quant, qlora_kernel)
    adapter_paths = [a for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters)]
    if not adapter_paths:
        raise UsageError("no adapter given")
    base, merged = hub.resolve(base, "base", revision), hub.resolve(merged, "base", revision)
    adapter_paths = hub.resolve_all(adapter_paths, "adapter", revision)
    if not merged.exists():
        raise CheckpointError(f"{merged}: merged checkpoint not found; pass the OUT of `loramerge apply` "
                              "(a directory or a .safetensors file)")
    if oracle is not None:
        oracle_peft.preflight(oracle, base, adapter_paths, qlora_spec, only)
    dev = resolve_device(device)
    # MERGED's files against its manifest (sha256 of every byte): on a thread of its own, beside the
    # tensor checks (hashlib releases the GIL), not after them
    files_check = _Background(manifest.check, merged, adapter_paths,
                              {"weights": weights, "qlora": qlora, "qlora_double_quant": qlora_double_quant})
    base_ck = open_checkpoint(base)
    merged_ck = open_checkpoint(merged)
    loaded = load_adapters(adapter_paths, lora_alpha, fan_in_fan_out, enable_lora, only)
    # The plan says what a merge of these inputs writes: every base tensor, plus e.g. an lm_head
    # split off a tied embedding; and which adapter terms land on each.
    plan = build_plan(base_ck, loaded, weights=weights, dtype=_fp8_dequantized_to(base_ck, merged_ck), qlora=qlora_spec)
    # verify's own reading of the adapter files, compared with apply's (the plan's terms): the
    # expected values below come from it wherever it covers the adapter (crosscheck.py)
    own = read_adapters(adapter_paths, {j.name: j.shape for j in plan.jobs}, lora_alpha=lora_alpha,
                        fan_in_fan_out=fan_in_fan_out, enable_lora=enable_lora, only=only)
    cc = cross_check(plan.jobs, loaded, own, weights or [1.0] * len(loaded))
    report = VerifyReport(base=base, adapters=adapter_paths, merged=merged, device=str(dev),
                          outputs=outputs, warnings=list(plan.warnings))
    stream = TensorStream(plan.jobs, base_ck, merged_ck, pin=dev.type == "cuda")
    try:
        for item in stream:  # inside verify's exact_matmul() guard (the decorator)
            report.tensors.append(_check_job(item, base_ck, merged_ck, loaded, dev, outputs,
                                             cc.refs.get(item.job.name)))
            item.release()
        expected = {name for job in plan.jobs for name, *_ in job.entries}
        for name, mref in merged_ck.tensors.items():
            if name not in expected:
                report.tensors.append(TensorCheck(name, "extra", dtype=mref.dtype, shape=mref.shape, problems=[
                    f"in MERGED ({mref.dtype} {list(mref.shape)}) but a merge of these inputs does not write "
                    "it (another model's shard, or a LoRA tensor left in?)"]))
    finally:
        stream.close()
        base_ck.close()
        merged_ck.close()
    attach(report, cc)
    if oracle is not None:
        report.oracle = oracle_peft.check(base_ck, merged_ck, adapter_paths, weights or [1.0] * len(loaded),
                                          plan.jobs, report.tensors)
    fidelity_warning(report)
    report.manifest = files_check.result()
    if outputs:
        report.model = check_model(base_ck, merged_ck, loaded, plan.jobs, dev, cc.refs)
    report.seconds = time.perf_counter() - t0
    return report


class _Background(threading.Thread):
    """fn(*args) on a daemon thread (an interrupted verify does not wait for it); result() joins."""

    def __init__(self, fn, *args):
        super().__init__(name="loramerge-verify-files", daemon=True)
        self._call, self._value, self._error = (fn, args), None, None
        self.start()

    def run(self):
        fn, args = self._call
        try:
            self._value = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            self._error = e

    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


def _check_job(item, base_ck, merged_ck, loaded, dev, outputs: bool, ref) -> TensorCheck:
    """Checks 1-3 for one job, from what the stream read ahead (the rest is read here)."""
    job, mref = item.job, item.mref
    if mref is None:
        return TensorCheck(job.name, "missing", shape=job.shape, problems=[
            f"missing from MERGED (expected {job.dtype} {list(job.shape)}); the merge output is "
            "incomplete or from other inputs, re-run apply"])
    if job.decode is not None or job.encode is not None:
        return check_coded(job, mref, base_ck, merged_ck, loaded, dev, layer=outputs, ref=ref)
    if item.same:  # an untouched tensor whose bytes the reader found equal to the base's
        return TensorCheck(job.name, "copy", dtype=mref.dtype, shape=mref.shape, max_ulps=0.0, max_rel=0.0)
    w = item.w
    if w is None and job.replacement is None:
        w = base_ck.read(job.source)
    m = item.m if item.m is not None else merged_ck.read(mref)
    if is_stacked(job):  # a fused experts tensor (target_parameters): expert by expert
        return check_stacked(job, mref, w, m, loaded, dev, layer=outputs)
    return check_tensor(job, mref, w, m, loaded, dev, layer=outputs, ref=ref)


def _fp8_dequantized_to(base_ck, merged_ck) -> str:
    """An FP8 base merged with --dtype X is dequantized everywhere: verify plans the same merge. The
    dtype is read off MERGED (a weight that is FP8 in the base and a float there)."""
    if base_ck.quant is None or base_ck.quant.method != "fp8" or merged_ck.quant is not None:
        return "auto"
    for name in base_ck.quant.groups:
        ref = merged_ck.tensors.get(name)
        if ref is not None and ref.dtype in FLOAT_CODES:
            return {code: dtype for dtype, code in DTYPE_NAMES.items()}[ref.dtype]
    return "auto"
