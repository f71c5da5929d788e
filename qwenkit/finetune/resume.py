"""Resumable training checkpoints: trained weights, optimizer, scheduler, RNG states and the step.

A checkpoint is a folder `output/checkpoints/step-00000100/`, written under a temporary name and
renamed into place only once complete (a run killed mid-write leaves a `.tmp-*` folder that is
ignored and cleaned up), keeping the last K. Tensors go to safetensors, everything else to JSON:
no pickle. The data position needs no file of its own: the batches of a step are a pure function
of the step (see batches.StepBatches).

Under FSDP, "full" checkpoints gather each tensor on rank 0 (one file, loadable by any number of
processes); "sharded" ones write one file per rank (no gathering; resumed with the same number of
processes). Either way the output folder must be one filesystem that every rank sees.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qwenkit.errors import CheckpointError
from qwenkit.files import install_dir
from qwenkit.finetune.distributed import (
    DistInfo,
    assign_full,
    barrier,
    full_tensor,
    is_dtensor,
    like_param,
    local_tensor,
)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_dirs(output: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and (p / STATE_FILE).exists()
    ]
    return [p for _, p in sorted(found)]


def remove_partial(output: str | os.PathLike) -> None:
    """Delete the temporary folders of checkpoints whose writing was interrupted."""
    root = Path(output) / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the order of the optimizer's state_dict indices."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def save_checkpoint(
    output: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    trained: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler,
    info: dict,
    dist: DistInfo,
    sharded: bool,
    keep_last: int,
) -> Path:
    """Write a resumable checkpoint of step `step` (all ranks call this).

    Args:
        output: the run's output folder.
        step: optimizer steps done.
        model: the model (its parameters may be FSDP DTensors).
        trained: names of the parameters that train (only these are saved).
        optimizer, scheduler: their states are saved.
        info: JSON-able run state (best eval loss, patience count, the recipe, ...).
        dist: the process group.
        sharded: one file per rank instead of full tensors gathered on rank 0.
        keep_last: checkpoints to keep; older ones are deleted.
    """
    root = Path(output) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()

    params = dict(model.named_parameters())
    gather = local_tensor if sharded else full_tensor
    weights = {n: gather(params[n]) for n in trained}
    sd = optimizer.state_dict()
    opt_tensors = {}
    for idx in sorted(sd["state"]):
        for key in sorted(sd["state"][idx]):
            value = sd["state"][idx][key]
            if torch.is_tensor(value):
                opt_tensors[f"{idx}.{key}"] = gather(value) if is_dtensor(value) else value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    non_tensor_state = {
        str(idx): {k: v for k, v in s.items() if not torch.is_tensor(v)} for idx, s in sd["state"].items()
    }

    suffix = f"-rank{dist.rank:05d}" if sharded else ""
    if sharded or dist.is_main:
        _save_tensors(weights, tmp / f"model{suffix}.safetensors")
        _save_tensors(opt_tensors, tmp / f"optimizer{suffix}.safetensors")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and dist.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(dist.device)
    _save_tensors(rng, tmp / f"rng-rank{dist.rank:05d}.safetensors")
    (tmp / f"rng-rank{dist.rank:05d}.json").write_text(json.dumps({"python": _py_state(random.getstate())}))
    barrier()
    if dist.is_main:
        meta = {
            "step": step,
            "world_size": dist.world_size,
            "sharded": sharded,
            "trained": trained,
            "optimizer": {"param_groups": groups, "state": non_tensor_state},
            "scheduler": scheduler.state_dict(),
            **info,
        }
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))
        install_dir(tmp, final)
        for old in checkpoint_dirs(output)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, dist: DistInfo
) -> dict:
    """Restore what `save_checkpoint` wrote into a model and optimizer built the same way; returns
    the saved run state (step, info). RNG states are restored last, so nothing after this draws
    differently from the uninterrupted run."""
    folder = Path(folder)
    meta = json.loads((folder / STATE_FILE).read_text())
    sharded = meta["sharded"]
    if sharded and meta["world_size"] != dist.world_size:
        raise CheckpointError(
            f"a sharded checkpoint of {meta['world_size']} processes cannot resume on "
            f"{dist.world_size}; use checkpoint_format: full to change the number of processes",
            file=folder,
        )
    suffix = f"-rank{dist.rank:05d}" if sharded else ""
    params = dict(model.named_parameters())
    weights = load_file(folder / f"model{suffix}.safetensors")
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise CheckpointError(f"tensor '{unknown[0]}' is not a parameter of this run's model", file=folder)
    with torch.no_grad():
        for name, tensor in weights.items():
            if sharded:
                local_tensor(params[name]).copy_(tensor)
            else:
                assign_full(params[name], tensor)

    index_param = _optimizer_params(optimizer)
    saved = meta["optimizer"]
    if [len(g["params"]) for g in saved["param_groups"]] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError("the optimizer's parameter groups differ from this run's", file=folder)
    tensors = load_file(folder / f"optimizer{suffix}.safetensors")
    state: dict[int, dict] = {int(i): dict(s) for i, s in saved["state"].items()}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        param = index_param[int(idx)]
        if name != "step" and is_dtensor(param) and value.ndim:
            value = like_param(param, value, sharded)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])

    rng = load_file(folder / f"rng-rank{dist.rank:05d}.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and dist.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], dist.device)
    py = json.loads((folder / f"rng-rank{dist.rank:05d}.json").read_text())["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return meta


def _py_state(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


__all__ = ["CHECKPOINTS", "checkpoint_dirs", "load_checkpoint", "remove_partial", "save_checkpoint"]
