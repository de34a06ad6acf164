"""The premerge worker's results written by the head start before the merge has planned
(writers/headstart.py, engine/premerge.py): the merge moves past such a tensor only where its own
key for the job is the worker's, and writes over it otherwise.

Each merge runs against a plain one and every file must be the same bytes (the manifest's sha256
included: the head start hashes what it wrote, and the writer goes on from there or goes back to
the state before a result it writes over); the report must say
how many tensors came from the worker."""

from __future__ import annotations

import json
import threading

import pytest
from click.testing import CliRunner

from conftest import adapter_dir, base_dir
from test_headstart import finished  # noqa: F401  (a fixture: the head start runs to its end)
from loramerge import apply
from loramerge.cli import main
from loramerge.engine import premerge
from loramerge.writers import headstart
from loramerge.writers.early import EarlyMerged
from loramerge.writers.direct import ALIGN

BASE, ADAPTER = base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16")


@pytest.fixture(autouse=True)
def small(monkeypatch):
    # the fixtures' tensors are KiB: every untouched one is copied (so a head start begins), and
    # results go out in chunks of two blocks, so a tensor takes several writes
    monkeypatch.setenv("LORAMERGE_PREMERGE", "1")
    monkeypatch.setattr(headstart, "MIN_BYTES", 0)
    monkeypatch.setattr(headstart, "CHUNK", 2 * ALIGN)


def _files(out):
    got = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    m = json.loads(got.pop("loramerge_manifest.json"))
    m.pop("created", None)
    got["loramerge_manifest.json"] = json.dumps(m, sort_keys=True).encode()
    return got


def _started(out, *, join=True, **kw):
    """A worker and a head start that writes its results, as the CLI starts them; with `join`,
    run to the head start's end (every result it could write is written)."""
    pre = premerge.begin(BASE, [ADAPTER], device="cpu", **kw)
    assert pre is not None, "no worker: the test would prove nothing"
    head = headstart.begin(BASE, [ADAPTER], out, premerge=pre)
    assert head is not None, "no head start: the test would prove nothing"
    if join:
        for t in head._threads:
            t.join()
    return pre, head


def _merge(out, pre, head, **kw):
    try:
        return apply(BASE, [ADAPTER], out, device="cpu", _head_start=head, _premerge=pre, **kw)
    finally:
        head.close()
        pre.close()


def _end(shard) -> int:
    return max(at + n for at, n in shard.places.values())


def _in_prefix(head) -> int:
    """How many results lie inside their shard's hashed prefix."""
    return sum(at < s.hashed[1] for s in head.shards if s.hashed for at in s.merged)


def _early(head) -> dict[str, EarlyMerged]:
    return {m.name: m for s in head.shards for m in s.merged.values()}


@pytest.mark.parametrize("buffered", [False, True])
def test_results_written_early_are_the_merge_own(tmp_path, monkeypatch, buffered):
    if buffered:
        monkeypatch.setenv("LORAMERGE_BUFFERED_WRITES", "1")
    plain = apply(BASE, [ADAPTER], tmp_path / "plain", device="cpu")
    pre, head = _started(tmp_path / "out")
    early = _early(head)
    assert len(early) == plain.tensors_merged > 0  # every target was written before the merge began
    assert any(m.end > m.start for m in early.values()) and any(m.head or m.tail for m in early.values())
    # the head start hashed every shard to its end (copies from the base, results as written): the
    # manifest's hashes below are the writer's only if it went on from those states rightly
    assert all(s.hashed is not None and s.hashed[1] == _end(s) for s in head.shards)
    report = _merge(tmp_path / "out", pre, head)
    assert _files(tmp_path / "out") == _files(tmp_path / "plain")
    assert report.tensors_premerged == report.tensors_merged == plain.tensors_merged
    assert pre.taken == 0  # none through the ring: all were written early and confirmed
    assert report.exact_fixups == plain.exact_fixups
    whole = sum(m.end - m.start for m in early.values())
    assert report.bytes_early >= whole > 0


