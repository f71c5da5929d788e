"""Encoding throughput: qwenkit's built-in Qwen2.5 tokenizer against transformers' fast tokenizer
(AutoTokenizer on the files qwenkit saves) and tiktoken (the same ranks), on one corpus, in one run.

    python benchmarks/bench_tokenizer.py [--mb 4] [--repeats 3]

The corpus mixes English prose, Python source, Chinese and emoji, in documents of 0.5 to 4 KB,
already NFC (tiktoken does not normalize; this keeps the three outputs identical, which is checked
before timing). Batch rows use each library's batch call (all cores); "one by one" calls `encode`
per document. The best of `--repeats` runs is reported.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import random
import tempfile
import textwrap
import time
import unicodedata

import tiktoken
from transformers import AutoTokenizer

from qwenkit import load_tokenizer
from qwenkit.qwen_vocab import QWEN2_PATTERN, SPECIAL_TOKENS, _qwen_tiktoken_path, _read_ranks

CHINESE = (
    "自然语言处理是人工智能的一个重要方向。今天天气很好，我们去北京大学参观了图书馆。通义千问是阿里云开发的大语言模型。"
)
EMOJI = "😀👍🏽🎉🚀👨‍👩‍👧‍👦🇫🇷✨"


def corpus(megabytes: float, seed: int = 0) -> list[str]:
    """Documents of mixed text, about `megabytes` of UTF-8 in all."""
    rng = random.Random(seed)
    modules = (argparse, inspect, json.decoder, random, textwrap, tempfile)
    code = "\n".join(inspect.getsource(m) for m in modules)
    prose = " ".join(
        inspect.getdoc(obj) or "" for m in modules for _, obj in inspect.getmembers(m) if callable(obj)
    ).replace("\n", " ")

    def piece(source: str, n: int) -> str:
        i = rng.randrange(max(1, len(source) - n))
        return source[i : i + n]

    def chinese(n: int) -> str:
        return "".join(rng.choice(CHINESE) for _ in range(n // 3))

    kinds = [
        lambda n: piece(prose, n),
        lambda n: piece(code, n),
        chinese,
        lambda n: piece(prose, n // 2) + chinese(n // 2) + rng.choice(EMOJI) + "\n<|im_end|>\n",
    ]
    docs, size = [], 0
    while size < megabytes * 1e6:
        doc = unicodedata.normalize("NFC", rng.choice(kinds)(rng.randint(500, 4000)))
        docs.append(doc)
        size += len(doc.encode("utf-8"))
    return docs


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=4.0, help="corpus size in megabytes of UTF-8")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    args = parser.parse_args()

    docs = corpus(args.mb)
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    tok = load_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        tok.save_pretrained(folder)
        hf = AutoTokenizer.from_pretrained(folder)
    ranks = _read_ranks(_qwen_tiktoken_path())
    enc = tiktoken.Encoding(
        "qwen2.5",
        pat_str=QWEN2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)},
    )
    threads = os.cpu_count() or 1

    runs = {
        ("qwenkit", "batch"): lambda: tok(docs)["input_ids"],
        ("transformers fast", "batch"): lambda: hf(docs, add_special_tokens=False)["input_ids"],
        ("tiktoken", "batch"): lambda: enc.encode_batch(docs, allowed_special="all", num_threads=threads),
        ("qwenkit", "one by one"): lambda: [tok.encode(d) for d in docs],
        ("transformers fast", "one by one"): lambda: [hf.encode(d, add_special_tokens=False) for d in docs],
        ("tiktoken", "one by one"): lambda: [enc.encode(d, allowed_special="all") for d in docs],
    }
    reference = runs[("qwenkit", "batch")]()
    for key, run in runs.items():
        if run() != reference:
            raise SystemExit(f"{key} disagrees with qwenkit on the corpus")
    n_tokens = sum(map(len, reference))

    print(f"corpus: {len(docs)} documents, {megabytes:.2f} MB, {n_tokens} tokens")
    print(f"machine: {platform.processor() or platform.machine()}, {threads} CPU cores; best of {args.repeats}\n")
    print("| tokenizer | mode | MB/s | tokens/s | speed relative to qwenkit |")
    print("| --- | --- | ---: | ---: | ---: |")
    seconds = {key: best_time(run, args.repeats) for key, run in runs.items()}
    for (name, mode), t in seconds.items():
        ratio = seconds[("qwenkit", mode)] / t
        print(f"| {name} | {mode} | {megabytes / t:.2f} | {n_tokens / t:,.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
