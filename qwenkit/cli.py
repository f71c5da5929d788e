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
from typing import Literal

COMMANDS: dict[str, typing.Callable] = {}


def command(fn):
    COMMANDS[fn.__name__.rstrip("_").replace("_", "-")] = fn
    return fn


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


@command
def new(*, out: str, preset: str = "qwen2.5-0.5b", layers: int | None = None, vocab_size: int | None = None,
        seed: int = 0, dtype: Literal["float32", "bfloat16"] = "bfloat16", tokenizer: bool = True) -> None:
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
    print(f"wrote {preset} ({model.num_parameters() / 1e6:.1f}M parameters, {config.num_hidden_layers} layers) "
          f"to {out}")


@command
def generate(*, model: str, prompt: str, max_new_tokens: int = 64, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
             chat: bool = True, dtype: Literal["float32", "bfloat16"] = "float32") -> None:
    """Generate a completion for one prompt and print it.

    Sampling defaults come from the checkpoint's generation_config.json; temperature 0 is greedy.

    Args:
        model: a checkpoint folder.
        prompt: the text to complete (or the user message, with --chat).
        max_new_tokens: the most tokens to generate.
        temperature: sampling temperature; 0 means greedy.
        top_p: nucleus sampling mass.
        top_k: sample among the k most likely tokens.
        seed: random seed, to reproduce a sampled run.
        chat: wrap the prompt in the chat template (--no-chat: plain text).
        dtype: the weights' dtype in memory (float16 is not offered: it overflows on Qwen2.5).
    """
    from qwenkit.checkpoint import load_model
    from qwenkit.tokenizer import load_tokenizer

    m = load_model(model, dtype=_dtype(dtype))
    tok = load_tokenizer(model)
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt")
    else:
        ids = tok.encode(prompt, return_tensors="pt")
    out = m.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                     seed=seed, do_sample=None if temperature is None else temperature > 0)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


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
    """argparse keywords for one parameter: its type (Optional unwrapped), Literal choices, help."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = args[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) else annotation
    options: dict = {"help": text}
    if typing.get_origin(kind) is Literal:
        options["choices"] = typing.get_args(kind)
        kind = type(options["choices"][0])
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    else:
        options["type"] = kind
    if default not in (None, inspect.Parameter.empty) and "default" not in text:
        options["help"] = f"{text} (default: {default})"
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenkit", description="A toolkit for Qwen2.5: run, fine-tune, "
                                     "evaluate and serve the model. `qwenkit COMMAND --help` explains each command.")
    parser.add_argument("--version", action="version", version=f"qwenkit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, fn in COMMANDS.items():
        doc = inspect.getdoc(fn) or ""
        summary = doc.split("\n\n")[0]
        description = doc.split("Args:")[0].strip()
        p = sub.add_parser(name, help=summary, description=description)
        helps = _arg_help(doc)
        hints = typing.get_type_hints(fn)
        for param in inspect.signature(fn).parameters.values():
            options = _flag_options(hints[param.name], param.default, helps.get(param.name, ""))
            if param.default is inspect.Parameter.empty and param.kind is param.POSITIONAL_OR_KEYWORD:
                p.add_argument(param.name, **options)
            elif param.default is inspect.Parameter.empty:
                p.add_argument("--" + param.name.replace("_", "-"), required=True, **options)
            else:
                p.add_argument("--" + param.name.replace("_", "-"), default=param.default, **options)
    return parser


def _version() -> str:
    from qwenkit import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    name = args.pop("command")
    if name is None:
        parser.print_help()
        return 2
    from qwenkit.checkpoint import CheckpointError
    from qwenkit.config import ConfigError

    try:
        COMMANDS[name](**args)
    except (UserError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"qwenkit {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
