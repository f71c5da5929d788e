"""Forward pass: tokens in, next-token logits out.

Run: python examples/02_forward_pass.py [--model DIR]
"""

import argparse

import torch

import qwenkit
from qwenkit.hub import resolve_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="default")
folder = resolve_model(parser.parse_args().model)
model, tok = qwenkit.load_model(folder), qwenkit.load_tokenizer(folder)

ids = tok.encode("Translate English to French: The house is wonderful.", return_tensors="pt")  # (1, T)
with torch.no_grad():
    out = model(ids)
print(f"input ids {tuple(ids.shape)} -> logits {tuple(out.logits.shape)}")  # (1, T, vocab)
probs = out.logits[0, -1].softmax(-1)
top = probs.topk(5)
print("most likely next tokens:", [(tok.decode([int(i)]), round(float(p), 3)) for p, i in zip(top.values, top.indices)])
