"""qwenkit on real quantized weights against llama.cpp (issue 14's "Real weights"), slow tests.

The files: SmolLM2-135M-Instruct (qwenkit's default model) converted by llama.cpp's own
convert_hf_to_gguf.py to F32 and quantized by llama-quantize to Q8_0 and Q4_K_M, made by
benchmarks/quant_files.py as bench_quant.py makes them (about 30 s on 2 cores, in the session's
temporary cache). llama.cpp's tools come from test_gguf_export's `llama_cpp` fixture (built by
benchmarks/build_llama_cpp.sh if missing). F32 is the sanity row: there llama.cpp multiplies in
fp32 as qwenkit does, so the two agree to rounding.

1. Greedy tokens, for the demo's five prompts (qwenkit/cli/demo.py) rendered by qwenkit's chat
   template: llama-tokenize reads the rendered text as qwenkit's ids, llama-simple continues it
   greedily, and qwenkit's decoder walks llama.cpp's continuation token by token. At every step
   llama.cpp's token must be qwenkit's greedy one, or (quantized files only) a near-tie within
   TIE logits of it. On F32 the tokens must be equal, and are.
2. Perplexity on a fixed public-domain text (fixtures/public_domain_prose.txt), by exactly
   llama-perplexity's method (tools/perplexity/perplexity.cpp: one tokenization of the whole
   file, chunks of n_ctx, BOS on each chunk's first token where the vocabulary adds one, the
   second half of each chunk scored), within PPL_TOLERANCE of llama-perplexity's final estimate.

Why quantized files get a near-tie tolerance: llama.cpp quantizes the activations to 8 bits
(Q8_0 blocks of 32, Q8_K blocks of 256 for the K-quants) before every product with quantized
weights, and SmolLM2's outlier activations make that rounding noisy; qwenkit's kernels round
differently. llama.cpp disagrees with itself by as much: on this text, its own argmax on Q4_K_M
differs between flash attention on and off at 81 of 945 positions, at margins up to 1.76 logits
(Q8_0: 39 positions, up to 0.71), and its perplexity moves by 0.9% (Q8_0: 0.55%).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
from pathlib import Path

import gguf
import pytest
import test_gguf_export
import torch

import qwenkit
from qwenkit.cache import KVCache
from qwenkit.cli.demo import LABELS
from qwenkit.generate import SamplingParams, generate, prefill
from qwenkit.qwen_vocab import bytes_to_unicode
from qwenkit.tasks import code, qa, sentiment, translate, write
from qwenkit.text import encode_prompt

pytestmark = pytest.mark.slow

llama_cpp = test_gguf_export.llama_cpp  # the fixture: llama.cpp's tools, built if missing
TYPES = ("F32", "Q8_0", "Q4_K_M")
NEW_TOKENS = 32
# How many logits below qwenkit's greedy token llama.cpp's may be: none on F32; on the quantized
# files 0.5, under llama.cpp's own flips (0.71, 1.76) and twice the largest seen (0.23, Q8_0 "code").
TIE = {"F32": 0.0, "Q8_0": 0.5, "Q4_K_M": 0.5}
# Relative, of llama-perplexity's estimate. The issue asks 0.5%; Q4_K_M gets 1%: on these 945
# scored tokens llama.cpp's own estimate moves by 0.9% between its settings (flash attention on
# and off, repacked or not), so 0.5% there is under the noise of the reference itself. qwenkit's
# moves as much with the order of its fp32 sums alone, through the int8 rounding of the next
# product's input (Q4_K_M -0.52%, -0.93% and +0.08% under three orders of the same sums; Q8_0
# -0.13% and +0.63%). A longer text would tighten both, at minutes per file.
PPL_TOLERANCE = {"F32": 0.0005, "Q8_0": 0.005, "Q4_K_M": 0.01}
N_CTX = 128
TEXT = Path(__file__).parent / "fixtures" / "public_domain_prose.txt"
# The demo's prompts, as its five applications send them (qwenkit/cli/demo.py `applications`).
PROMPTS = {
    "translate": translate.build_messages("The house is wonderful.", "French", "English"),
    "qa": qa.build_messages("What is the capital of France?"),
    "sentiment": sentiment.build_messages("I love this product!", LABELS),
    "code": [
        {"role": "system", "content": code.system_prompt("python")},
        {"role": "user", "content": "Write a Python function that adds two numbers."},
    ],
    "write": write.build_messages("Once upon a time"),
}
# The end-of-generation tokens llama.cpp adds by name (src/llama-vocab.cpp), those SmolLM2 has.
EOG_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>")


def _quant_files():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quant_files.py"
    spec = importlib.util.spec_from_file_location("quant_files", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2(llama_cpp):
    """type -> (path, model, tokenizer): llama.cpp's SmolLM2 files, made once, loaded once by qwenkit."""
    for tool in ("llama-quantize", "llama-perplexity"):
        assert (llama_cpp / "bin" / tool).exists(), f"{tool} missing from {llama_cpp}: rebuild it"
    quant_files, loaded = _quant_files(), {}

    def get(type_: str):
        if type_ not in loaded:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("QWENKIT_LLAMA_CPP", str(llama_cpp))  # the tests' cache is a temporary one
                path = quant_files.ensure_gguf("smollm2", type_)
            loaded[type_] = path, qwenkit.load_model(path), qwenkit.load_tokenizer(path)
        return loaded[type_]

    return get


