"""Helpers shared by the tests: tiny configs and the transformers oracle built from the same weights."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from qwenkit.config import PRESETS, QwenConfig
from qwenkit.model import QwenForCausalLM


def tiny_config(**changes) -> QwenConfig:
    """The Qwen2.5 structure at toy size, with a small vocabulary so tests stay fast."""
    return replace(PRESETS["tiny"], **{"vocab_size": 512, **changes})


def random_model(config: QwenConfig, seed: int = 0) -> QwenForCausalLM:
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    model.to_empty(device="cpu").init_weights(seed=seed)
    # Random norm weights and biases too, so that a swapped or skipped one cannot go unnoticed.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_run_files(root: Path, model: QwenForCausalLM, tok, rows) -> Path:
    """A fine-tuning run's inputs in `root`: the model and its tokenizer in root/model, the rows in
    root/train.jsonl."""
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_jsonl(root / "train.jsonl", rows)
    return root


def run_flags(root: Path, method: str) -> list[str]:
    """`qwenkit finetune`'s flags for the run files of `write_run_files` in `root`."""
    return ["--model", str(root / "model"), "--data", str(root / "train.jsonl"), "--method", method]


def hf_config(config: QwenConfig):
    from transformers import AutoConfig

    d = config.to_hf_dict()
    return AutoConfig.for_model(d.pop("model_type"), **d)


def hf_twin(model: QwenForCausalLM):
    """transformers' own model class holding the same weights (shared, not copied)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config(model.config), dtype=model.dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)  # its tables were built on the meta device
    return hf.eval()
