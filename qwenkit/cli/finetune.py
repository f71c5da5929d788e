"""`qwenkit finetune`: a fine-tuning recipe from a YAML file, `key=value` items and `--key` flags.

Its flags are the recipe's keys, built by qwenkit.finetune.cli, which is also the module torchrun
launches (`torchrun --nproc_per_node 8 -m qwenkit.finetune.cli CONFIG.yaml`). The recipe, the
trainer and torch are imported when the command runs, not for `qwenkit --help`.
"""

from __future__ import annotations


def finetune(argv: list[str]) -> int:
    """Fine-tune a model: full, LoRA or freezing; gradual unfreezing and layer-wise learning rates;
    evaluation with early stopping; checkpoints and exact resume; FSDP under torchrun.

    `qwenkit finetune CONFIG.yaml [key=value ...]` or the same keys as flags (`qwenkit finetune
    --model DIR --data FILE --method lora --output DIR`); `qwenkit finetune --help` lists every key.
    """
    import yaml

    from qwenkit.finetune import cli, config, trainer

    cfg, args = cli.config_from_args(argv)
    if args.dry_run:
        print(yaml.safe_dump(config.to_dict(cfg), sort_keys=False), end="")
        return 0
    trainer.finetune(cfg, progress=not args.no_progress)
    return 0
