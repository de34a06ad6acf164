"""Folding into a graph with external data (issue 15): the streamed save computes merged tensors
ahead of the writer in the initializer's own (transposed) layout; results are checked against a
float64 reference rounded by numpy (one correct rounding), untouched bytes against the input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from loramerge.onnx import content, patch  # noqa: E402

H, I, R, ALPHA = 24, 40, 4, 8.0
SHAPES = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (8, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
NP = {TensorProto.FLOAT16: np.float16, TensorProto.FLOAT: np.float32}


@pytest.fixture(autouse=True)
def small_sample(monkeypatch):
    """A 4 x 4 grid (content.SAMPLE) so that these small weights (24..40 wide) are proposed by
    their sampled digest, as an 8B model's are by the default grid."""
    monkeypatch.setattr(content, "SAMPLE", 4)


def _build(tmp: Path, dtype: int, layers: int = 2, tweak=None):
    """A graph storing each Linear weight transposed under an exporter's name, all in one external
    data file; the base checkpoint with the same values; a PEFT adapter on every Linear.
    tweak(name, w) -> w changes a base weight (and its copy in the graph) as it is made."""
    from peft import LoraConfig

    g = np.random.default_rng(0)
    npt = NP[dtype]
    base, graph, data = {}, [], bytearray()
    nodes, outputs, lora = [], [], {}
    k = 0
    for layer in range(layers):
        norm = f"model.layers.{layer}.input_layernorm.weight"
        base[norm] = (1 + 0.1 * g.standard_normal(H)).astype(npt)
        graph.append((norm, base[norm], "Mul"))
        for mod, shape in SHAPES.items():
            name = f"model.layers.{layer}.{mod}.weight"
            base[name] = (0.05 * g.standard_normal(shape)).astype(npt)
            if tweak is not None:
                base[name] = tweak(name, base[name])
            k += 1
            graph.append((f"onnx::MatMul_{k}", np.ascontiguousarray(base[name].T), "MatMul"))
            pre = f"base_model.model.model.layers.{layer}.{mod}"
            lora[pre + ".lora_A.weight"] = g.standard_normal((R, shape[1])).astype(np.float32) / 4
            lora[pre + ".lora_B.weight"] = g.standard_normal((shape[0], R)).astype(np.float32) / 64
    inits = []
    for name, value, op in graph:
        if len(data) % 64:
            data += b"\0" * (64 - len(data) % 64)
        t = TensorProto(name=name, data_type=dtype, dims=list(value.shape), data_location=TensorProto.EXTERNAL)
        for key, val in (("location", "model.onnx.data"), ("offset", str(len(data))), ("length", str(value.nbytes))):
            e = t.external_data.add()
            e.key, e.value = key, val
        data += value.tobytes()
        inits.append(t)
        x = "x_h" if value.shape[0] == H else "x_i"
        nodes.append(helper.make_node(op, [x if op == "MatMul" else "x_h", name], [name + ".out"],
                                      name=f"/n{len(nodes)}/{op}"))
        outputs.append(helper.make_tensor_value_info(name + ".out", dtype, [1, value.shape[-1]]))
    ins = [helper.make_tensor_value_info("x_h", dtype, [1, H]), helper.make_tensor_value_info("x_i", dtype, [1, I])]
    model = helper.make_model(helper.make_graph(nodes, "g", ins, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    gdir = tmp / "graph"
    gdir.mkdir()
    (gdir / "model.onnx").write_bytes(model.SerializeToString())
    (gdir / "model.onnx.data").write_bytes(bytes(data))
    bdir = tmp / "base"
    bdir.mkdir()
    save_file({n: torch.from_numpy(v) for n, v in base.items()}, str(bdir / "model.safetensors"))
    (bdir / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    adir = tmp / "adapter"
    LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"]).save_pretrained(str(adir))
    save_file({n: torch.from_numpy(v) for n, v in lora.items()}, str(adir / "adapter_model.safetensors"))
    expected = {}
    for (name, value, op), (bname, w) in zip(graph, base.items()):
        if op == "MatMul":
            pre = "base_model.model." + bname.removesuffix(".weight")
            b, a = lora[pre + ".lora_B.weight"].astype(np.float64), lora[pre + ".lora_A.weight"].astype(np.float64)
            exact = w.astype(np.float64) + (ALPHA / R) * (b @ a)
            expected[name] = np.ascontiguousarray(exact.astype(npt).T)  # numpy rounds float64 -> half once
        else:
            expected[name] = value
    return gdir / "model.onnx", bdir, adir, expected


def _initializers(path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))  # loads the external data too
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.FLOAT])
def test_transposed_external_fold_matches_the_float64_reference(tmp_path, dtype, device):
    """On a GPU, pending matches are settled by a bit-for-bit comparison there and W.T is a view."""
    graph, base, adapter, expected = _build(tmp_path, dtype)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    report = patch.fold(graph, out, [adapter], base=base, device=device)
    assert len(report.matched) == 8 and not report.missing
    got = _initializers(out)
    assert set(got) == set(expected)
    for name, want in expected.items():
        if dtype == TensorProto.FLOAT16 or not name.startswith("onnx::"):
            assert np.array_equal(got[name].view(np.uint8), want.view(np.uint8)), name  # correctly rounded, bit for bit
        else:  # float32 accumulation: within float32 rounding of the exact value
            np.testing.assert_allclose(got[name], want, rtol=2e-6, atol=1e-7)
    m = onnx.load(str(out), load_external_data=False)
    for t in m.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "folded.onnx.data" and int(info["offset"]) % 64 == 0


