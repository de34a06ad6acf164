"""The head start (writers/headstart.py): untouched tensors written while the process starts.

Each merge here runs twice, with and without a head start, and the outputs must be the same bytes;
what the head start wrote must be counted, and whatever it got wrong (a guessed header, a target it
took for untouched, a range it did not finish) must leave no trace in the output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import adapter_dir, base_dir
from test_hub import cache_repo, hf_cache, tree  # noqa: F401  (hf_cache: a fixture)
from loramerge import apply
from loramerge.cli import main
from loramerge.writers import early as early_files
from loramerge.writers import headstart
from loramerge.writers.direct import ALIGN, DirectSink, aligned_buffer
from loramerge.writers.header import METADATA, build_header, data_offsets

# the merge adds a tensor (the tied lm_head, untied by an lm_head or embedding change): the guessed
# header is not the plan's, and nothing is taken over
LAYOUT_CHANGES = [("qwen2", "qwen2-lmhead"), ("qwen2", "qwen2-embed")]
PAIRS = [("llama-fp32", "llama-basic"), ("llama-bf16-sharded", "llama-bf16"), ("qwen2", "qwen2-lmhead"),
         ("qwen2", "qwen2-embed"), ("qwen2", "qwen2-bias"), ("llama-fp32", "llama-embed"),
         ("llama-fp32", "llama-layers"), ("gpt2", "gpt2-fifo")]


@pytest.fixture(autouse=True)
def small(monkeypatch):
    # the fixtures' tensors are KiB, not MiB: every tensor with a whole block inside counts, and the
    # copies go in chunks of three blocks, so a tensor takes several
    monkeypatch.setattr(headstart, "MIN_BYTES", 0)
    monkeypatch.setattr(headstart, "CHUNK", 3 * ALIGN)
    # no premerge worker, whatever the machine's cores: what is written early is the copies alone
    # (tests/test_premerge_early.py writes its results)
    monkeypatch.setenv("LORAMERGE_PREMERGE", "0")


def _files(out: Path) -> dict[str, bytes]:
    """Every file of an output; the manifest without its creation time."""
    got = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    m = json.loads(got.pop("loramerge_manifest.json"))
    m.pop("created", None)
    got["loramerge_manifest.json"] = json.dumps(m, sort_keys=True).encode()
    return got


def _merge(base: Path, adapter: Path, out: Path, head=None, **kw):
    try:
        return apply(base, [adapter], out, device="cpu", _head_start=head, **kw)
    finally:
        if head is not None:
            head.close()


@pytest.fixture
def finished(monkeypatch):
    """The CLI's head start runs to its end before the merge starts: in-process the imports are
    already done, so the merge would otherwise stop it after however much it got to."""
    begin = headstart.begin

    def begin_and_finish(*args, **kwargs):
        head = begin(*args, **kwargs)
        for t in head._threads if head is not None else ():
            t.join()
        return head
    monkeypatch.setattr(headstart, "begin", begin_and_finish)


def _staging_left(parent: Path) -> list[str]:
    return [n for n in os.listdir(parent) if ".loramerge-" in n]


def _started(base, adapter, out) -> headstart.HeadStart:
    head = headstart.begin(base, [adapter], out)
    assert head is not None, "no head start: the test would prove nothing"
    for t in head._threads:  # they finish (the fixtures are small): what they did is then known
        t.join()
    return head


def _untouched_interiors(base: Path, adapter: Path, scratch: Path) -> int:
    """Bytes of whole blocks inside the base tensors the merge copies bit for bit, by its plan, in
    the shards whose guessed header is the plan's."""
    plan = apply(base, [adapter], scratch / "never-written", device="cpu", dry_run=True).plan
    shards, copies = headstart.guess(base, [adapter]) or ([], [])
    total = 0
    for f in plan.files:
        s_i = next((i for i, s in enumerate(shards) if s.path.name == f.name), None)
        entries = [e for j in f.jobs for e in j.entries]
        if s_i is None or shards[s_i].header != build_header(entries, METADATA):
            continue
        at = dict(zip(data_offsets(entries, METADATA), (j for j in f.jobs for _ in j.entries)))
        total += sum(c.end - c.start for c in copies if c.write and c.file == s_i and at[c.out_offset].kind == "copy")
    return total


