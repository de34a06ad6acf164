"""Export a transformers checkpoint (merged with adapters first, if any) to ONNX with torch.onnx,
and check the result with onnxruntime against PyTorch before anything is committed.

- Adapters are merged by loramerge.apply into a temporary directory (streaming, bounded memory),
  and that merged checkpoint is what gets traced. With keep_lora, the base is traced and the
  adapters become side branches (lora_graph), checked against the merged model all the same.
- Inputs input_ids, attention_mask (and token_type_ids where the model's forward takes it);
  output `logits` for causal LMs, `last_hidden_state` otherwise; batch and sequence dynamic;
  no KV cache (use_cache=False).
- Opset: the exporter's default, capped at what the installed onnxruntime loads; IR version
  lowered likewise (runtime.fit_ir_version). Weights go to one external data file next to the
  model when the model is over 2 GB.
- Validation runs the graph at a shape other than the traced one (so dynamic axes are exercised)
  and fails with the max abs/rel error and the tolerances when |ort - torch| > atol + rtol*|torch|.
"""

from __future__ import annotations

import inspect
import tempfile
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import OnnxError, UsageError
from ..writers.output import Staged, check_output_path, commit_all
from .graph import OnnxGraph
from .patch import OnnxReport, _check_data_path, _set_meta, fold
from .runtime import _compare, fit_ir_version, op_counts, runtime_limits, session

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOLERANCES = {torch.float32: (1e-4, 1e-3), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}
EXPORTERS = ("dynamo", "torchscript")
TWO_GB = 2 * 1024**3
TRACE_SHAPE = (2, 8)       # (batch, sequence) traced
CHECK_SHAPE = (3, 11)      # ... and validated: a different shape proves the axes are dynamic


class _Wrapper(torch.nn.Module):
    """Fixed positional inputs -> one tensor, no cache: what the exporters trace."""

    def __init__(self, model, output: str, names: list[str]):
        super().__init__()
        self.model = model
        self.output = output
        self.names = names

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            kw["use_cache"] = False
        out = self.model(**kw, return_dict=True)
        return getattr(out, self.output)


def _load(model_dir: Path, dtype: torch.dtype):
    try:
        import transformers
    except ImportError as e:
        raise OnnxError("exporting a checkpoint needs transformers: pip install 'loramerge[hf]'") from e
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        raise OnnxError(f"{model_dir}: cannot read the model's config.json with transformers ({e}); export needs a "
                        "transformers model directory") from e
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # transformers >= 4.56 calls it dtype; older versions torch_dtype (and would ignore dtype)
            major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
            key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
            model = cls.from_pretrained(model_dir, **{key: dtype})
    except Exception as e:
        raise OnnxError(f"{model_dir}: transformers cannot load it as {cls.__name__} ({e})") from e
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model, ("logits" if causal else "last_hidden_state")


def _inputs(model, shape: tuple[int, int], seed: int, names: list[str]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    batch, seq = shape
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and seq > 3:
        mask[-1, -2:] = 0  # right padding on one row
    out = [ids, mask]
    if "token_type_ids" in names:
        out.append(torch.zeros(batch, seq, dtype=torch.long))
    return tuple(out)


def _input_names(model) -> list[str]:
    params = inspect.signature(model.forward).parameters
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in params else [])


def _default_opset(exporter: str) -> int:
    """The exporter's own default (dynamo: torch's ONNX_DEFAULT_OPSET; TorchScript: 17, the most
    tested); capped by the caller at what onnxruntime loads."""
    if exporter == "torchscript":
        return 17
    try:
        from torch.onnx._constants import ONNX_DEFAULT_OPSET
        return int(ONNX_DEFAULT_OPSET)
    except (ImportError, AttributeError):  # pragma: no cover - older/newer torch
        return 18


def _trace(model, output: str, path: Path, exporter: str, opset: int | None) -> list[str]:
    names = _input_names(model)
    wrapper = _Wrapper(model, output, names).eval()
    args = _inputs(model, TRACE_SHAPE, 0, names)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
                prog = torch.onnx.export(wrapper, args, dynamo=True, input_names=names, output_names=[output],
                                         dynamic_shapes={n: {0: batch, 1: seq} for n in names},
                                         opset_version=opset, verbose=False, optimize=True)
                prog.save(str(path), external_data=True if nbytes >= TWO_GB else None)
            else:
                axes = {n: {0: "batch", 1: "sequence"} for n in names + [output]}
                torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=names, output_names=[output],
                                  dynamic_axes=axes, opset_version=opset,
                                  do_constant_folding=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxError(f"torch.onnx ({exporter}) failed to export {type(model).__name__}: {msg}; try "
                        f"--exporter {'torchscript' if exporter == 'dynamo' else 'dynamo'} or another --opset") from e
    finally:
        model.eval()  # the TorchScript exporter restores the wrapper's mode recursively
    return names