def run(tool: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(tool), *args], capture_output=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{tool.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def llama_tokenize(llama_cpp: Path, path: Path, text: str, tmp_path: Path, *flags: str) -> list[int]:
    file = tmp_path / "tokenize.txt"
    file.write_bytes(text.encode())  # llama-tokenize reads a file verbatim
    args = ["-m", str(path), "-f", str(file), "--ids", "--log-disable", *flags]
    return json.loads(run(llama_cpp / "bin" / "llama-tokenize", *args, text=True).stdout.strip().splitlines()[-1])


def token_bytes(tok) -> dict[int, bytes]:
    """Each token's bytes, as llama.cpp prints it (byte-level BPE; special tokens as their text)."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return {
        i: b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in t) for t, i in tok.get_vocab().items()
    }


@torch.inference_mode()
def walk(model, prompt: list[int], text: bytes, pieces: dict[int, bytes], eog: set[int]) -> list[tuple[int, float]]:
    """llama.cpp's continuation `text` as qwenkit's decoder sees it: (token, margin) per step, the
    margin being how far (logits) the token is below qwenkit's greedy choice there (0: it is that
    choice). Each step's token is the one whose bytes continue the text that qwenkit rates highest,
    so a text qwenkit would write itself walks with margins 0. A text shorter than NEW_TOKENS
    ended on an end-of-generation token, which is the last step."""
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in pieces.items():
        by_bytes.setdefault(b, []).append(i)
    longest = max(map(len, by_bytes))
    cache = KVCache(model.config, 1, len(prompt) + NEW_TOKENS, dtype=model.dtype)
    logits = prefill(model, torch.tensor([prompt]), None, cache)[0].float()  # (vocab,)
    decode, steps, rest = model.decoder(cache), [], text
    while len(steps) < NEW_TOKENS:
        choices = eog if not rest else [i for n in range(1, longest + 1) for i in by_bytes.get(rest[:n], ())]
        assert choices, f"no token continues llama.cpp's text at {rest[:40]!r}"
        token = max(choices, key=lambda i: float(logits[i]))
        steps.append((token, float(logits.max() - logits[token])))
        if not rest:
            break
        rest = rest[len(pieces[token]) :]
        logits = decode(torch.tensor([token]))[0].float()
    assert not rest, f"llama.cpp's text runs past {NEW_TOKENS} tokens: {rest!r}"
    return steps


@pytest.mark.parametrize("type_", TYPES)
def test_greedy_tokens_are_llama_cpps(llama_cpp, smollm2, type_, tmp_path):
    path, model, tok = smollm2(type_)
    pieces = token_bytes(tok)
    eog = {i for name in EOG_NAMES if (i := tok.get_vocab().get(name)) is not None} | {tok.eos_token_id}
    params = SamplingParams(max_new_tokens=NEW_TOKENS, eos_token_id=tuple(sorted(eog)))
    assert not params.do_sample
    report, bad = [], []
    for name, messages in PROMPTS.items():
        ids = encode_prompt(tok, messages)
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert llama_tokenize(llama_cpp, path, text, tmp_path) == ids, name  # llama-simple's prompt ids
        out = run(llama_cpp / "bin" / "llama-simple", "-m", str(path), "-n", str(NEW_TOKENS), text).stdout
        assert out.startswith(text.encode()) and out.endswith(b"\n"), out[:200]
        theirs = walk(model, ids, out[len(text.encode()) : -1], pieces, eog)
        ours = [int(t) for t in generate(model, torch.tensor([ids]), None, params)]
        tokens = [t for t, _ in theirs]
        ties = [(k, round(m, 3)) for k, (_, m) in enumerate(theirs) if m > 0]
        same = next((k for k, (a, b) in enumerate(zip(ours, tokens)) if a != b), min(len(ours), len(tokens)))
        report.append(
            f"{type_} {name}: {same}/{len(tokens)} tokens equal; llama.cpp's near-ties (step, margin): {ties}"
        )
        # qwenkit's greedy tokens are llama.cpp's up to llama.cpp's first token that is not
        # qwenkit's choice (all of them where there is none), and that token and every later one
        # is at most TIE logits below qwenkit's choice, given llama.cpp's text so far.
        first = ties[0][0] if ties else len(tokens)
        equal = ours[:first] == tokens[:first] and (ties or ours == tokens)
        if not equal or any(m > TIE[type_] for _, m in ties):
            bad.append(f"{report[-1]}\n  qwenkit: {tok.decode(ours)!r}\n  llama.cpp: {tok.decode(tokens)!r}")
    print("\n" + "\n".join(report))
    assert not bad, "\n".join(bad)


def llama_perplexity(llama_cpp: Path, path: Path) -> float:
    args = ["-m", str(path), "-f", str(TEXT), "-c", str(N_CTX), "-t", "2"]
    proc = run(llama_cpp / "bin" / "llama-perplexity", *args, text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    assert found, (proc.stdout + proc.stderr)[-2000:]
    return float(found.group(1))


@torch.inference_mode()
def perplexity(model, tokens: list[int], bos: int | None) -> float:
    """perplexity.cpp's `perplexity` (no stride): chunks of N_CTX tokens of the whole text, each
    chunk's first token replaced by BOS where the vocabulary adds one, and the second half of
    each chunk scored: the logits at positions N_CTX/2 .. N_CTX-2 predict the tokens after them."""
    n_chunk, first = len(tokens) // N_CTX, N_CTX // 2
    assert n_chunk >= 2, f"the text has {len(tokens)} tokens, llama-perplexity needs {2 * N_CTX}"
    x = torch.tensor(tokens[: n_chunk * N_CTX]).view(n_chunk, N_CTX)  # (chunks, N_CTX)
    if bos is not None:
        x[:, 0] = bos
    nll = []
    for rows in x.split(4):
        logits = model(rows).logits[:, first:-1].float()  # (4, N_CTX/2 - 1, vocab)
        logp = torch.log_softmax(logits.double(), dim=-1)
        nll.append(-logp.gather(-1, rows[:, first + 1 :, None]).squeeze(-1))
    return math.exp(torch.cat(nll).mean().item())


@pytest.mark.parametrize("type_", TYPES)
def test_perplexity_is_llama_cpps(llama_cpp, smollm2, type_, tmp_path):
    path, model, tok = smollm2(type_)
    # llama-perplexity's -f drops one trailing newline and processes escapes (the text has none),
    # then tokenizes with the vocabulary's BOS and without parsing special tokens.
    text = TEXT.read_text(encoding="utf-8").removesuffix("\n")
    assert "\\" not in text and not any(s in text for s in tok.all_special_tokens)
    add_bos = gguf.GGUFReader(path).fields["tokenizer.ggml.add_bos_token"].contents()
    tokens = ([tok.bos_token_id] if add_bos else []) + tok.encode(text)
    assert llama_tokenize(llama_cpp, path, text, tmp_path, "--no-parse-special") == tokens
    theirs = llama_perplexity(llama_cpp, path)
    ours = perplexity(model, tokens, tok.bos_token_id if add_bos else None)
    print(f"\n{type_}: perplexity qwenkit {ours:.4f}, llama.cpp {theirs:.4f} ({ours / theirs - 1:+.3%})")
    assert abs(ours / theirs - 1) <= PPL_TOLERANCE[type_], (type_, ours, theirs)
