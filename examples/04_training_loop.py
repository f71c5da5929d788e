"""A training loop in plain PyTorch: the loss on assistant tokens only, AdamW, a few steps.

`qwenkit finetune` is the full tool (LoRA, schedules, evaluation, checkpoints, FSDP); this is the
core it runs. Run: python examples/04_training_loop.py [--model DIR] [--steps N]
"""

import argparse

import torch

import qwenkit
from qwenkit.hub import resolve_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="default")
parser.add_argument("--steps", type=int, default=8)
args = parser.parse_args()
folder = resolve_model(args.model)
model, tok = qwenkit.load_model(folder), qwenkit.load_tokenizer(folder)

conversation = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
ids, mask = tok.encode_chat(conversation)  # the mask is 1 on the answer and its closing <|im_end|>
input_ids = torch.tensor([ids])
labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])  # learn the answer only

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
model.train()
for step in range(args.steps):
    loss = model(input_ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    print(f"step {step + 1}: loss {loss.item():.4f}")
