"""Which parameters train, at what learning rate, and when: the only thing that differs between
full fine-tuning, LoRA, freezing, gradual unfreezing and layer-wise lr decay.

Every parameter has a depth, counted from the top of the network: 0 for the top decoder layer, the
final norm and an untied lm_head; L - 1 - i for decoder layer i; L (one below the bottom layer) for
the embeddings, which with tied weights are also the LM head. Layer-wise lr decay gives a parameter
`lr * decay ** depth`. Gradual unfreezing cuts depths into groups of `unfreeze_group_size` and starts
with group 0 only, unfreezing one more group every K steps or epochs. One optimizer group per
(depth, weight decay or not) carries those numbers, with `depth` and `unfreeze_group` recorded in
it, so a test (or a user) reads exactly what trains at what rate from `optimizer.param_groups`.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qwenkit.errors import RecipeError
from qwenkit.finetune.config import FinetuneConfig


def depth_of(name: str, num_layers: int) -> int:
    """A parameter's depth from the top (see the module docstring)."""
    m = re.match(r"(?:.*\.)?layers\.(\d+)\.", name)
    if m:
        return num_layers - 1 - int(m.group(1))
    if "embed_tokens" in name:
        return num_layers
    if name.startswith("lm_head") or ".norm." in f".{name}":
        return 0
    raise ValueError(f"parameter {name!r} has no place in the Qwen2 layer stack")


def _module_matches(name: str, pattern: str) -> bool:
    return (
        name == pattern
        or name.startswith(pattern + ".")
        or fnmatch.fnmatchcase(name, pattern)
        or fnmatch.fnmatchcase(name, pattern + ".*")
    )


def trainable_names(model: nn.Module, cfg: FinetuneConfig) -> list[str]:
    """The parameters that the method trains, in the model's order (LoRA must already be applied).

    Args:
        model: the QwenForCausalLM to train.
        cfg: the recipe (method, train_layers).
    """
    names = [n for n, _ in model.named_parameters()]
    L = model.config.num_hidden_layers
    if cfg.method == "full":
        return names
    if cfg.method == "lora":
        return [n for n in names if ".lora_A." in n or ".lora_B." in n]
    if isinstance(cfg.train_layers, int):
        return [n for n in names if depth_of(n, L) < cfg.train_layers]
    chosen = []
    for pattern in cfg.train_layers:
        hits = [n for n in names if _module_matches(n, pattern)]
        if not hits:
            raise RecipeError(
                f"key 'train_layers': {pattern!r} matches no module of the model "
                f"(names look like model.layers.0.mlp, model.norm, lm_head)"
            )
        chosen.extend(hits)
    return [n for n in names if n in set(chosen)]


def lora_layer_indices(cfg: FinetuneConfig, num_layers: int) -> list[int] | None:
    """For method lora with train_layers N: the top N decoder layers' indices."""
    if cfg.method != "lora" or cfg.train_layers is None:
        return None
    return list(range(max(num_layers - cfg.train_layers, 0), num_layers))


@dataclass
class GroupSpec:
    names: list[str]
    depth: int
    unfreeze_group: int
    decay: bool


def param_groups(model: nn.Module, names: Sequence[str], cfg: FinetuneConfig) -> list[dict]:
    """Optimizer parameter groups: one per (depth, decay or not), each with its lr and metadata.

    Args:
        model: the model (its named_parameters give the tensors).
        names: the trainable parameters' names.
        cfg: lr, weight_decay, layer_lr_decay, unfreeze_group_size.
    """
    L = model.config.num_hidden_layers
    params = dict(model.named_parameters())
    specs: dict[tuple[int, bool], GroupSpec] = {}
    for n in names:
        d = depth_of(n, L)
        decay = params[n].ndim >= 2  # never decay biases and norm weights
        spec = specs.setdefault((d, decay), GroupSpec([], d, d // cfg.unfreeze_group_size, decay))
        spec.names.append(n)
    groups = []
    for (d, decay), spec in sorted(specs.items()):
        groups.append(
            {
                "params": [(n, params[n]) for n in spec.names],  # named: the optimizer keeps `param_names`
                "lr": cfg.lr * cfg.layer_lr_decay**d,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "depth": d,
                "unfreeze_group": spec.unfreeze_group,
            }
        )
    return groups


def unfrozen_groups(cfg: FinetuneConfig, step: int, epoch: int) -> int | None:
    """How many unfreezing groups train at optimizer step `step` (0-based) of epoch `epoch`; None: all."""
    if not cfg.unfreeze_every:
        return None
    elapsed = step if cfg.unfreeze_unit == "steps" else epoch
    return 1 + elapsed // cfg.unfreeze_every


def set_unfrozen(optimizer: torch.optim.Optimizer, n_groups: int | None, toggle_requires_grad: bool) -> None:
    """Mark which optimizer groups train now. Locked groups keep requires_grad off where that is safe
    (not under FSDP, whose gathered parameters copy the flag once), and `drop_locked_grads` removes
    any gradient they still get before the step."""
    for group in optimizer.param_groups:
        live = n_groups is None or group["unfreeze_group"] < n_groups
        group["locked"] = not live
        if toggle_requires_grad:
            for p in group["params"]:
                p.requires_grad_(live)


def drop_locked_grads(optimizer: torch.optim.Optimizer) -> None:
    """Locked parameters must not move: no gradient means no update, no weight decay, no moments."""
    for group in optimizer.param_groups:
        if group.get("locked"):
            for p in group["params"]:
                p.grad = None


def build_optimizer(groups: list[dict], cfg: FinetuneConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD with momentum over the groups (each keeps its own lr and weight decay).

    Args:
        groups: from `param_groups`.
        cfg: optimizer, lr, betas, momentum.
        fused: use PyTorch's fused kernels (one pass over all parameters).
    """
    kw = {"fused": True} if fused else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kw)
    if cfg.optimizer == "adam":
        # Adam's weight decay is L2 in the gradient; recipes that want decoupled decay use adamw.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kw)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **kw)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """The schedule's multiplier of each group's lr at optimizer step `step` (0-based).

    Warmup is linear from 1/warmup to 1 over the first `warmup` steps; then cosine or linear decay
    towards 0 at step `total`, or constant.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, total_steps: int):
    """A LambdaLR over every group's own lr (so layer-wise decay ratios are kept)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.scheduler)
    )


__all__ = [
    "build_optimizer",
    "build_scheduler",
    "depth_of",
    "drop_locked_grads",
    "lora_layer_indices",
    "lr_factor",
    "param_groups",
    "set_unfrozen",
    "trainable_names",
    "unfrozen_groups",
]
