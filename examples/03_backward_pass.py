"""Backward pass: the language-modelling loss and its gradients.

Labels are the input ids; the model shifts them so that position t predicts token t+1, and
ignores positions labelled -100. Run: python examples/03_backward_pass.py [--model DIR]
"""

import argparse

import qwenkit
from qwenkit.hub import resolve_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="default")
folder = resolve_model(parser.parse_args().model)
model, tok = qwenkit.load_model(folder), qwenkit.load_tokenizer(folder)
model.train()

ids = tok.encode("The capital of France is Paris.", return_tensors="pt")
out = model(ids, labels=ids)
out.loss.backward()
print(f"loss {out.loss.item():.3f} (perplexity {out.loss.exp().item():.1f})")
for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
    grad = model.get_parameter(name).grad
    print(f"grad norm of {name}: {grad.norm().item():.4f}")
