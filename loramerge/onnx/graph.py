"""One ONNX model file, read without its tensor data: the graph proto, an index of initializers
and who consumes them, and what the exporters left behind about where each value came from.

Tensor bytes are read one initializer at a time (from the proto, or from the external data file
at its offset), so a model with external data is never held in memory whole. Writing (save())
streams too: untouched external tensors are copied range by range into the new data file.
"""

from __future__ import annotations

import ast
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from ..errors import OnnxError
from .datafile import Clock, DataOut, tensor_bytes, tensor_view

FLOAT_TYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.DOUBLE: torch.float64,
}
TORCH_TO_ONNX = {v: k for k, v in FLOAT_TYPES.items()}
# Where the exporters record provenance. The dynamo exporter's optimizer (onnxscript) notes on a
# constant-folded value which original values it came from (e.g. the transposed copy of
# `model.layers.0.self_attn.q_proj.weight`); both exporters name or annotate nodes with the module
# path that produced them.
FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
AHEAD = 2               # patched tensors computed ahead of the writer when saving
ALIGN_LARGE = 1 << 20   # tensors this big start on a 64 KiB boundary in external data (as onnx.save
ALIGNMENT = 1 << 16     # does), so onnxruntime can memory-map them


def _type_name(code: int) -> str:
    try:
        return TensorProto.DataType.Name(code)
    except ValueError:
        return str(code)


def load_model(path: Path) -> onnx.ModelProto:
    """The model proto without external data, or an OnnxError saying what is wrong with the file."""
    if not path.exists():
        raise OnnxError(f"{path}: ONNX model not found")
    if path.is_dir():
        raise OnnxError(f"{path}: is a directory; pass the .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OnnxError(f"{path}: not a valid ONNX model (the protobuf does not parse: {msg}); the file is "
                        "corrupt or truncated, or not ONNX at all: re-export or re-download it") from e
    if model.ir_version <= 0 or not model.graph.node:
        raise OnnxError(f"{path}: not a valid ONNX model (no IR version or no graph nodes); the file is corrupt, "
                        "empty or not ONNX: re-export or re-download it")
    return model


def _scopes_of(node: onnx.NodeProto) -> list[str]:
    """Module paths a node was produced under, outermost first ('m', 'm.model', ...)."""
    for p in node.metadata_props:
        if p.key == NAME_SCOPES:  # dynamo exporter: ['', 'm', 'm.model', ..., 'linear']
            try:
                scopes = ast.literal_eval(p.value)
                return [s for s in scopes if isinstance(s, str) and s]
            except (ValueError, SyntaxError):
                break
    if node.name.startswith("/"):  # TorchScript exporter: '/model/layers.0/self_attn/q_proj/MatMul'
        parts = node.name.strip("/").split("/")[:-1]
        return [".".join(parts[: i + 1]) for i in range(len(parts))]
    return []


