"""Inference: the chat template, greedy generation, and streaming text as it is generated.

Run: python examples/05_inference.py [--model DIR]
"""

import argparse

import qwenkit
from qwenkit.generate import SamplingParams
from qwenkit.hub import resolve_model
from qwenkit.text import encode_prompt, stream_text

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="default")
folder = resolve_model(parser.parse_args().model)
model, tok = qwenkit.load_model(folder), qwenkit.load_tokenizer(folder)

messages = [{"role": "user", "content": "What is the capital of France?"}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
out = model.generate(ids, max_new_tokens=30, do_sample=False)  # stops at the model's eos ids
print("answer:", tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

params = SamplingParams.from_model(model, max_new_tokens=40, do_sample=True, temperature=0.7, seed=0)
print("streamed: ", end="")
for delta in stream_text(model, tok, encode_prompt(tok, "Write one sentence about the sea."), params):
    print(delta, end="", flush=True)
print()