def test_failure_while_saving_leaves_nothing(tmp_path, monkeypatch):
    graph, base, adapter, _ = _build(tmp_path, TensorProto.FLOAT16, layers=3)
    real, calls = patch.engine.compute, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(patch.engine, "compute", flaky)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(RuntimeError, match="disk on fire"):
        patch.fold(graph, out_dir / "folded.onnx", [adapter], base=base, device="cpu")
    assert list(out_dir.iterdir()) == []
    assert len(calls) < 12  # the writer stopped asking for more once one failed


def test_copied_ranges_are_byte_identical(tmp_path):
    # an adapter on one module only: every other initializer's bytes pass through untouched
    graph, base, adapter, expected = _build(tmp_path, TensorProto.FLOAT16)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file
    lora = {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "q_proj" in k}
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "folded.onnx"
    patch.fold(graph, out, [adapter], base=base, device="cpu")
    before, after = _initializers(graph), _initializers(out)
    changed = {n for n in before if not np.array_equal(before[n].view(np.uint8), after[n].view(np.uint8))}
    assert changed == {"onnx::MatMul_1", "onnx::MatMul_5"}  # the two q_proj weights


def test_direct_and_buffered_saves_write_the_same_bytes(tmp_path, monkeypatch):
    """The data file goes to the disk with O_DIRECT where the file system takes it (writers/direct.py),
    copied ranges read into aligned buffers: the same bytes as buffered writes with copy_file_range."""
    import errno
    import fcntl
    import os

    from loramerge.writers import direct

    graph, base, adapter, _ = _build(tmp_path, TensorProto.FLOAT16, layers=3)
    monkeypatch.setattr(direct, "STAGE", 2 * direct.ALIGN)  # tiny tensors: flush the staging often
    monkeypatch.setattr(direct, "COPY_CHUNK", direct.ALIGN + 64)
    direct_bytes, real_write = [0], os.write

    def spy(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_bytes[0] += len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    outs = {}
    for mode in ("direct", "buffered"):
        if mode == "buffered":
            monkeypatch.setenv("LORAMERGE_BUFFERED_WRITES", "1")
        (tmp_path / mode).mkdir()
        patch.fold(graph, tmp_path / mode / "folded.onnx", [adapter], base=base, device="cpu")
        outs[mode] = {f.name: f.read_bytes() for f in (tmp_path / mode).iterdir()}
        if mode == "direct":
            probe = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT)
            try:
                fcntl.fcntl(probe, fcntl.F_SETFL, fcntl.fcntl(probe, fcntl.F_GETFL) | os.O_DIRECT)
                assert direct_bytes[0] > 0  # this file system takes O_DIRECT: it was used
            except OSError as e:
                assert e.errno == errno.EINVAL
            finally:
                os.close(probe)
    assert outs["direct"] == outs["buffered"] and set(outs["direct"]) == {"folded.onnx", "folded.onnx.data"}


def _stored(graph: Path, bname: str, base: Path) -> tuple[str, int]:
    """(initializer, data offset) of the graph's copy of base tensor `bname` (stored transposed)."""
    from safetensors.torch import load_file

    w = load_file(str(base / "model.safetensors"))[bname].numpy().T
    m = onnx.load(str(graph), load_external_data=False)
    data = (graph.parent / "model.onnx.data").read_bytes()
    for t in m.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        off, n = int(info["offset"]), int(info["length"])
        if tuple(t.dims) == w.shape and data[off:off + n] == np.ascontiguousarray(w).tobytes():
            return t.name, off
    raise AssertionError(bname)


