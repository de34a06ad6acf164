"""The streaming writer and output layout: byte-identical to safetensors' own serializer, mirrored
shards and index, re-sharding, single-file outputs, atomic replacement."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramerge
from conftest import adapter_dir, base_dir, load_dir
from loramerge.readers.checkpoint import read_safetensors_header
from loramerge.types import TORCH_TO_ST
from loramerge.writers.safetensors import SafetensorsWriter


def test_header_and_bytes_equal_safetensors_save_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=g).bfloat16(), "a": torch.randn(7, generator=g),
               "z.count": torch.arange(4, dtype=torch.int64), "h": torch.randn(2, 2, generator=g).half(),
               "flag": torch.tensor([True, False, True])}
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt"})
    # write in the order safetensors chose, so the files can be compared byte for byte
    refs, _ = read_safetensors_header(ref)
    order = sorted(refs, key=lambda n: refs[n].offset)
    ours = tmp_path / "ours.safetensors"
    entries = [(n, TORCH_TO_ST[tensors[n].dtype], tuple(tensors[n].shape),
                tensors[n].numel() * tensors[n].element_size()) for n in order]
    w = SafetensorsWriter(ours, entries, {"format": "pt"})
    for n in order:
        w.write(n, tensors[n])
    w.close()
    assert ours.read_bytes() == ref.read_bytes()


def test_writer_refuses_out_of_order_and_short_files(tmp_path):
    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", "F32", (2,), 8), ("b", "F32", (1,), 4)], None)
    with pytest.raises(RuntimeError, match="expected 'a'"):
        w.write("b", torch.zeros(1))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="closed before tensor 'b'"):
        w.close()


def test_sharded_base_is_mirrored_with_index(tmp_out):
    base = base_dir("llama-bf16-sharded")
    loramerge.apply(base, adapter_dir("llama-bf16"), tmp_out, sync=False)
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    out_index = json.loads((tmp_out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == base_index["weight_map"]
    tensors = load_dir(tmp_out)
    assert out_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in set(base_index["weight_map"].values()):
        _, meta = read_safetensors_header(tmp_out / shard)
        assert meta == {"format": "pt"}
        assert set(load_file(str(tmp_out / shard))) == set(load_file(str(base / shard)))


def test_bin_base_becomes_safetensors(tmp_out):
    loramerge.apply(base_dir("llama-bin-sharded"), adapter_dir("llama-bin"), tmp_out, sync=False)
    names = sorted(p.name for p in tmp_out.glob("*.safetensors"))
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not list(tmp_out.glob("*.bin"))
    index = json.loads((tmp_out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_dir(base_dir("llama-bin-sharded")))


def test_shard_size_reshards_and_single_file_output(tmp_path):
    out = tmp_path / "resharded"
    loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), out, shard_size="200KB", sync=False)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size < 200_000 + 70_000 for p in shards)
    single = tmp_path / "merged.safetensors"
    loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), single, sync=False)
    a, b = load_dir(out), load_file(str(single))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_override_updates_config(tmp_out):
    loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), tmp_out, dtype="bfloat16", sync=False)
    assert {t.dtype for t in load_dir(tmp_out).values()} == {torch.bfloat16}
    assert json.loads((tmp_out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_overwrite_replaces_only_when_complete(tmp_out):
    tmp_out.mkdir()
    (tmp_out / "keep.txt").write_text("old")
    with pytest.raises(loramerge.OutputError, match="already exists and is not empty; pass --overwrite"):
        loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), tmp_out)
    assert (tmp_out / "keep.txt").read_text() == "old"
    loramerge.apply(base_dir("llama-fp32"), adapter_dir("llama-basic"), tmp_out, overwrite=True, sync=False)
    assert not (tmp_out / "keep.txt").exists() and (tmp_out / "model.safetensors").exists()
    assert not [p for p in tmp_out.parent.iterdir() if ".loramerge-" in p.name], "temporaries left behind"