def test_results_for_another_factor_are_written_over(tmp_path):
    """A worker told weight 0.5 for a merge at weight 1: the head start writes its (wrong) results,
    no key matches, and the merge computes and writes every target over them."""
    plain = apply(BASE, [ADAPTER], tmp_path / "plain", device="cpu")
    pre, head = _started(tmp_path / "out", weights=[0.5])
    assert len(_early(head)) == plain.tensors_merged == _in_prefix(head)  # each hashed: the hash goes back
    report = _merge(tmp_path / "out", pre, head)
    assert _files(tmp_path / "out") == _files(tmp_path / "plain")
    assert report.tensors_premerged == 0 and report.tensors_merged == plain.tensors_merged


def test_a_head_start_stopped_midway_leaves_the_rest_to_the_ring_and_the_merge(tmp_path, monkeypatch):
    """The head start is stopped in the middle of its third result (a block of it written): the
    two before are moved past, the third is not recorded and is taken from the ring, its
    half-written blocks written over, and the rest come through the ring."""
    monkeypatch.setattr(headstart, "CHUNK", ALIGN)  # a block per write: the fixtures' have 3 whole
    plain = apply(BASE, [ADAPTER], tmp_path / "plain", device="cpu")
    pre = premerge.begin(BASE, [ADAPTER], device="cpu")
    assert pre is not None
    calls = {"written": 0, "chunks": 0}
    stopped = threading.Event()
    ring_bytes, written_early = pre.ring_bytes, pre.written_early

    def counting_written(name, got):
        calls["written"] += 1
        written_early(name, got)

    def stopping_ring_bytes(got, start, end):
        if calls["written"] == 2 and end - start == ALIGN:
            calls["chunks"] += 1
            if calls["chunks"] == 2:
                head._stop.set()
                stopped.set()
        return ring_bytes(got, start, end)

    monkeypatch.setattr(pre, "written_early", counting_written)
    monkeypatch.setattr(pre, "ring_bytes", stopping_ring_bytes)
    head = headstart.begin(BASE, [ADAPTER], tmp_path / "out", premerge=pre)
    assert head is not None
    for t in head._threads:
        t.join()
    assert stopped.is_set(), "not stopped midway: the test would prove nothing"
    assert len(_early(head)) == 2
    report = _merge(tmp_path / "out", pre, head)
    assert _files(tmp_path / "out") == _files(tmp_path / "plain")
    assert report.tensors_premerged == report.tensors_merged == plain.tensors_merged
    assert pre.taken == plain.tensors_merged - 2


def test_a_result_whose_bytes_differ_is_caught_by_the_key_not_trusted(tmp_path):
    """What the head start wrote is moved past on the key alone; a key from another worker run
    (here: of a merge at another weight) on bytes of this one is written over."""
    plain = apply(BASE, [ADAPTER], tmp_path / "plain", device="cpu")
    other_pre, other_head = _started(tmp_path / "other", weights=[0.5])
    other = _early(other_head)
    other_head.close()
    other_pre.close()
    pre, head = _started(tmp_path / "out")
    victim = next(m for m in _early(head).values() if m.end > m.start)
    victim.key = other[victim.name].key
    report = _merge(tmp_path / "out", pre, head)
    assert _files(tmp_path / "out") == _files(tmp_path / "plain")
    assert report.tensors_premerged == report.tensors_merged - 1


def test_the_cli_writes_the_worker_results_early(tmp_path, finished):
    """The CLI as users run it, its head start run to its end before the merge (in-process the
    imports are done): every target from the worker, the same files as without either."""
    runner = CliRunner()
    got = runner.invoke(main, ["apply", str(BASE), str(ADAPTER), str(tmp_path / "out"), "--device", "cpu",
                               "--json", "-q"])
    assert got.exit_code == 0, got.output
    ref = runner.invoke(main, ["apply", str(BASE), str(ADAPTER), str(tmp_path / "ref"), "--device", "cpu",
                               "--json", "-q"],
                        env={"LORAMERGE_PREMERGE": "0", "LORAMERGE_NO_HEAD_START": "1"})
    assert ref.exit_code == 0, ref.output
    report, plain = json.loads(got.stdout), json.loads(ref.stdout)
    assert report["tensors_premerged"] == report["tensors_merged"] == plain["tensors_merged"] > 0
    assert report["bytes_early"] > 0 and plain["bytes_early"] == 0
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