DOWN = "model.layers.{}.mlp.down_proj.weight"   # stored [40, 24]: content matching samples its rows


def test_initializers_alike_in_the_sampled_rows_are_told_apart_by_the_rest(tmp_path):
    """Content matching proposes candidates from a digest of a grid (content.sample_digest); two
    initializers that agree there but differ in one other row must each still be matched to their
    own base tensor, and folded as such."""
    from loramerge.onnx.content import sample_digest

    seen = {}

    def tweak(name, w):
        if name == DOWN.format(1):   # layer 1's down_proj: layer 0's but for one column (a stored row)
            w = seen[DOWN.format(0)].copy()
            w[:, 1] = -w[:, 1] + np.float16(0.01)
        seen[name] = w
        return w

    graph, base, adapter, expected = _build(tmp_path, TensorProto.FLOAT16, tweak=tweak)
    s0, s1 = (torch.from_numpy(np.ascontiguousarray(seen[DOWN.format(i)].T)) for i in (0, 1))
    assert sample_digest(s0) == sample_digest(s1) and not torch.equal(s0, s1)  # the premise
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    report = patch.fold(graph, out, [adapter], base=base, device="cpu")
    assert len(report.matched) == 8 and not report.missing
    for i in (0, 1):
        name, _ = _stored(graph, DOWN.format(i), base)
        assert any(line.startswith(DOWN.format(i) + " -> " + name + " ") for line in report.matched), report.matched
    got = _initializers(out)
    for name, want in expected.items():
        assert np.array_equal(got[name].view(np.uint8), want.view(np.uint8)), name


def test_a_near_miss_outside_the_sampled_rows_is_refused(tmp_path):
    """One element one ulp off, in a row the sampled digest does not read: not a match."""
    from loramerge.errors import OnnxError

    graph, base, adapter, _ = _build(tmp_path, TensorProto.FLOAT16)
    name, off = _stored(graph, DOWN.format(0), base)
    with open(graph.parent / "model.onnx.data", "r+b") as f:   # stored row 1, column 5
        f.seek(off + (24 + 5) * 2)
        x = np.frombuffer(f.read(2), np.int16).copy()
        f.seek(off + (24 + 5) * 2)
        f.write((x + 1).tobytes())
    with pytest.raises(OnnxError, match="could be them") as e:
        patch.fold(graph, tmp_path / "o.onnx", [adapter], base=base, device="cpu")
    assert name in str(e.value) and DOWN.format(0) + ": not found" in str(e.value)


def test_view_reads_what_read_reads(tmp_path):
    """Content matching reads external data through a private mapping (graph.view): the same
    values as read(), for aligned and unaligned offsets, and nothing written back to the file."""
    from loramerge.onnx.graph import OnnxGraph

    graph, *_ = _build(tmp_path, TensorProto.FLOAT16)
    data = graph.parent / "model.onnx.data"
    before = data.read_bytes()
    g = OnnxGraph(graph)
    for name in g.inits:
        v = g.view(name)
        assert torch.equal(v.view(torch.int16), g.read(name).view(torch.int16)), name
        v.view(torch.int16)[0] += 1   # a private mapping: the file must not change
    assert data.read_bytes() == before
    g.release_views()
    assert torch.equal(g.view(name), g.read(name))
    m = onnx.load(str(graph), load_external_data=False)   # an odd offset: read() instead of a mapping
    t = m.graph.initializer[1]
    info = {e.key: e.value for e in t.external_data}
    want = g.read(t.name)
    data.write_bytes(b"\0" + before)
    for e in t.external_data:
        if e.key == "offset":
            e.value = str(int(info["offset"]) + 1)
    odd = graph.with_name("odd.onnx")
    odd.write_bytes(m.SerializeToString())
    g2 = OnnxGraph(odd)
    assert torch.equal(g2.view(t.name).view(torch.int16), want.view(torch.int16))


