"""Fuzzed readers (issue 14): safetensors headers, shard indexes, adapter configs, kohya and loralib
files, pickled .bin files. Whatever the bytes, a reader returns or raises a LoraMergeError: never
another exception (a traceback for the user), never a hang, never an allocation sized by a lying
header.

The examples run in a child process (test_fuzz_in_a_bounded_child) whose address space is capped
at what it had after its imports plus FUZZ_HEADROOM: anything that sizes an allocation from a
header (a 2^40-element shape, a 2^60-byte header length) fails there with MemoryError instead of
passing quietly on a machine with memory to spare. Each example also has a wall-clock limit
(SIGALRM), so a hang fails fast. Hypothesis runs derandomized: the same examples every run.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import adapter_dir, base_dir

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from loramerge.errors import LoraMergeError  # noqa: E402
from loramerge.plan import build_plan  # noqa: E402
from loramerge.readers.adapters import read_adapter  # noqa: E402
from loramerge.readers.checkpoint import open_checkpoint, read_safetensors_header  # noqa: E402
from loramerge.readers.files import load_adapter_file  # noqa: E402

CHILD = os.environ.get("LORAMERGE_FUZZ_CHILD") == "1"
FUZZ_HEADROOM = 1 << 30   # bytes of address space the readers may use beyond the child's imports
EXAMPLE_SECONDS = 20
EXAMPLES = int(os.environ.get("LORAMERGE_FUZZ_EXAMPLES", "120"))

fuzz = pytest.mark.skipif(not CHILD, reason="runs in test_fuzz_in_a_bounded_child, under a memory limit")
# LORAMERGE_FUZZ_RANDOM=1: fresh examples each run (for hunting locally; CI stays reproducible)
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    derandomize=os.environ.get("LORAMERGE_FUZZ_RANDOM") != "1",
                    suppress_health_check=list(HealthCheck))


def test_fuzz_in_a_bounded_child():
    if CHILD:
        pytest.skip("this is the child")
    env = {**os.environ, "LORAMERGE_FUZZ_CHILD": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


def _cap_address_space():
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + FUZZ_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


if CHILD and sys.platform.startswith("linux"):
    import safetensors.torch  # noqa: F401 - imported before the cap, as the readers use it

    _cap_address_space()


@contextmanager
def bounded():
    """The reader must return or raise LoraMergeError, within EXAMPLE_SECONDS."""
    def hang(signum, frame):
        raise TimeoutError(f"a reader took more than {EXAMPLE_SECONDS} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(EXAMPLE_SECONDS)
    try:
        yield
    except LoraMergeError:
        pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@fuzz
def test_the_cap_is_real():
    """What a lying header would make a reader do, done on purpose: refused in this process."""
    with pytest.raises((MemoryError, RuntimeError)):
        torch.empty(2 * FUZZ_HEADROOM, dtype=torch.uint8).fill_(1)


# -- strategies -------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=12)
jsonish = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                       max_leaves=10)
dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "U64", "X9", ""]) | jsonish
sizes = st.integers(0, 6) | st.sampled_from([2 ** 31, 2 ** 40, 2 ** 62, 2 ** 64 - 1, -1])
entries = st.fixed_dictionaries({"dtype": dtypes, "shape": st.lists(sizes, max_size=4) | jsonish,
                                 "data_offsets": st.lists(sizes, min_size=0, max_size=3) | jsonish}) | jsonish


@st.composite
def safetensors_files(draw) -> bytes:
    header = draw(st.dictionaries(st.text(max_size=10), entries, max_size=5))
    if draw(st.booleans()):
        header["__metadata__"] = draw(jsonish)
    raw = draw(st.sampled_from(["json", "bytes"]))
    body = json.dumps(header).encode() if raw == "json" else draw(st.binary(max_size=200))
    n = draw(st.sampled_from(["true", "lie"]))
    length = len(body) if n == "true" else draw(st.integers(0, 2 ** 64 - 1))
    data = draw(st.binary(max_size=256))
    return struct.pack("<Q", length) + body + data


def consistent_safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


# -- safetensors headers ----------------------------------------------------------------------------

@fuzz
@SETTINGS
@given(blob=safetensors_files(), name=st.sampled_from(["model.safetensors", "adapter_model.safetensors",
                                                          "lora.safetensors"]))
def test_safetensors_headers(blob, name, tmp_path_factory):
    d = tmp_path_factory.mktemp("st")
    p = d / name
    p.write_bytes(blob)
    with bounded():
        refs, _ = read_safetensors_header(p)
        ck = open_checkpoint(p)
        for ref in list(ck.tensors.values())[:4]:
            ck.read(ref)
    with bounded():
        load_adapter_file(p)
    with bounded():
        read_adapter(p)


# -- shard indexes --------------------------------------------------------------------------------

@fuzz
@SETTINGS
@given(index=jsonish | st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.text(max_size=30) | st.sampled_from(["model.embed_tokens.weight", "lm_head.weight"]),
    jsonish | st.sampled_from(["model-00001-of-00004.safetensors", "../model.safetensors", "/etc/passwd",
                               "model-00009-of-00004.safetensors", ""]), max_size=6),
    "metadata": jsonish}), raw=st.booleans(), junk=st.binary(max_size=64))
def test_index_files(index, raw, junk, tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    src = base_dir("llama-bf16-sharded")
    for f in src.glob("model-*.safetensors"):
        os.symlink(f, d / f.name)
    (d / "model.safetensors.index.json").write_bytes(junk if raw else json.dumps(index).encode())
    with bounded():
        ck = open_checkpoint(d)
        assert all(f.parent == d for f in ck.files), "an index may not point outside its directory"


# -- adapter configs ----------------------------------------------------------------------------------

CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "layers_to_transform",
               "layers_pattern", "exclude_modules", "bias", "use_dora", "use_rslora", "fan_in_fan_out",
               "modules_to_save", "peft_type", "init_lora_weights", "lora_bias", "task_type"]
values = jsonish | st.sampled_from([0, -4, 4, 16, 8.0, "all-linear", "q_proj", "(", "[", "*", ".*",
                                    ["q_proj", "v_proj"], {"q_proj": 8}, {"(": 2}, {"q_proj": "x"},
                                    {"q_proj": 0}, "LORA", "LOHA", "IA3", "ADALORA", "pissa", [0, 1], "layers"])


@fuzz
@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), values, min_size=1, max_size=4),
       drop=st.lists(st.sampled_from(CONFIG_KEYS), max_size=2))
def test_adapter_configs(changes, drop, tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    src = adapter_dir("llama-basic")
    os.symlink(src / "adapter_model.safetensors", d / "adapter_model.safetensors")
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(changes)
    for k in drop:
        cfg.pop(k, None)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with bounded():
        adapter = read_adapter(d)
        build_plan(open_checkpoint(base_dir("llama-fp32")), [adapter])


# -- kohya and loralib files ------------------------------------------------------------------------

small_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
tensor_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])


@st.composite
def kohya_files(draw) -> dict[str, torch.Tensor]:
    modules = draw(st.lists(st.sampled_from([
        "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_mid_block_resnets_0_conv1",
        "lora_unet_nonexistent_layer", "lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_unet_",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]), min_size=1, max_size=3))
    out = {}
    for m in modules:
        for part in draw(st.lists(st.sampled_from(["lora_down.weight", "lora_up.weight", "alpha", "hada_w1_a",
                                                   "lora_mid.weight", "dora_scale"]), min_size=1, max_size=4)):
            out[f"{m}.{part}"] = torch.zeros(draw(small_shapes), dtype=draw(tensor_dtypes))
    return out


@st.composite
def loralib_files(draw):
    modules = draw(st.lists(st.sampled_from(["model.layers.0.self_attn.q_proj", "model.embed_tokens", "x",
                                             "transformer.h.0.attn.c_attn"]), min_size=1, max_size=3))
    out = {}
    for m in modules:
        for part in draw(st.lists(st.sampled_from(["lora_A", "lora_B"]), min_size=1, max_size=2, unique=True)):
            out[f"{m}.{part}"] = torch.zeros(draw(small_shapes), dtype=draw(tensor_dtypes))
    if draw(st.booleans()):  # a pickle is not bound to flat dicts of tensors
        return draw(st.sampled_from([{"state_dict": out}, [out], {"a": 1}, {"x.lora_A": "text"},
                                     {"x.lora_A": [torch.zeros(2)]}, out]))
    return out


@fuzz
@SETTINGS
@given(tensors=kohya_files(), as_pt=st.booleans())
def test_kohya_files(tensors, as_pt, tmp_path_factory):
    d = tmp_path_factory.mktemp("kohya")
    p = d / ("lora.pt" if as_pt else "lora.safetensors")
    if as_pt:
        torch.save(tensors, p)
    else:
        p.write_bytes(consistent_safetensors(tensors))
    with bounded():
        adapter = read_adapter(p)
        build_plan(open_checkpoint(base_dir("sd-unet")), [adapter])


@fuzz
@SETTINGS
@given(obj=loralib_files(), alpha=st.sampled_from([None, 8.0, 0.0, -1.0, float("nan")]),
       fifo=st.sampled_from([None, True, False]),
       enable=st.sampled_from([None, (True,), (True, False, True), ()]))
def test_loralib_files(obj, alpha, fifo, enable, tmp_path_factory):
    d = tmp_path_factory.mktemp("loralib")
    p = d / "lora.pt"
    torch.save(obj, p)
    with bounded():
        adapter = read_adapter(p, lora_alpha=alpha, fan_in_fan_out=fifo, enable_lora=enable)
        build_plan(open_checkpoint(base_dir("loralib")), [adapter])


# -- pickled .bin files -------------------------------------------------------------------------------

@fuzz
@SETTINGS
@given(flips=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.none() | st.integers(0, 10 ** 6))
def test_bin_files(flips, cut, tmp_path_factory):
    """A valid torch.save zip with bytes changed (zip headers, pickle opcodes, storage sizes)."""
    d = tmp_path_factory.mktemp("bin")
    good = d / "good.bin"
    torch.save({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.zeros(3)}, good)
    raw = bytearray(good.read_bytes())
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    p = d / "pytorch_model.bin"
    p.write_bytes(bytes(raw))
    with bounded():
        ck = open_checkpoint(p)
        for ref in ck.tensors.values():
            ck.read(ref)