@pytest.mark.parametrize("base,adapter", PAIRS)
def test_a_head_start_writes_what_the_merge_copies_and_the_output_is_the_same(tmp_path, base, adapter):
    changes_layout = (base, adapter) in LAYOUT_CHANGES
    base, adapter = base_dir(base), adapter_dir(adapter)
    ref = _merge(base, adapter, tmp_path / "ref")
    got = _merge(base, adapter, tmp_path / "out", _started(base, adapter, tmp_path / "out"))
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
    assert got.bytes_written == ref.bytes_written and ref.bytes_early == 0
    # every whole block of every tensor it guessed untouched, and the plan copies, was not written again
    expected = _untouched_interiors(base, adapter, tmp_path)
    assert got.bytes_early == expected and (expected == 0) == changes_layout
    assert _staging_left(tmp_path) == []


@pytest.mark.parametrize("base,adapter", [("llama-fp32", "llama-basic"), ("llama-bf16-sharded", "llama-bf16")])
def test_a_target_taken_for_untouched_is_merged_all_the_same(tmp_path, monkeypatch, base, adapter):
    """The guess says no tensor is touched: the head start copies (and hashes, where they lead a
    shard) the base's targets too, and the writer must write and hash the merged values instead."""
    base, adapter = base_dir(base), adapter_dir(adapter)
    ref = _merge(base, adapter, tmp_path / "ref")
    expected = _untouched_interiors(base, adapter, tmp_path)
    monkeypatch.setattr(headstart, "touched_by", lambda names: lambda name: False)
    head = _started(base, adapter, tmp_path / "out")
    assert head.written > expected  # it did copy targets
    got = _merge(base, adapter, tmp_path / "out", head)
    assert ref.tensors_merged > 0
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
    assert got.bytes_early == expected


@pytest.mark.parametrize("buffered", [False, True])
def test_what_the_head_start_did_not_finish_is_written_by_the_merge(tmp_path, monkeypatch, buffered):
    """Ranges cut short (stopped mid-copy), with garbage where the head start had not written:
    the writer writes all but the finished blocks (O_DIRECT or buffered, both sides)."""
    if buffered:
        monkeypatch.setenv("LORAMERGE_BUFFERED_WRITES", "1")
    base, adapter = base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16")
    _merge(base, adapter, tmp_path / "ref")
    head = _started(base, adapter, tmp_path / "out")
    real_stop, skipped = head.stop, []

    def stop_short():
        shards = real_stop()
        for s in shards.values():
            if not s.path.exists():
                continue
            with open(s.path, "r+b") as f:
                for at, r in s.ranges.items():
                    if r.end <= r.start:
                        continue
                    r.end = r.start + (r.end - r.start) // ALIGN // 2 * ALIGN  # half its blocks
                    f.seek(at)
                    f.write(b"\xff" * (r.start - at))  # the partial block before: never the head start's
                    f.seek(r.end)
                    f.write(b"\xff" * (at + r.nbytes - r.end))
                    skipped.append(r.end - r.start)
        return shards

    head.stop = stop_short
    got = _merge(base, adapter, tmp_path / "out", head)
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
    assert got.bytes_early == sum(skipped) > 0


def test_a_wrong_header_guess_is_not_taken_over(tmp_path):
    base, adapter = base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16")
    _merge(base, adapter, tmp_path / "ref")
    head = _started(base, adapter, tmp_path / "out")
    for s in head.shards:
        s.header = s.header[:-1] + b"!"  # one byte off
    got = _merge(base, adapter, tmp_path / "out", head)
    assert got.bytes_early == 0
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")  # no stray shard either
    assert _staging_left(tmp_path) == []