def _spy_reads(monkeypatch):
    from loramerge.readers.checkpoint import Checkpoint

    reads, rows = [], []
    real_read, real_rows = Checkpoint.read, Checkpoint.read_rows
    monkeypatch.setattr(Checkpoint, "read", lambda self, ref, out=None: (reads.append(ref.name),
                                                                          real_read(self, ref, out))[1])
    monkeypatch.setattr(Checkpoint, "read_rows", lambda self, ref, r: (rows.append(ref.name),
                                                                       real_rows(self, ref, r))[1])
    folds = []
    real_fold = patch._fold
    monkeypatch.setattr(patch, "_fold", lambda *a, defer: (folds.append(defer), real_fold(*a, defer=defer))[1])
    return reads, rows, folds


def test_samples_propose_and_the_merge_confirms_reading_each_base_tensor_once(tmp_path, monkeypatch):
    """With a base, a sampled tensor is matched from SAMPLE rows of it, and read whole once, by the
    merge, which also compares it with the initializer (a tensor too small to sample is read by
    matching as well); the result is the float64 reference's."""
    graph, base, adapter, expected = _build(tmp_path, TensorProto.FLOAT16)
    reads, rows, folds = _spy_reads(monkeypatch)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    report = patch.fold(graph, out, [adapter], base=base, device="cpu")
    assert folds == [True] and len(report.matched) == 8
    big = [f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in SHAPES if content.sampled(SHAPES[m])]
    assert len(big) == 6 and sorted(rows) == sorted(big)           # k_proj (8 wide) is digested whole
    small = [f"model.layers.{i}.self_attn.k_proj.weight" for i in (0, 1)]   # whole: by matching, then the merge
    assert sorted(reads) == sorted(big + small + small)
    got = _initializers(out)
    for name, want in expected.items():
        assert np.array_equal(got[name].view(np.uint8), want.view(np.uint8)), name


@pytest.mark.parametrize("device", DEVICES)
def test_a_pending_match_that_does_not_hold_starts_the_fold_over(tmp_path, monkeypatch, device):
    """A near miss outside the grid is proposed, taken pending, refuted by the merge's comparison:
    the fold starts over matching in full, which finds no holder and refuses; nothing is written."""
    from loramerge.errors import OnnxError

    graph, base, adapter, _ = _build(tmp_path, TensorProto.FLOAT16)
    name, off = _stored(graph, DOWN.format(1), base)
    with open(graph.parent / "model.onnx.data", "r+b") as f:   # stored row 1 (not in the grid), column 5
        f.seek(off + (24 + 5) * 2)
        x = np.frombuffer(f.read(2), np.int16).copy()
        f.seek(off + (24 + 5) * 2)
        f.write((x + 1).tobytes())
    assert 1 not in content.spread(40).tolist()
    _, _, folds = _spy_reads(monkeypatch)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(OnnxError, match="could be them") as e:
        patch.fold(graph, tmp_path / "o.onnx", [adapter], base=base, device=device)
    assert folds == [True, False] and DOWN.format(1) + ": not found" in str(e.value)
    assert sorted(tmp_path.rglob("*")) == before   # no output, no staging left


