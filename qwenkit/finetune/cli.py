"""`qwenkit finetune CONFIG.yaml [key=value ...] [--key value ...]`: run a fine-tuning recipe.

Every recipe key is also a flag (`--max-steps 100` is `max_steps=100`). key=value pairs override
the YAML file, and flags override both. `python -m qwenkit.finetune.cli` is the same command,
which is what torchrun launches: `torchrun --nproc_per_node 8 -m qwenkit.finetune.cli CONFIG.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any

import yaml

from qwenkit.errors import QwenkitError
from qwenkit.finetune.config import (
    TYPES,
    FinetuneConfig,
    RecipeError,
    check_keys,
    key_help,
    load_config,
    to_dict,
)
from qwenkit.finetune.trainer import finetune

EXAMPLES = """\
examples:
  qwenkit finetune configs/qwen2.5-7b-instruct-lora.yaml data=my_chats.jsonl output=runs/my-lora
  qwenkit finetune --model ckpt/ --data train.jsonl --method lora --output runs/lora --max-steps 200 --lr 2e-4
  torchrun --nproc_per_node 8 -m qwenkit.finetune.cli configs/qwen2.5-7b-instruct-full-fsdp.yaml
"""


def _is_textual(key: str) -> bool:
    """Keys whose value is a plain string: YAML must not turn `no` or `1.5` into a bool or a number."""
    kind = TYPES[key]
    if kind is str or typing.get_origin(kind) is typing.Literal:
        return True
    options = [a for a in typing.get_args(kind) if a is not type(None)]
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and options == [str]  # str | None


def _parse_value(key: str, text: str) -> Any:
    if _is_textual(key):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenkit finetune",
        description="Fine-tune a Qwen2.5 checkpoint: full, LoRA or frozen layers, with gradual unfreezing and "
        "layer-wise lr decay. Settings come from a YAML recipe; key=value pairs override it, and "
        "--key flags override both. Outputs: the adapter (PEFT format) or an HF checkpoint, metrics.jsonl, "
        "loss.png, resumable checkpoints.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "items", nargs="*", metavar="CONFIG.yaml | key=value", help="a recipe file, then key=value overrides"
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved recipe, then exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still print)")
    keys = parser.add_argument_group("recipe keys (each also settable as key=value or in the YAML)")
    for name, doc, default in key_help():
        flag = "--" + name.replace("_", "-")
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text = f"{doc} (default: {shown})"
        if TYPES[name] is bool:
            keys.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
        else:
            choices = typing.get_args(TYPES[name]) if typing.get_origin(TYPES[name]) is typing.Literal else None
            metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
            keys.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=metavar, help=text)
    return parser


def config_from_args(argv: list[str]) -> tuple[FinetuneConfig, argparse.Namespace]:
    """The recipe that a command line asks for (YAML, then key=value items, then flags)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    path, overrides = None, {}
    for item in args.items:
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            check_keys([key])
            overrides[key] = _parse_value(key, value)
        elif path is None:
            path = item
        else:
            raise RecipeError(f"{item!r}: one recipe file only ({path!r} was given first); overrides are key=value")
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in vars(args):
            value = getattr(args, f.name)
            overrides[f.name] = value if isinstance(value, bool) else _parse_value(f.name, value)
    return load_config(path, overrides), args


def main(argv: list[str] | None = None) -> int:
    """Run `qwenkit finetune` with these arguments; 0 on success, 2 on a user error (one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg, args = config_from_args(argv)
        if args.dry_run:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        finetune(cfg, progress=not args.no_progress)
    except (QwenkitError, FileNotFoundError) as e:
        print(f"qwenkit finetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