def test_a_copy_from_another_file_or_offset_is_not_skipped(tmp_path):
    """A range is moved past only for the same tensor bytes: same file (device, inode) and offset."""
    base, adapter = base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16")
    _merge(base, adapter, tmp_path / "ref")
    head = _started(base, adapter, tmp_path / "out")
    real_stop = head.stop

    def stop_elsewhere():
        shards = real_stop()
        kept = 0
        for s in shards.values():
            s.hashed = None  # (its ranges may be in the hashed prefix, which would show the change anyway)
            if not s.path.exists():
                continue
            with open(s.path, "r+b") as f:
                for at, r in list(s.ranges.items()):
                    if r.end <= r.start:
                        continue
                    f.seek(r.start)
                    f.write(b"\xee" * (r.end - r.start))  # garbage in every copied block: any skip shows
                    if kept == 0:
                        r.src = (r.src[0], r.src[1] + 1)  # another file
                    elif kept == 1:
                        r.src_offset += 2                 # another place in the same file
                    else:
                        del s.ranges[at]
                    kept += 1
        assert kept >= 2
        return shards

    head.stop = stop_elsewhere
    got = _merge(base, adapter, tmp_path / "out", head)
    assert got.bytes_early == 0
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


def test_a_failed_run_leaves_nothing_of_its_head_start(tmp_path):
    base, adapter = base_dir("llama-fp32"), adapter_dir("llama-basic")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["apply", str(base), str(adapter), str(out), "--weights", "1,2"])
    assert result.exit_code != 0 and "--weights" in result.output
    assert not out.exists() and _staging_left(tmp_path) == []


def test_the_cli_takes_a_head_start_and_says_how_much(tmp_path, finished):
    base, adapter = base_dir("llama-fp32"), adapter_dir("llama-basic")
    runner = CliRunner()
    got = runner.invoke(main, ["apply", str(base), str(adapter), str(tmp_path / "out"), "--json"])
    ref = runner.invoke(main, ["apply", str(base), str(adapter), str(tmp_path / "ref"), "--json"],
                        env={"LORAMERGE_NO_HEAD_START": "1"})
    assert got.exit_code == 0 and ref.exit_code == 0, got.output + ref.output
    early = json.loads(got.stdout)["bytes_early"]
    assert early == _untouched_interiors(base, adapter, tmp_path) > 0 and json.loads(ref.stdout)["bytes_early"] == 0
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


@pytest.mark.parametrize("change", ["dtype", "shard_size", "single_file", "dry_run", "exists", "inside_base",
                                    "bin_adapter", "bin_base"])
def test_no_head_start_where_the_layout_is_not_the_bases(tmp_path, change):
    base, adapter, out = base_dir("llama-fp32"), adapter_dir("llama-basic"), tmp_path / "out"
    kw = {}
    if change in ("dtype", "shard_size", "dry_run"):
        kw = {"dtype": "bfloat16"} if change == "dtype" else {"shard_size": "1MB"} if change == "shard_size" \
            else {"dry_run": True}
    elif change == "single_file":
        out = tmp_path / "model.safetensors"
    elif change == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif change == "inside_base":
        out = base / "merged"
    elif change == "bin_adapter":
        adapter = adapter_dir("llama-bin")
    else:
        base = base_dir("llama-bin-sharded")
    assert headstart.guess(base_dir("llama-fp32"), [adapter_dir("llama-basic")]) is not None
    assert headstart.begin(base, [adapter], out, **kw) is None
    assert _staging_left(tmp_path) == [] and _staging_left(base) == []