def test_a_file_system_without_hard_links_copies_what_was_written(tmp_path, monkeypatch):
    """The head start's shards cannot be linked into the output: the writer starts fresh files
    and copies each confirmed result's blocks from the head start's file."""
    plain = apply(BASE, [ADAPTER], tmp_path / "plain", device="cpu")
    pre, head = _started(tmp_path / "out")

    def no_link(src, dst):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(headstart.os, "link", no_link)
    report = _merge(tmp_path / "out", pre, head)
    assert _files(tmp_path / "out") == _files(tmp_path / "plain")
    assert report.tensors_premerged == report.tensors_merged == plain.tensors_merged
    assert pre.taken == 0 and report.bytes_early == 0


def test_a_result_where_the_plan_copies_is_copied_and_hashed_as_the_base(tmp_path):
    """The worker and the head start work for the whole adapter; the merge is of one without its
    gate_proj factors (as if the adapter had changed since): where the plan copies a tensor whose
    result the head start wrote and hashed, the writer copies the base's bytes and its hash goes
    back to the state before that result; the other results are written over (other factors)."""
    import safetensors.torch

    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    config["target_modules"] = [m for m in config["target_modules"] if m != "gate_proj"]
    (other / "adapter_config.json").write_text(json.dumps(config))
    tensors = safetensors.torch.load_file(ADAPTER / "adapter_model.safetensors")
    safetensors.torch.save_file({k: v for k, v in tensors.items() if "gate_proj" not in k},
                                other / "adapter_model.safetensors")
    plain = apply(BASE, [other], tmp_path / "plain", device="cpu")
    pre, head = _started(tmp_path / "out")
    gates = [m for m in _early(head).values() if "gate_proj" in m.name]
    assert gates and _in_prefix(head) == len(_early(head))
    try:
        report = apply(BASE, [other], tmp_path / "out", device="cpu", _head_start=head, _premerge=pre)
    finally:
        head.close()
        pre.close()
    assert _files(tmp_path / "out") == _files(tmp_path / "plain")
    assert report.tensors_copied == plain.tensors_copied and report.tensors_merged == plain.tensors_merged


def _with_empty_tensors(dst):
    """The fixture base with zero-size tensors added to each shard (a (0,) bias before the tensor
    it sorts before: it has that tensor's offset), which offset-keyed bookkeeping would mix up."""
    import shutil

    import safetensors.torch
    import torch

    shutil.copytree(BASE, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in sorted(dst.glob("*.safetensors")):
        tensors = safetensors.torch.load_file(shard)
        for name in list(tensors):
            if name.endswith(".weight") and ("down_proj" in name or "embed_tokens" in name or "norm" in name):
                empty = name[: -len("weight")] + "bias"
                tensors[empty] = torch.zeros(0, dtype=tensors[name].dtype)
                index["weight_map"][empty] = shard.name
        safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("worker", [False, True])
def test_zero_size_tensors_share_an_offset_and_nothing_is_mixed_up(tmp_path, worker):
    """A zero-size tensor lies at the offset of the tensor after it (an untouched copy, a target,
    a norm): the head start's copies, hashes and results, the writer's ranges and marks, are keyed
    by offset, and none may be taken for the other's."""
    base = _with_empty_tensors(tmp_path / "base")
    plain = apply(base, [ADAPTER], tmp_path / "plain", device="cpu")
    assert plain.tensors_copied > 0
    pre = premerge.begin(base, [ADAPTER], device="cpu") if worker else None
    assert pre is not None or not worker
    head = headstart.begin(base, [ADAPTER], tmp_path / "out", premerge=pre)
    assert head is not None
    for t in head._threads:
        t.join()
    assert any(s.hashed and s.hashed[1] > len(s.header) for s in head.shards)
    try:
        report = apply(base, [ADAPTER], tmp_path / "out", device="cpu", _head_start=head, _premerge=pre)
    finally:
        head.close()
        if pre is not None:
            pre.close()
    assert _files(tmp_path / "out") == _files(tmp_path / "plain")
    assert report.bytes_early > 0 and report.tensors_premerged == (plain.tensors_merged if worker else 0)