def test_read_rows_reads_the_rows_read_reads(tmp_path):
    from loramerge.readers.checkpoint import open_checkpoint

    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(37, 5, generator=g).to(torch.bfloat16), "b": torch.randn(9, 3, 4, generator=g)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    for path in (tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin"):
        ck = open_checkpoint(path)
        for name, t in tensors.items():
            rows = [0, 3, t.shape[0] - 1, 3]
            got = ck.read_rows(ck.tensors[name], rows)
            assert got.dtype == t.dtype and torch.equal(got, t[rows]), (path, name)
        with pytest.raises(IndexError):
            ck.read_rows(ck.tensors["a"], [37])


def test_untouched_initializers_go_first_and_folding_twice_writes_the_same_bytes(tmp_path):
    """graph._write_order puts the untouched initializers first (the writer copies them while the
    first merges start), each group in graph order; the order is fixed, so two folds write the
    same bytes, and every tensor is where the model says."""
    graph, base, adapter, expected = _build(tmp_path, TensorProto.FLOAT16)
    outs = []
    for k in (1, 2):
        out = tmp_path / f"out{k}" / "folded.onnx"
        out.parent.mkdir()
        patch.fold(graph, out, [adapter], base=base, device="cpu")
        outs.append(out)
    assert (outs[0].parent / "folded.onnx.data").read_bytes() == (outs[1].parent / "folded.onnx.data").read_bytes()
    m = onnx.load(str(outs[0]), load_external_data=False)
    offsets = {t.name: int({e.key: e.value for e in t.external_data}["offset"]) for t in m.graph.initializer}
    norms = [n for n in offsets if n.endswith("layernorm.weight")]
    mats = [n for n in offsets if n.startswith("onnx::")]
    graph_order = [t.name for t in m.graph.initializer]
    assert max(offsets[n] for n in norms) < min(offsets[n] for n in mats)
    assert sorted(norms, key=offsets.get) == [n for n in graph_order if n in norms]
    assert sorted(mats, key=offsets.get) == [n for n in graph_order if n in mats]
    got = _initializers(outs[0])
    for name, want in expected.items():
        assert np.array_equal(got[name].view(np.uint8), want.view(np.uint8)), name


def test_same_bits_decides_only_exact_copies():
    """merging._same_bits (the GPU's quick confirmation) is true only for the very bits of W as the
    match stores it; a converter's rounding of a tiny value is left to the canonical comparison."""
    from loramerge.onnx.merging import _same_bits
    from loramerge.onnx.targets import Match, Target

    w = (torch.randn(40, 24, generator=torch.Generator().manual_seed(3)) * 0.05).half()
    t = Target("x.weight", (40, 24), ())
    stored = w.T.contiguous()
    assert _same_bits(Match(t, "i", True, "content"), w, stored, torch.float16)
    assert not _same_bits(Match(t, "i", False, "content"), w, stored, torch.float16)   # layout
    tiny = stored.clone()
    w2 = w.clone()
    w2[5, 3] = 0.0                                   # W's value rounds to 0; the converter kept 2^-24
    tiny[3, 5] = 2.0 ** -24
    assert not _same_bits(Match(t, "i", True, "content"), w2, tiny, torch.float16)
    from loramerge.onnx.content import holds
    assert holds(tiny, w2.T)[0]                      # ... which the canonical comparison accepts


def _named_after_parameters(graph: Path, base: Path) -> dict[str, str]:
    """Rename the graph's `onnx::MatMul_N` initializers (and their uses) to the base parameters they
    hold, as an exporter that keeps parameter names would: old name -> new name."""
    from safetensors.torch import load_file

    m = onnx.load(str(graph), load_external_data=False)
    data = (graph.parent / "model.onnx.data").read_bytes()
    ws = {n: np.ascontiguousarray(w.numpy().T).tobytes() for n, w in load_file(str(base / "model.safetensors")).items()}
    renamed = {}
    for t in m.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        raw = data[int(info["offset"]):int(info["offset"]) + int(info["length"])]
        new = [n for n, b in ws.items() if b == raw and t.name.startswith("onnx::")]
        if new:
            renamed[t.name], t.name = new[0], new[0]
    for node in m.graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    graph.write_bytes(m.SerializeToString())
    return renamed


def test_name_matches_are_sampled_and_confirmed_by_the_merge(tmp_path, monkeypatch):
    """Initializers named after their parameters (stored transposed): proposed by the sampled
    digest (which also picks the layout of a square one), confirmed in full by the merge; a near
    miss outside the grid sends the fold back to comparing up front, which refuses it."""
    from loramerge.errors import OnnxError

    graph, base, adapter, expected = _build(tmp_path, TensorProto.FLOAT16)
    renamed = _named_after_parameters(graph, base)
    assert len(renamed) == 8
    reads, rows, folds = _spy_reads(monkeypatch)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    report = patch.fold(graph, out, [adapter], base=base, device="cpu")
    assert folds == [True] and report.how == {"name": 8}
    assert all("transposed" in line for line in report.matched)
    small = [f"model.layers.{i}.self_attn.k_proj.weight" for i in (0, 1)]
    assert sorted(reads) == sorted(list(renamed.values()) + small)   # sampled ones once, by the merge
    got = _initializers(out)
    for old, new in renamed.items():
        assert np.array_equal(got[new].view(np.uint8), expected[old].view(np.uint8)), new

    name = DOWN.format(1)
    with open(graph.parent / "model.onnx.data", "r+b") as f:   # stored row 1 (not in the grid), column 5
        _, off = _stored(graph, name, base)
        f.seek(off + (24 + 5) * 2)
        x = np.frombuffer(f.read(2), np.int16).copy()
        f.seek(off + (24 + 5) * 2)
        f.write((x + 1).tobytes())
    folds.clear()
    with pytest.raises(OnnxError) as e:
        patch.fold(graph, tmp_path / "o.onnx", [adapter], base=base, device="cpu")
    assert folds == [True, False] and "holds other values than the base tensor " + name in str(e.value)
