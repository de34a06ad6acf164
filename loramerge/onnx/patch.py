"""Fold adapters into an existing ONNX graph: copy it, changing only initializer values.

The output has exactly the base graph's nodes, inputs and outputs, so it runs exactly as fast.
Each target's new value is computed from the base checkpoint's tensor when given (one rounding
to the initializer's dtype), else from the initializer itself, by the same engine.compute the
safetensors path uses, then laid out as the initializer is (transposed, or as a block of a
packed tensor): merging.py. External data is streamed, reading, merging and writing overlapped
with a few tensors in memory (graph.save).
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from .. import engine
from ..engine.precision import guarded
from ..readers.adapters import load_adapters
from ..errors import OnnxError, OutputError, UsageError
from ..readers.checkpoint import Checkpoint, open_checkpoint
from ..report import JsonReport
from ..writers.output import Staged, check_disk_space, check_output_path, commit_all
from .datafile import Clock
from .merging import merge_tasks, merged_value
from .graph import AHEAD, OnnxGraph
from .lora_graph import add_branches
from .match import match_targets
from .shared import check_shared, shared_uses
from .targets import MatchResult, Target, Unconfirmed, collect_targets
from .runtime import Comparison, compare_graphs, op_counts, sample_inputs

FOLD_META_KEY = "loramerge.folded"


@dataclass
class OnnxReport(JsonReport):
    out: Path
    mode: str                                   # 'fold' | 'keep-lora' | 'export' | 'onnx-adapter'
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    ops_before: dict = field(default_factory=dict)
    ops_after: dict = field(default_factory=dict)
    how: dict = field(default_factory=dict)     # match method -> count
    comparison: Comparison | None = None
    tolerance: tuple[float, float] | None = None  # (atol, rtol) of the check, if any
    adapter_files: list[str] = field(default_factory=list)  # .onnx_adapter files (--lora-inputs)
    seconds: float = 0.0
    stages: dict = field(default_factory=dict)  # fold: seconds per stage (match, read, confirm, merge, wait, ...)

    def summary(self) -> str:
        lines = []
        if self.mode in ("fold", "keep-lora"):
            how = ", ".join(f"{n} by {k}" for k, n in sorted(self.how.items()))
            verb = "folded" if self.mode == "fold" else "added LoRA side branches for"
            lines.append(f"{verb} {len(self.matched)} target(s) ({how}); {len(self.missing)} not in the graph")
            nodes_b, nodes_a = sum(self.ops_before.values()), sum(self.ops_after.values())
            lines.append(f"nodes: {nodes_b} -> {nodes_a}" + (" (unchanged)" if self.ops_before == self.ops_after else ""))
        lines.append(f"wrote {', '.join(self.files)} in {self.seconds:.2f} s")
        if self.adapter_files:
            lines.append(f"onnxruntime LoRA adapters (activate one per run with RunOptions.add_active_adapter): "
                         f"{', '.join(self.adapter_files)}")
        if self.comparison is not None:
            c = self.comparison
            tol = f" (atol {self.tolerance[0]:g}, rtol {self.tolerance[1]:g})" if self.tolerance else ""
            lines.append(f"checked with onnxruntime ({c.provider}): max abs diff {c.max_abs:.3g}, max rel diff "
                         f"{c.max_rel:.3g}{tol}")
        lines += self.notes
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _match_lines(result: MatchResult) -> list[str]:
    return [m.describe() for m in result.matches]


def locate(graph: OnnxGraph, targets: list[Target], ck: Checkpoint | None, defer: bool = False) -> MatchResult:
    """Match the targets to initializers, then give each target that shares an initializer with
    other modules its own copy (same values, used by its own nodes), and refuse what is shared in
    ways the graph cannot tell apart. defer: see match.match_targets."""
    result = match_targets(graph, targets, ck, defer)
    unshare(graph, result)
    check_shared(graph, result, ck is not None)
    return result


def unshare(graph: OnnxGraph, result: MatchResult) -> None:
    """Carry out shared.shared_uses(): only initializers are added and node inputs renamed, so the
    node multiset stays the same."""
    for m, uses in shared_uses(graph, result):
        old = m.init
        m.init = graph.clone_initializer(old, f"{old}__{m.target.module}", uses)
        m.note = "; ".join(filter(None, [m.note, f"own copy of initializer {old}, which the exporter shared with "
                                                 "other modules (resolved by graph position)"]))


@guarded  # IEEE float32 matmuls for the merge math (engine/precision.py)
def fold(graph_path, out, adapters, *, weights: list[float] | None = None, base=None, strict: bool = False,
         keep_lora: bool = False, lora_inputs: bool = False, device: str = "auto", overwrite: bool = False,
         verify: bool = False, adapter_opts: dict | None = None) -> OnnxReport:
    """Fold `adapters` into the ONNX graph at `graph_path`, writing `out` (see module docstring).
    keep_lora: write the base graph with LoRA side branches instead (lora_inputs: as overridable
    graph inputs). verify: also build the other variant (keep-lora or folded) and compare outputs
    with onnxruntime before anything is committed. adapter_opts: what some adapter formats do not
    store (lora_alpha, fan_in_fan_out, enable_lora, only; see loramerge.readers.adapters.load_adapters).

    With a base, content matches proposed by a sampled digest alone are confirmed element by
    element as each target is merged (so the base is read once and matching costs a few pages per
    tensor); if one does not hold, the fold starts over with every candidate compared up front."""
    args = (graph_path, out, adapters, weights, base, strict, keep_lora, lora_inputs, device, overwrite, verify,
            adapter_opts)
    if base is not None and not keep_lora:
        try:
            return _fold(*args, defer=True)
        except Unconfirmed:
            pass  # a sampled digest proposed an initializer that differs elsewhere: match in full
    return _fold(*args, defer=False)


def _fold(graph_path, out, adapters, weights, base, strict, keep_lora, lora_inputs, device, overwrite, verify,
          adapter_opts, defer: bool) -> OnnxReport:
    t0 = time.perf_counter()
    graph_path, out = Path(graph_path), Path(out)
    adapter_paths = [Path(a) for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters)]
    if not adapter_paths:
        raise UsageError("no adapter given: pass --adapter ADAPTER (repeatable)")
    if lora_inputs and not keep_lora:
        raise UsageError("--lora-inputs makes the LoRA factors of a --keep-lora graph into graph inputs; "
                         "add --keep-lora")
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"{out}: the output of folding into an ONNX graph is an .onnx file; name it *.onnx")
    graph = OnnxGraph(graph_path)
    adapter_opts = dict(adapter_opts or {})
    loaded = load_adapters(adapter_paths, **adapter_opts)
    ck = open_checkpoint(base) if base is not None else None
    dev = engine.resolve_device(device)
    if not keep_lora:
        engine.warm_up([dev])
    report = OnnxReport(out=out, mode="keep-lora" if keep_lora else "fold")
    clock = Clock(report.stages)
    report.stages["open"] = time.perf_counter() - t0
    try:
        inputs = [graph_path, *graph.external_files(), *adapter_paths] + ([Path(base)] if base is not None else [])
        check_output_path(out, inputs, overwrite)
        data_name = out.name + ".data" if graph.external_files() else None
        if data_name is not None:
            _check_data_path(out.parent / data_name, inputs, overwrite)
        check_disk_space(out, graph_path.stat().st_size + sum(f.stat().st_size for f in graph.external_files()))
        targets = collect_targets(loaded, weights, ck)
        with clock("match"):
            result = locate(graph, targets, ck, defer)
        _check_coverage(graph_path, targets, result, ck is not None, strict, report)

        for p in graph.model.metadata_props:
            if p.key == FOLD_META_KEY:
                report.warnings.append(f"{graph_path} already has adapters folded in by loramerge ({p.value}); "
                                       "folding again adds on top of them")
        report.ops_before = op_counts(graph.model)
        for m in result.matches:
            report.how[m.how + (" (packed block)" if m.block else "")] = \
                report.how.get(m.how + (" (packed block)" if m.block else ""), 0) + 1
        patched = {}
        if keep_lora:
            add_branches(graph, result.matches, loaded, targets, lora_inputs)
        else:
            for init, ms in result.by_init().items():
                if not graph.is_external(init):
                    graph.set_internal(init, merged_value(graph, init, ms, loaded, ck, dev, clock))
            patched = merge_tasks(graph, result, loaded, ck, dev, clock, AHEAD)
        _set_meta(graph.model, {FOLD_META_KEY if not keep_lora else "loramerge.keep_lora": json.dumps(
            {"adapters": [str(p) for p in adapter_paths], "weights": weights or [1.0] * len(adapter_paths)})})
        report.ops_after = op_counts(graph.model)

        with ExitStack() as stack:
            staged = Staged(out, is_dir=False, overwrite=overwrite)
            tmp_model = stack.enter_context(staged)
            staged_data = tmp_data = None
            if data_name is not None:
                staged_data = Staged(out.parent / data_name, is_dir=False, overwrite=overwrite, group=staged)
                tmp_data = stack.enter_context(staged_data)
            location = (tmp_data.name if verify else data_name) if tmp_data is not None else ""
            with clock("save"):
                graph.save(tmp_model, location, tmp_data, patched, report.stages)
            if verify:
                report.comparison, report.tolerance = _verify(
                    tmp_model, graph_path, adapter_paths, weights, base, not keep_lora, stack, graph, result,
                    adapter_opts)
            if tmp_data is not None and verify:
                graph.relocate(tmp_data.name, data_name, tmp_model)
            report.matched = _match_lines(result)  # after the merges, which confirm pending matches
            commit_all(*[s for s in (staged_data, staged) if s is not None])  # model and data: one commit
    finally:
        if ck is not None:
            ck.close()
    report.files = [out.name] + ([data_name] if data_name else [])
    report.seconds = time.perf_counter() - t0
    return report


def _check_coverage(graph_path: Path, targets: list[Target], result: MatchResult, with_base: bool, strict: bool,
                    report: OnnxReport) -> None:
    lines = [f"{t.name}: {why}" for t, why in result.missing]
    report.missing = lines
    unmatched = [f"{t.name}: {why}" for t, why in result.unmatched]
    if not result.matches:
        lines = unmatched + lines
        hint = ("; without --base only initializers named after the targets (or carrying the dynamo exporter's "
                "folded_from metadata) can be found: pass --base BASE_CHECKPOINT to match renamed, transposed "
                "weights by content") if not with_base else \
            "; the graph was exported from another model than the base checkpoint (or its weights were changed)"
        raise OnnxError(f"{graph_path}: none of the {len(targets)} adapter target(s) were found in this graph{hint}; "
                        "nothing was written", lines)
    if unmatched:
        raise OnnxError(f"{graph_path}: {len(unmatched)} of {len(targets)} adapter target(s) were not found, but the "
                        "graph holds initializers that could be them; folding only the others would write a partly "
                        "adapted model. Nothing was written", unmatched)
    if lines and strict:
        raise OnnxError(f"{graph_path}: {len(lines)} of {len(targets)} adapter target(s) are not in the graph "
                        "(--strict); nothing was written. Drop --strict to fold the rest (a tensor the graph's "
                        "outputs never use, e.g. a pooler, is left out by the exporter)", lines)
    report.warnings += [f"not in the graph, left out: {line}" for line in lines]


def _check_data_path(data: Path, inputs: list[Path], overwrite: bool) -> None:
    for p in inputs:
        if data.resolve() == p.resolve():
            raise OutputError(f"{data}: the output's external data file would replace the input {p}; choose "
                              "another output name")
    if data.exists() and not overwrite:
        raise OutputError(f"{data}: already exists (it would hold the output's external data); pass --overwrite "
                          "to replace it")


def _set_meta(model: onnx.ModelProto, props: dict[str, str]) -> None:
    keep = {p.key: p.value for p in model.metadata_props}
    keep.update(props)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, keep)


def _verify(tmp_model: Path, graph_path: Path, adapter_paths, weights, base, folded: bool, stack: ExitStack,
            graph: OnnxGraph, result: MatchResult, adapter_opts: dict) -> tuple[Comparison, tuple[float, float]]:
    """Build the other variant (keep-lora for a folded graph and vice versa) and compare outputs."""
    tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".loramerge-verify-", dir=tmp_model.parent)))
    other = tmpdir / "reference.onnx"
    fold(graph_path, other, adapter_paths, weights=weights, base=base, keep_lora=folded, adapter_opts=adapter_opts)
    half = any(graph.dtype(m.init) in (torch.float16, torch.bfloat16) for m in result.matches)
    rtol = 1e-2 if half else 1e-4
    cmp = compare_graphs(tmp_model, other, sample_inputs(other))
    if not cmp.ok(rtol):
        raise OnnxError(f"{tmp_model.name}: onnxruntime outputs of the {'folded' if folded else 'keep-lora'} graph "
                        f"differ from the {'keep-lora' if folded else 'folded'} graph's: max abs diff "
                        f"{cmp.max_abs:.3g}, max rel diff {cmp.max_rel:.3g} > rtol {rtol:g}; nothing was written. "
                        "Please report this with the graph and adapter")
    return cmp, (0.0, rtol)
