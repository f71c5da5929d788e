"""Fine-tuning: data (data.py), recipes (recipe.py), the one training loop (trainer.py), which
parameters train at what rate (strategy.py), the fused loss (loss.py), FSDP (distributed.py),
resumable checkpoints (state.py) and the `qwenkit finetune` command (cli.py).

    from qwenkit.finetune import load_config, finetune
    finetune(load_config("configs/tiny-cpu-lora.yaml", {"model": "ckpt", "data": "train.jsonl", "output": "runs/x"}))
"""

from qwenkit.finetune.recipe import FinetuneConfig, RecipeError, load_config


def finetune(cfg, callbacks=(), progress=True):
    """Run a recipe; see qwenkit.finetune.trainer.finetune."""
    from qwenkit.finetune.trainer import finetune as run

    return run(cfg, callbacks, progress)


__all__ = ["FinetuneConfig", "RecipeError", "finetune", "load_config"]
