"""The five applications of the deep-dive, through qwenkit's Python API.

Text generation, question answering, machine translation, sentiment analysis (by label
log-likelihood, not parsed text) and code generation (tested in the sandbox).
Run: python examples/06_applications.py [--model DIR]
"""

import argparse

import qwenkit
from qwenkit.generate import SamplingParams
from qwenkit.hub import resolve_model
from qwenkit.tasks import code, qa, sentiment, translate, write

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="default")
folder = resolve_model(parser.parse_args().model)
model, tok = qwenkit.load_model(folder), qwenkit.load_tokenizer(folder)
params = SamplingParams.from_model(model, max_new_tokens=64, do_sample=False)  # greedy, the checkpoint's other defaults

print("write:    ", write.write(model, tok, ["Once upon a time"], params)[0])
print("qa:       ", qa.answer(model, tok, ["What is the capital of France?"], params)[0].answer)
print("translate:", translate.translate(model, tok, ["The house is wonderful."], "French", params)[0])
result = sentiment.classify(model, tok, ["I love this product!"], ["positive", "negative", "neutral"])[0]
print("sentiment:", result.label, {k: round(v, 3) for k, v in result.probabilities.items()})
solution = code.generate_code(
    model,
    tok,
    "Write a Python function add(a, b) that returns the sum of two numbers.",
    params,
    tests="assert add(2, 3) == 5",
    entry_point="add",
)
print("code:     ", "tests passed" if solution.passed else "tests failed", "\n" + solution.code)
