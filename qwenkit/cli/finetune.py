"""`qwenkit finetune CONFIG.yaml [key=value ...] [--key value ...]`: run a fine-tuning recipe.

Every recipe key is also a flag, made from FinetuneConfig's fields by qwenkit.cli.signature, and a
flag's value is read as the same `key=value` would be (`--max-steps 100` is `max_steps=100`), so
both give the recipe's errors. key=value items override the YAML file, and flags override both.
torchrun launches the same command: `torchrun --nproc_per_node 8 -m qwenkit finetune CONFIG.yaml`.

The recipe, the trainer and torch are imported when the command runs, not for `qwenkit --help`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from qwenkit.cli.signature import add_params, dataclass_params
from qwenkit.errors import RecipeError

if TYPE_CHECKING:
    from qwenkit.finetune.config import FinetuneConfig

EXAMPLES = """\
examples:
  qwenkit finetune configs/qwen2.5-7b-instruct-lora.yaml data=my_chats.jsonl output=runs/my-lora
  qwenkit finetune --model ckpt/ --data train.jsonl --method lora --output runs/lora --max-steps 200 --lr 2e-4
  torchrun --nproc_per_node 8 -m qwenkit finetune configs/qwen2.5-7b-instruct-full-fsdp.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of `qwenkit finetune`: a recipe file and key=value items, the command's own two
    switches, and one flag per recipe key."""
    from qwenkit.finetune.config import FinetuneConfig  # imports torch, which `qwenkit --help` does not need

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
    add_params(keys, dataclass_params(FinetuneConfig), suppress_defaults=True, as_text=True)
    return parser


def config_from_args(argv: list[str]) -> tuple[FinetuneConfig, argparse.Namespace]:
    """The recipe that a command line asks for (the YAML file, then key=value items, then flags), and
    the parsed arguments, which hold --dry-run and --no-progress."""
    from qwenkit.finetune.config import KEYS, check_keys, load_config, parse_value

    args = build_parser().parse_args(argv)
    path, overrides = None, {}
    for item in args.items:
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            check_keys([key])
            overrides[key] = parse_value(key, value)
        elif path is None:
            path = item
        else:
            raise RecipeError(f"{item!r}: one recipe file only ({path!r} was given first); overrides are key=value")
    for key in KEYS:  # the flags given; a switch is already a bool, any other value is text
        if key in vars(args):
            value = getattr(args, key)
            overrides[key] = value if isinstance(value, bool) else parse_value(key, value)
    return load_config(path, overrides), args


def finetune(argv: list[str]) -> int:
    """Fine-tune a model: full, LoRA or freezing; gradual unfreezing and layer-wise learning rates;
    evaluation with early stopping; checkpoints and exact resume; FSDP under torchrun.

    `qwenkit finetune CONFIG.yaml [key=value ...]` or the same keys as flags (`qwenkit finetune
    --model DIR --data FILE --method lora --output DIR`); `qwenkit finetune --help` lists every key.
    """
    import yaml

    from qwenkit.finetune.config import to_dict
    from qwenkit.finetune.trainer import finetune as train

    cfg, args = config_from_args(argv)
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    train(cfg, progress=not args.no_progress)
    return 0
