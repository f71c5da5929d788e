"""Hugging Face checkpoint folders: round trips with transformers, sharding, atomic saves, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import hf_twin, random_model, tiny_config
from safetensors.torch import load_file, save_file

import qwenkit
from qwenkit.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError

IDS = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_transformers_checkpoint_loads_in_qwenkit(tmp_path, tied):
    hf = hf_twin(random_model(tiny_config(tie_word_embeddings=tied)))
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = qwenkit.load_model(tmp_path)
    assert (logits(model) - logits(hf)).abs().max() <= 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_qwenkit_checkpoint_loads_in_transformers(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    model = random_model(tiny_config(tie_word_embeddings=tied))
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / INDEX_FILE).exists()
    names = set(json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"])
    assert ("lm_head.weight" in names) == (not tied)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert (logits(model) - logits(hf)).abs().max() <= 1e-4
    again = qwenkit.load_model(tmp_path)
    assert torch.equal(logits(again), logits(model))


def test_single_file_save_and_generation_config(tmp_path):
    model = random_model(tiny_config())
    model.save_pretrained(tmp_path)
    assert (tmp_path / SINGLE_FILE).exists() and not (tmp_path / INDEX_FILE).exists()
    saved = load_file(tmp_path / SINGLE_FILE)
    assert set(saved) == {n for n, _ in model.named_parameters()}
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]
    loaded = qwenkit.load_model(tmp_path)
    assert loaded.generation_config == gen
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left


def test_resave_with_fewer_shards_removes_stale_ones(tmp_path):
    model = random_model(tiny_config())
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [SINGLE_FILE]
    assert not (tmp_path / INDEX_FILE).exists()
    qwenkit.load_model(tmp_path)


def test_dtype_on_load_and_save(tmp_path):
    model = random_model(tiny_config())
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(tmp_path / SINGLE_FILE)["model.norm.weight"].dtype == torch.bfloat16
    assert qwenkit.load_model(tmp_path).dtype == torch.float32  # CPU default: fp32, never fp16
    assert qwenkit.load_model(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    model = random_model(tiny_config())
    model.save_pretrained(tmp_path)
    before = (tmp_path / SINGLE_FILE).read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        random_model(tiny_config(), seed=5).save_pretrained(tmp_path)
    assert (tmp_path / SINGLE_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", SINGLE_FILE]


# ---- bad checkpoints: each error names the file and the tensor ---------------------------------------


@pytest.fixture
def sharded(tmp_path):
    random_model(tiny_config()).save_pretrained(tmp_path, max_shard_size="100KB")
    return tmp_path


def test_missing_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        qwenkit.load_model(sharded)


def test_truncated_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*tensor '.+'.*truncated"):
        qwenkit.load_model(sharded)


def test_corrupt_header(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*corrupt"):
        qwenkit.load_model(sharded)


def _rewrite(folder: Path, edit):
    """Apply `edit` to the tensors of the shard holding model.norm.weight."""
    index = json.loads((folder / INDEX_FILE).read_text())
    shard = folder / index["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return shard


def test_wrong_shape(sharded):
    shard = _rewrite(sharded, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*'model.norm.weight'.*\[65\].*\[64\]"):
        qwenkit.load_model(sharded)


def test_missing_tensor(sharded):
    _rewrite(sharded, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="missing tensors model.norm.weight"):
        qwenkit.load_model(sharded)


def test_unexpected_tensor(sharded):
    shard = _rewrite(sharded, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.ones(2, 2)}))
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*unexpected tensor 'model.layers.7.mlp.up_proj.weight'"):
        qwenkit.load_model(sharded)


def test_no_weights_and_no_folder(tmp_path):
    random_model(tiny_config()).save_pretrained(tmp_path)
    (tmp_path / SINGLE_FILE).rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        qwenkit.load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        qwenkit.load_model(tmp_path / "nope")


def test_hub_id_without_hub_names_the_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local checkpoint folder"):
        qwenkit.load_model("Qwen/Qwen2.5-7B-Instruct")


# ---- memory: the 0.5B preset loads at about the size of its weights -----------------------------------

MEASURE = r"""
import sys, torch, qwenkit.model

def status(field):  # kB figures of this process from /proc; ru_maxrss would include the parent's
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024

torch.ones(1)  # let torch settle its own allocations before the baseline
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
base = status("VmRSS")
model = qwenkit.model.load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
peak, kept = status("VmHWM"), status("VmRSS")
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(weights, peak - base, kept - base)
"""


@pytest.fixture(scope="module")
def half_b_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen05b")
    from qwenkit.cli import main

    assert main(["new", "--preset", "qwen2.5-0.5b", "--out", str(out), "--no-tokenizer"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_loading_05b_peaks_near_weight_size(half_b_checkpoint, dtype):
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(half_b_checkpoint), dtype],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": "."},
    )
    weights, peak, kept = map(int, result.stdout.split())
    print(
        f"0.5B {dtype}: weights {weights / 2**20:.0f} MiB, load peak {peak / 2**20:.0f} MiB, "
        f"ratio {peak / weights:.2f}, kept after the load {kept / weights:.2f}"
    )
    assert weights > 0.9e9
    assert peak <= 1.15 * weights
    # A load must not leave the process holding more than the weights and its fixed costs (under
    # 10 MiB: code pages of torch touched for the first time). The checkpoint is bf16, so the fp32
    # load converts through a buffer: one per tensor once left up to 400 MiB of holes. And the
    # embedding's init on the meta device once kept 73 MiB of imported modules, in either dtype.
    assert kept - weights <= 64 * 2**20
