"""Model initialization: load a checkpoint, or build Qwen2.5's architecture from a preset.

The deep-dive calls Qwen2.5 an encoder-decoder with sinusoidal positions and ReLU; it is a
decoder-only transformer with rotary positions (theta 1e6), grouped-query attention with q/k/v
bias, RMSNorm and a SwiGLU MLP. Run: python examples/01_model_init.py [--model DIR]
"""

import argparse
from dataclasses import replace

import torch

import qwenkit
from qwenkit.hub import resolve_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="default", help="a checkpoint folder (default: the 135M stand-in)")
folder = resolve_model(parser.parse_args().model)

model = qwenkit.load_model(folder, dtype=torch.float32)
tok = qwenkit.load_tokenizer(folder)
c = model.config
print(
    f"loaded {folder.name}: {model.num_parameters() / 1e6:.0f}M parameters, {c.num_hidden_layers} layers, "
    f"{c.num_attention_heads} query / {c.num_key_value_heads} key-value heads, vocabulary {len(tok)}"
)

# Qwen2.5-7B-Instruct's architecture, built on the meta device: shapes without memory.
with torch.device("meta"):
    big = qwenkit.QwenForCausalLM(qwenkit.PRESETS["qwen2.5-7b"])
print(f"Qwen2.5-7B: {big.num_parameters() / 1e9:.2f}B parameters; each of its {len(big.model.layers)} layers:")
for name, p in big.model.layers[0].named_parameters():
    print(f"  {name:32s} {tuple(p.shape)}")

# A small random model with the 0.5B layer shapes, initialized for training from scratch.
with torch.device("meta"):
    small = qwenkit.QwenForCausalLM(replace(qwenkit.PRESETS["qwen2.5-0.5b"], num_hidden_layers=2))
small.to_empty(device="cpu").init_weights(seed=0)
print(f"random 2-layer Qwen2.5-0.5B-shaped model: {small.num_parameters() / 1e6:.0f}M parameters")
