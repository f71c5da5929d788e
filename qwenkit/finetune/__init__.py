"""Fine-tuning: the recipe (config.py), data files read into conversations (data.py), conversations
into batches (batches.py), the one training loop (trainer.py), which parameters train at what rate
(strategy.py), the fused loss (loss.py), FSDP (distributed.py), resumable checkpoints (resume.py)
and the loss plot (plot.py). The `qwenkit finetune` command that runs a recipe is qwenkit/cli/finetune.py.

    from qwenkit.finetune import load_config, finetune
    finetune(load_config("configs/tiny-cpu-lora.yaml", {"model": "ckpt", "data": "train.jsonl", "output": "runs/x"}))
"""

from qwenkit.errors import RecipeError
from qwenkit.finetune.config import FinetuneConfig, build_config, load_config
from qwenkit.finetune.trainer import Trainer, finetune

__all__ = ["FinetuneConfig", "RecipeError", "Trainer", "build_config", "finetune", "load_config"]