class OnnxGraph:
    """An ONNX model opened for folding. `inits` maps initializer name -> TensorProto (data not
    loaded when external); `consumers` maps a value name -> [(node, input index)] in the main graph."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.model = load_model(self.path)
        g = self.model.graph
        self.inits: dict[str, TensorProto] = {}
        for t in g.initializer:
            if t.name in self.inits:
                raise OnnxError(f"{self.path}: initializer {t.name!r} is defined twice; the graph is invalid")
            self.inits[t.name] = t
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in g.node:
            for i, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, i))
        self.folded_from: dict[str, list[str]] = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            self._read_folded_from(vi.name, vi.metadata_props)
        for t in g.initializer:
            self._read_folded_from(t.name, getattr(t, "metadata_props", ()))
        self.graph_inputs = [i.name for i in g.input if i.name not in self.inits]
        self.graph_outputs = [o.name for o in g.output]
        self._maps: dict[Path, mmap.mmap] = {}   # external data files mapped by view()

    def _read_folded_from(self, name: str, props) -> None:
        for p in props:
            if p.key == FOLDED_FROM:
                try:
                    srcs = ast.literal_eval(p.value)
                except (ValueError, SyntaxError):
                    return
                if isinstance(srcs, (list, tuple, set)) and all(isinstance(s, str) for s in srcs):
                    self.folded_from[name] = sorted(srcs)

    # -- metadata ------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.inits[name].dims)

    def dtype(self, name: str) -> torch.dtype | None:
        return FLOAT_TYPES.get(self.inits[name].data_type)

    def type_name(self, name: str) -> str:
        return _type_name(self.inits[name].data_type)

    def is_external(self, name: str) -> bool:
        return self.inits[name].data_location == TensorProto.EXTERNAL

    def external_files(self) -> list[Path]:
        files = []
        for name, t in self.inits.items():
            if t.data_location == TensorProto.EXTERNAL:
                f = self._external(name)[0]
                if f not in files:
                    if not f.is_file():
                        raise OnnxError(f"{self.path}: external data file {f.name} (holding initializer {name!r}) "
                                        f"not found in {f.parent}; keep the data file next to the .onnx file")
                    files.append(f)
        return files

    def uses(self, name: str, _depth: int = 0) -> list[tuple[onnx.NodeProto, int]]:
        """The nodes that use value `name`, looking through Identity nodes (the TorchScript
        exporter shares a deduplicated initializer through Identity)."""
        out = []
        for node, idx in self.consumers.get(name, ()):
            if node.op_type == "Identity" and _depth < 16:
                out.extend(self.uses(node.output[0], _depth + 1))
            else:
                out.append((node, idx))
        return out

    def node_scopes(self, node: onnx.NodeProto) -> set[str]:
        """Module paths a node belongs to (an Identity: those of the nodes it feeds)."""
        if node.op_type == "Identity":
            out: set[str] = set()
            for n, _ in self.uses(node.output[0]):
                out.update(_scopes_of(n))
            return out
        return set(_scopes_of(node))

    def scopes(self, name: str) -> set[str]:
        """Module paths of the nodes that use value `name`."""
        out: set[str] = set()
        for node, _ in self.uses(name):
            out.update(_scopes_of(node))
        return out

    def nbytes(self, name: str) -> int:
        t = self.inits[name]
        n = 1
        for d in t.dims:
            n *= int(d)
        return n * torch.empty((), dtype=FLOAT_TYPES[t.data_type]).element_size() if t.data_type in FLOAT_TYPES \
            else n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize

    # -- tensor data ---------------------------------------------------------------------
    def _external(self, name: str) -> tuple[Path, int, int]:
        t = self.inits[name]
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
            raise OnnxError(f"{self.path}: initializer {name!r} points to external data {loc!r}, which is not a "
                            "file next to the model; re-save the model with its data alongside it")
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else self.nbytes(name)
        return self.path.parent / loc, offset, length

    def read_bytes(self, name: str) -> bytes | bytearray:
        """The initializer's little-endian bytes, exactly as stored."""
        t = self.inits[name]
        if t.data_location == TensorProto.EXTERNAL:
            data = bytearray(self._external(name)[2])
            self._read_external(name, memoryview(data))
            return data
        if t.HasField("raw_data") or t.raw_data:
            return t.raw_data
        if t.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):  # bit patterns in int32_data
            return np.asarray(t.int32_data, dtype=np.uint16).tobytes()
        return numpy_helper.to_array(t).tobytes()

    def read(self, name: str) -> torch.Tensor:
        """A float initializer as a CPU tensor (own memory)."""
        dtype = self.dtype(name)
        if dtype is None:
            raise OnnxError(f"{self.path}: initializer {name!r} is {self.type_name(name)}, not a float tensor")
        data = self.read_bytes(name)
        expected = self.nbytes(name)
        if len(data) != expected:
            raise OnnxError(f"{self.path}: initializer {name!r} holds {len(data)} bytes, its shape "
                            f"{list(self.shape(name))} needs {expected}; the model is corrupt")
        own = data if isinstance(data, bytearray) else bytearray(data)
        t = torch.frombuffer(own, dtype=torch.uint8) if expected else torch.empty(0, dtype=torch.uint8)
        return t.view(dtype).reshape(self.shape(name))

    def read_into(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        """read(), into the byte buffer `buf` (at least nbytes) for external data: one pread, no
        page faults on a mapping and no fresh memory, which is what the fold's reader wants."""
        if not self.is_external(name) or self.dtype(name) is None:
            return self.read(name)
        length = self._external(name)[2]
        if length != self.nbytes(name):
            return self.read(name)  # read() explains what is wrong
        self._read_external(name, memoryview(buf.numpy()).cast("B")[:length])
        return buf[:length].view(self.dtype(name)).reshape(self.shape(name))

    def _read_external(self, name: str, view: memoryview) -> None:
        """Fill `view` (as long as the initializer's external data) from its file, with preads."""
        file, offset, length = self._external(name)
        try:
            with open(file, "rb", buffering=0) as f:
                got = 0
                while got < length:
                    n = os.preadv(f.fileno(), [view[got:length]], offset + got)
                    if not n:
                        raise OnnxError(f"{file}: file ends before initializer {name!r} (needs bytes {offset}.."
                                        f"{offset + length}); the external data file is truncated or belongs to "
                                        "another model")
                    got += n
        except OSError as e:
            raise OnnxError(f"{file}: cannot read external data of initializer {name!r} ({e.strerror or e}); "
                            "keep the data file next to the .onnx file it belongs to") from e

    def view(self, name: str) -> torch.Tensor:
        """A float initializer to read, not to keep or change: external data is mapped from its
        file (a private mapping: no copy, nothing written back), the rest is read()."""
        if not self.is_external(name):
            return self.read(name)
        file, offset, length = self._external(name)
        dtype = self.dtype(name)
        if dtype is None or length != self.nbytes(name) or not length or offset % dtype.itemsize:
            return self.read(name)  # read() explains what is wrong, or copies unaligned data
        try:
            if file not in self._maps:
                with open(file, "rb") as f:
                    self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            m = self._maps[file]
        except (OSError, ValueError):
            return self.read(name)
        if offset + length > len(m):
            return self.read(name)
        return torch.frombuffer(m, dtype=torch.uint8, count=length, offset=offset).view(dtype).reshape(self.shape(name))

    def release_views(self) -> None:
        """Drop the mappings view() made (each goes once no view of it is left), so the folded
        graph's pages do not stay mapped into the process for the rest of the fold."""
        self._maps.clear()

    # -- writing -------------------------------------------------------------------------
    def clone_initializer(self, name: str, new_name: str, uses: list[tuple[onnx.NodeProto, int]]) -> str:
        """Add a copy of initializer `name` (same values; external data shared until saved) and
        point `uses` at it. Returns the copy's name."""
        base, k = new_name, 1
        while new_name in self.inits or new_name in self.consumers:
            new_name, k = f"{base}_{k}", k + 1
        t = self.model.graph.initializer.add()
        t.CopyFrom(self.inits[name])
        t.name = new_name
        self.inits[new_name] = t
        moved = []
        for node, idx in uses:
            node.input[idx] = new_name
            moved.append((node, idx))
        keep = [(n, i) for n, i in self.consumers.get(name, []) if not any(n is m and i == j for m, j in moved)]
        self.consumers[name] = keep
        self.consumers[new_name] = moved
        return new_name

    def set_internal(self, name: str, value: torch.Tensor) -> None:
        """Replace an in-proto initializer's values (same shape and dtype)."""
        t = self.inits[name]
        t.ClearField("float_data")
        t.ClearField("int32_data")
        t.ClearField("double_data")
        t.raw_data = tensor_bytes(value)

    def save(self, out_model: Path, out_data_name: str, data_tmp: Path | None, patched: dict,
             stages: dict | None = None) -> int:
        """Write the model proto to `out_model`. External initializers go to `data_tmp` (whose final
        name, relative to the model, is `out_data_name`; written through DataOut, O_DIRECT where the
        file system allows it), copied range by range, except those in `patched` (name -> a task
        with load(), compute(loaded) -> the new tensor, done(): merging.Task). Each task is loaded
        on a reader thread and computed on a compute thread, up to AHEAD tensors in front of the
        writer, so reading, merging and writing overlap; memory stays at a few tensors; done() is
        called once its bytes are written. Returns the bytes of external data written. `stages`
        (if given) accumulates the seconds spent waiting for patched values, writing them, copying
        the rest and syncing. The untouched initializers are written first (_write_order): offsets
        are recorded per tensor, so the order is free, and the disk is kept busy while the first
        merges start."""
        clock = Clock(stages)
        written = 0
        if data_tmp is not None:
            external = [t for t in self.model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
            todo = iter([t.name for t in external if t.name in patched])
            ahead: dict[str, Future] = {}
            fd = os.open(data_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            out = DataOut(fd, data_tmp)
            try:
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramerge-fold-read") as reader, \
                        ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramerge-fold") as worker:
                    def top_up():
                        while len(ahead) < AHEAD:
                            name = next(todo, None)
                            if name is None:
                                return
                            task = patched[name]
                            loaded = reader.submit(task.load)
                            ahead[name] = worker.submit(lambda t=task, f=loaded: t.compute(f.result()))
                    try:
                        top_up()
                        for t in _write_order(external, patched):
                            name = t.name
                            length = self._external(name)[2]
                            out.pad(ALIGNMENT if length >= ALIGN_LARGE else 64)
                            pos = out.pos
                            if name in patched:
                                with clock("wait"):
                                    value = ahead.pop(name).result()
                                top_up()
                                data = tensor_view(value)
                                if len(data) != length:
                                    raise OnnxError(f"internal error: new value of {name!r} has {len(data)} bytes, "
                                                    f"not {length}")
                                with clock("write"):
                                    out.write(data)
                                del value, data
                                patched[name].done()
                            else:
                                with clock("copy"):
                                    out.copy(*self._external(name), name)
                            _set_external(t, out_data_name, pos, length)
                            written += length
                    finally:
                        for f in ahead.values():
                            f.cancel()
                with clock("sync"):
                    out.finish()
                    os.fsync(fd)
            finally:
                os.close(fd)
        try:
            data = self.model.SerializeToString()
        except ValueError as e:
            raise OnnxError(f"{out_model}: the model proto would exceed protobuf's 2 GB limit ({e}); save the base "
                            "graph with external data (onnx.save(..., save_as_external_data=True)) and retry") from e
        _write_synced(out_model, data)
        return written


    def relocate(self, old: str, new: str, out_model: Path) -> None:
        """Point external tensors written to data file `old` at `new` and rewrite the proto."""
        for t in self.model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                for e in t.external_data:
                    if e.key == "location" and e.value == old:
                        e.value = new
        _write_synced(out_model, self.model.SerializeToString())


def _write_order(external: list, patched: dict) -> list:
    """The order external initializers go into the data file: the untouched ones first, then the
    patched ones, each in graph order. The writer copies while the first merges are read and
    computed (GPU start, first reads), instead of waiting for them; the order is fixed, so folding
    twice writes the same bytes."""
    return [t for t in external if t.name not in patched] + [t for t in external if t.name in patched]


def _write_synced(path: Path, data: bytes) -> None:
    """Write a model proto and make it durable before the caller's rename commits it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = key, value
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