def export_model(model_dir, out, adapters=(), *, weights: list[float] | None = None, dtype: str = "float32",
                 opset: int | None = None, exporter: str = "dynamo", keep_lora: bool = False,
                 lora_inputs: bool = False, validate: bool = True, atol: float | None = None,
                 rtol: float | None = None, device: str = "auto", overwrite: bool = False,
                 adapter_opts: dict | None = None) -> OnnxReport:
    """Export `model_dir` (merged with `adapters`, or with them as side branches if keep_lora)
    to `out` (.onnx), validated with onnxruntime against PyTorch. Raises OnnxError on a mismatch."""
    t0 = time.perf_counter()
    from ..api import apply  # keeps `import loramerge.onnx` light

    model_dir, out = Path(model_dir), Path(out)
    adapter_paths = [Path(a) for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters)]
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if exporter not in EXPORTERS:
        raise UsageError(f"--exporter {exporter!r}: expected dynamo or torchscript")
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"{out}: name the exported model *.onnx")
    if keep_lora and not adapter_paths:
        raise UsageError("--keep-lora needs at least one --adapter")
    if lora_inputs and not keep_lora:
        raise UsageError("--lora-inputs makes the LoRA factors of a --keep-lora graph into graph inputs; add --keep-lora")
    max_ir, max_opset = runtime_limits()
    if opset is not None and opset > max_opset:
        raise UsageError(f"--opset {opset}: the installed onnxruntime loads opsets up to {max_opset}")
    torch_dtype = DTYPES[dtype]
    d_atol, d_rtol = TOLERANCES[torch_dtype]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if opset is None:
        opset = min(_default_opset(exporter), max_opset)
    check_output_path(out, [model_dir, *adapter_paths], overwrite)

    report = OnnxReport(out=out, mode="export")
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".loramerge-export-", dir=out.parent)))
        merged_dir = model_dir
        if adapter_paths:
            merged_dir = work / "merged"
            apply(model_dir, adapter_paths, merged_dir, weights=weights, sync=False, **(adapter_opts or {}))
            report.notes.append(f"merged {len(adapter_paths)} adapter(s) into a temporary checkpoint first"
                                + (" (the PyTorch reference for the check)" if keep_lora else ""))
        traced_dir = model_dir if keep_lora else merged_dir
        model, output = _load(traced_dir, torch_dtype)
        raw = work / "export" / "model.onnx"
        raw.parent.mkdir()
        names = _trace(model, output, raw, exporter, opset)
        del model

        if keep_lora:
            branched = work / "branched" / "model.onnx"
            branched.parent.mkdir()
            rep = fold(raw, branched, adapter_paths, weights=weights, base=model_dir, keep_lora=True,
                       lora_inputs=lora_inputs, device=device, adapter_opts=adapter_opts)
            report.matched, report.missing, report.warnings = rep.matched, rep.missing, rep.warnings
            raw = branched

        graph = OnnxGraph(raw)
        note = fit_ir_version(graph.model)
        if note:
            report.notes.append(note)
        _set_meta(graph.model, {"loramerge.exported_from": str(model_dir),
                                "loramerge.adapters": ",".join(str(p) for p in adapter_paths)})
        external = bool(graph.external_files())
        data_name = out.name + ".data" if external else None
        if data_name:
            _check_data_path(out.parent / data_name, [model_dir, *adapter_paths], overwrite)
        staged = Staged(out, is_dir=False, overwrite=overwrite)
        tmp_model = stack.enter_context(staged)
        staged_data = tmp_data = None
        if data_name:
            staged_data = Staged(out.parent / data_name, is_dir=False, overwrite=overwrite, group=staged)
            tmp_data = stack.enter_context(staged_data)
        graph.save(tmp_model, tmp_data.name if tmp_data else "", tmp_data, {})
        report.ops_after = op_counts(graph.model)

        if validate:
            ref_model, _ = _load(merged_dir, torch_dtype)
            report.comparison, report.tolerance = _validate(tmp_model, ref_model, output, names, atol, rtol, device)
            del ref_model
        else:
            report.notes.append("not validated (--no-validate)")
        if tmp_data is not None:
            graph.relocate(tmp_data.name, data_name, tmp_model)
        commit_all(*[s for s in (staged_data, staged) if s is not None])  # model and data: one commit
    m = onnx.load(str(out), load_external_data=False)
    report.notes.append(f"opset {next((o.version for o in m.opset_import if o.domain in ('', 'ai.onnx')), '?')}, "
                        f"IR version {m.ir_version}, exporter {exporter}, inputs {', '.join(names)}, output {output}")
    report.files = [out.name] + ([data_name] if data_name else [])
    report.seconds = time.perf_counter() - t0
    return report


def _validate(path: Path, model, output: str, names: list[str], atol: float, rtol: float, device: str):
    args = _inputs(model, CHECK_SHAPE, 1, names)
    with torch.no_grad():
        ref = _Wrapper(model, output, names).eval()(*args).float().numpy()
    sess = session(path, device)
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    got = sess.run(None, feeds)[0].astype(np.float32)
    if got.shape != ref.shape:
        raise OnnxError(f"{path.name}: onnxruntime output {output} has shape {list(got.shape)}, PyTorch's "
                        f"{list(ref.shape)} at batch {CHECK_SHAPE[0]}, sequence {CHECK_SHAPE[1]}: the exported graph "
                        "does not have dynamic batch/sequence axes; nothing was written")
    cmp = _compare([got], [ref], [output], sess.get_providers()[0])
    bad = np.abs(got.astype(np.float64) - ref) > atol + rtol * np.abs(ref.astype(np.float64))
    if not np.isfinite(got).all() or bad.any():
        raise OnnxError(f"{path.name}: onnxruntime ({cmp.provider}) and PyTorch disagree on {output}: "
                        f"{int(bad.sum())} of {bad.size} values outside atol {atol:g} + rtol {rtol:g}*|torch| "
                        f"(max abs diff {cmp.max_abs:.3g}, max rel diff {cmp.max_rel:.3g}); nothing was written. "
                        "Try --exporter torchscript/dynamo or another --opset; --atol/--rtol to accept, "
                        "--no-validate to skip the check")
    return cmp, (atol, rtol)