def test_skip_moves_past_whole_blocks_only(tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        sink = DirectSink(fd, tmp_path / "f", direct=False)
        sink.write(b"a" * ALIGN)
        sink.skip(2 * ALIGN)
        sink.write(b"b" * 10)
        sink.finish()
        with pytest.raises(ValueError):
            sink.skip(ALIGN)  # from an unaligned position
    finally:
        os.close(fd)
    data = (tmp_path / "f").read_bytes()
    assert data[:ALIGN] == b"a" * ALIGN and data[3 * ALIGN:] == b"b" * 10 and data[ALIGN:3 * ALIGN] == bytes(2 * ALIGN)


def test_the_manifest_goes_on_from_the_head_starts_hash(tmp_path):
    """A shard's header and leading copied tensors are hashed by the head start; the writer's hash
    goes on from that state (a wrong state shows in the manifest, the shard's bytes unchanged)."""
    import hashlib

    base, adapter = base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16")
    _merge(base, adapter, tmp_path / "ref")
    head = _started(base, adapter, tmp_path / "out")
    hashed = [s for s in head.shards if s.hashed is not None]
    assert hashed and all(s.hashed[1] > len(s.header) for s in hashed)
    victim = hashed[0]
    victim.hashed = (hashlib.sha256(b"not the shard's bytes"), victim.hashed[1])
    _merge(base, adapter, tmp_path / "out", head)
    got, ref = _files(tmp_path / "out"), _files(tmp_path / "ref")
    assert got.pop("loramerge_manifest.json") != ref.pop("loramerge_manifest.json")
    assert got == ref


def test_a_hashed_prefix_is_kept_only_if_the_plan_copies_all_of_it(tmp_path):
    src = tmp_path / "base.safetensors"
    src.write_bytes(b"x" * 100_000)
    st = os.stat(src)
    header = b"h" * 16
    early = early_files.EarlyFile(tmp_path / "early", header, hashed=("sha", 16 + 2 * 8192))
    early.path.write_bytes(b"")
    early.ranges = {16: early_files.EarlyRange((st.st_dev, st.st_ino), 100, 8192, 4096, 8192),
                    16 + 8192: early_files.EarlyRange((st.st_dev, st.st_ino), 9000, 8192, 12288, 12288)}
    plan = {16: (src, 100, 8192), 16 + 8192: (src, 9000, 8192)}
    got = early_files.adopt(early, header, tmp_path / "a", plan)
    assert got.hashed == ("sha", 16 + 2 * 8192) and list(got.ranges) == [16]  # the second wrote nothing
    early.path.write_bytes(b"")
    assert early_files.adopt(early, header + b" ", tmp_path / "b", plan) is None  # another header
    for other in [(src, 9001, 8192), (tmp_path / "early", 9000, 8192), None]:
        changed = {**plan, 16 + 8192: other} if other else {16: plan[16]}
        got = early_files.adopt(early, header, tmp_path / f"c{len(os.listdir(tmp_path))}", changed)
        assert got.hashed is None and list(got.ranges) == [16]
        early.path.write_bytes(b"")


def test_a_hashed_prefix_is_cut_at_the_first_tensor_the_plan_does_not_copy(tmp_path):
    """With the states at each tensor's start (EarlyFile.marks), a prefix is cut back, not dropped:
    to the start of the first tensor taken for a copy that the plan does not copy so; the writer
    gets the states at the results left inside it (where it may have to go back), no others."""
    import hashlib

    src = tmp_path / "base.safetensors"
    src.write_bytes(b"x" * 100_000)
    st = os.stat(src)
    header, n = b"h" * 16, 8192
    marks = {16 + i * n: hashlib.sha256(bytes([i])) for i in range(3)}
    early = early_files.EarlyFile(tmp_path / "early", header, hashed=(hashlib.sha256(b"all"), 16 + 3 * n),
                                  marks=marks)
    early.path.write_bytes(b"")
    early.ranges = {16 + 2 * n: early_files.EarlyRange((st.st_dev, st.st_ino), 0, n, 16 + 2 * n, 16 + 2 * n)}
    early.merged = {at: object() for at in (16, 16 + n)}  # two results, then a copy
    got = early_files.adopt(early, header, tmp_path / "a", {16 + 2 * n: (src, 0, n)})
    assert got.hashed[1] == 16 + 3 * n and set(got.marks) == {16, 16 + n}
    early.path.write_bytes(b"")
    got = early_files.adopt(early, header, tmp_path / "b", {16 + 2 * n: (src, 1, n)})  # another offset
    assert got.hashed[1] == 16 + 2 * n and got.hashed[0].digest() == marks[16 + 2 * n].digest()
    assert got.hashed[0] is not marks[16 + 2 * n] and set(got.marks) == {16, 16 + n}
    early.path.write_bytes(b"")
    early.ranges[16] = early_files.EarlyRange((st.st_dev, st.st_ino), 0, n, 16, 16)  # the first is a copy now
    del early.merged[16]
    got = early_files.adopt(early, header, tmp_path / "c", {16 + 2 * n: (src, 0, n)})  # not copied by the plan
    assert got.hashed[1] == 16 and got.marks == {}


@pytest.mark.parametrize("small_chunks", [False, True])
def test_the_hashing_holds_one_read_buffer_not_one_per_shard(tmp_path, monkeypatch, small_chunks):
    """Every shard's hash stays open while the head start runs (a result may come for it), but
    the shards of a hashing thread share its one read buffer: HASH_CHUNK at most, else the largest
    tensor's bytes rounded up to whole blocks (a 400 GB model has ~100 shards); the copying thread's
    is CHUNK at most, else the largest copy's whole blocks. Each shard's hash is its header and
    first tensor's, whatever the chunks."""
    import hashlib
    import tracemalloc

    import numpy as np
    from safetensors.numpy import save_file

    from loramerge.writers import shard_hash
    from loramerge.writers.manifest import SOURCE_CHUNK

    if small_chunks:  # both caps below the tensors' sizes: several reads and writes per tensor
        monkeypatch.setattr(shard_hash, "HASH_CHUNK", 5 * ALIGN)
        monkeypatch.setattr(headstart, "CHUNK", 3 * ALIGN)
    else:  # both above: one buffer of each tensor's size
        monkeypatch.setattr(headstart, "CHUNK", 1 << 30)
    base, shards, norm = tmp_path / "base", 12, SOURCE_CHUNK // 4 + 250  # 1000 bytes past whole blocks
    base.mkdir()
    weight_map, firsts = {}, []
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        # an untouched tensor larger than a read buffer, then a target that stops the shard's hash
        first = np.random.default_rng(i).standard_normal(norm).astype(np.float32)
        firsts.append(first.tobytes())
        save_file({f"model.layers.{i}.a_norm.weight": first,
                   f"model.layers.{i}.self_attn.q_proj.weight": np.zeros((64, 64), np.float32)}, base / name)
        weight_map.update({f"model.layers.{i}.a_norm.weight": name, f"model.layers.{i}.self_attn.q_proj.weight": name})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    adapter = tmp_path / "adapter.safetensors"
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 64), np.float32)}, adapter)
    sizes = []

    def recorded(nbytes):
        sizes.append(nbytes)
        return aligned_buffer(nbytes)
    monkeypatch.setattr(headstart, "aligned_buffer", recorded)
    tracemalloc.start()
    try:
        head = headstart.begin(base, [adapter], tmp_path / "out")
        assert head is not None
        for t in head._threads:
            t.join()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for shard, first in zip(head.shards, firsts):  # each hashed its first tensor, and only that
        assert shard.hashed[0].hexdigest() == hashlib.sha256(shard.header + first).hexdigest()
    places = [s.places[f"model.layers.{i}.a_norm.weight"] for i, s in enumerate(head.shards)]
    head.close()
    # a hasher's own buffer per shard would be 12 of SOURCE_CHUNK (~50 MB) in Python's memory
    assert peak < 3 * SOURCE_CHUNK, peak
    # two mapped buffers: the copying thread's and one hashing thread's (no worker: one thread)
    whole_blocks = max((at + n) // ALIGN * ALIGN - -(-at // ALIGN) * ALIGN for at, n in places)
    expected = [3 * ALIGN, 5 * ALIGN] if small_chunks else [whole_blocks, SOURCE_CHUNK + ALIGN]
    assert sorted(sizes) == sorted(expected), sizes


def test_a_head_start_runs_with_a_short_gil_switch_interval(tmp_path, monkeypatch):
    """While a head start runs on a machine with SWITCH_MIN_CORES (the CLI's block, merge included)
    a thread back from a system call gets the GIL within SWITCH_INTERVAL, and the caller's interval
    is back after; with fewer cores, or without a head start, nothing changes."""
    import sys

    from loramerge.engine.pipeline import CPU_SWITCH_INTERVAL
    from loramerge.engine.threads import switch_interval

    base, adapter = base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16")
    before = sys.getswitchinterval()
    assert before > headstart.SWITCH_INTERVAL  # the interpreter's default, 5 ms
    for cores, expected in ((headstart.SWITCH_MIN_CORES, headstart.SWITCH_INTERVAL),
                            (headstart.SWITCH_MIN_CORES - 1, before)):
        monkeypatch.setattr(headstart, "usable_cores", lambda cores=cores: cores)
        with headstart.running(base, [adapter], tmp_path / f"out{cores}") as head:
            assert head is not None
            assert sys.getswitchinterval() == expected
            # the CPU merge's own block inside leaves it no longer than it found it
            with switch_interval(CPU_SWITCH_INTERVAL):
                assert sys.getswitchinterval() == min(expected, CPU_SWITCH_INTERVAL)
            assert sys.getswitchinterval() == expected
        assert sys.getswitchinterval() == before
    # an error in the block (the merge failed) gives the caller's interval back all the same
    monkeypatch.setattr(headstart, "usable_cores", lambda: headstart.SWITCH_MIN_CORES)
    with pytest.raises(KeyboardInterrupt), headstart.running(base, [adapter], tmp_path / "out-err") as head:
        assert head is not None and sys.getswitchinterval() == headstart.SWITCH_INTERVAL
        raise KeyboardInterrupt
    assert sys.getswitchinterval() == before
    monkeypatch.setenv("LORAMERGE_NO_HEAD_START", "1")
    with headstart.running(base, [adapter], tmp_path / "out") as head:
        assert head is None
        assert sys.getswitchinterval() == before


def test_unmerge_takes_a_head_start_too(tmp_path, finished):
    base, adapter = base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16")
    _merge(base, adapter, tmp_path / "merged")
    runner = CliRunner()
    got = runner.invoke(main, ["unmerge", str(tmp_path / "merged"), str(adapter), str(tmp_path / "out"), "--json"])
    ref = runner.invoke(main, ["unmerge", str(tmp_path / "merged"), str(adapter), str(tmp_path / "ref"), "--json"],
                        env={"LORAMERGE_NO_HEAD_START": "1"})
    assert got.exit_code == 0 and ref.exit_code == 0, got.output + ref.output
    assert json.loads(got.stdout)["bytes_early"] == _untouched_interiors(tmp_path / "merged", adapter, tmp_path) > 0
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
    assert _staging_left(tmp_path) == []


def test_hub_ids_in_the_cache_get_a_head_start(hf_cache, tmp_path, finished):
    cache_repo(hf_cache, "acme/llama", tree(base_dir("llama-bf16-sharded")))
    cache_repo(hf_cache, "me/adapter", tree(adapter_dir("llama-bf16")))
    runner = CliRunner()
    got = runner.invoke(main, ["apply", "acme/llama", "me/adapter", str(tmp_path / "out"), "--json"])
    assert got.exit_code == 0, got.output
    snapshot = Path(json.loads(got.stdout)["plan"]["base"])
    expected = _untouched_interiors(snapshot, adapter_dir("llama-bf16"), tmp_path)
    assert json.loads(got.stdout)["bytes_early"] == expected > 0
    _merge(base_dir("llama-bf16-sharded"), adapter_dir("llama-bf16"), tmp_path / "ref")
    shards = sorted(p.name for p in (tmp_path / "ref").glob("*.safetensors"))
    assert shards and all((tmp_path / "out" / n).read_bytes() == (tmp_path / "ref" / n).read_bytes() for n in shards)
    # not in the cache: no head start, and the command's own error
    bad = runner.invoke(main, ["apply", "acme/llama", "me/none", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "not in the Hugging Face cache" in bad.output and _staging_left(tmp_path) == []
