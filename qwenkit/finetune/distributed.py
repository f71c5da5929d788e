"""Distributed set-up for fine-tuning: torchrun's environment, PyTorch FSDP2, and tensor helpers that
work the same on one process (plain tensors) and many (sharded DTensors).

Launch with `torchrun --nproc_per_node N -m qwenkit finetune CONFIG.yaml`. Each decoder block
is sharded with `fully_shard`, then the root (the model plus its loss head, so that the embeddings
and the tied LM head are gathered for the whole forward). NCCL on GPUs, gloo on CPU. Only rank 0
logs and writes shared files.

torch.distributed.fsdp and torch.distributed.tensor are imported where they are used: they take
seconds to import, and a run on one process never needs them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qwenkit.errors import RecipeError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1, and pick this process's device.

    Args:
        device: "cpu", "cuda", "cuda:N" or "auto" (the local GPU when there is one).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"key 'device': {device!r}, but no CUDA GPU is available")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(root: nn.Module, blocks, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2: shard each block, then the root (its remaining parameters: embeddings, norm, head).

    Args:
        root: the module whose forward the trainer calls (the model plus its loss).
        blocks: the decoder blocks.
        param_dtype: compute dtype of the gathered parameters (bf16-mixed), or None to keep theirs.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(root, mp_policy=policy)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over all processes (a new tensor, on t's device); t itself on one process."""
    if not dist.is_initialized():
        return t
    # NCCL reduces GPU tensors only; the counters the trainer reduces live on the CPU.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    x = t.to(device, copy=True)
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_dtensor(t) -> bool:
    # A DTensor exists only once torch.distributed.tensor is imported, so a run on one process
    # never imports it just to ask.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank for a DTensor: a collective, call it on all ranks)."""
    return t.full_tensor() if is_dtensor(t) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; the tensor itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


@torch.no_grad()
def assign_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into `param`, keeping only this rank's shard when it is a DTensor."""
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        # Every rank holds `full`, so no data needs to move: each keeps its own slice.
        shard_ = distribute_tensor(
            full.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
        param.to_local().copy_(shard_.to_local())
    else:
        param.copy_(full)


def like_param(param: torch.Tensor, value: torch.Tensor, sharded: bool) -> torch.Tensor:
    """A saved tensor in the form of `param`: a DTensor of this rank's shard when param is one.

    Args:
        param: the parameter that `value` belongs to (or mirrors, for optimizer state).
        value: the saved tensor: the whole tensor, or this rank's shard when `sharded`.
        sharded: whether `value` is a shard.
    """
    if not is_dtensor(param):
        return value
    from torch.distributed.tensor import DTensor, distribute_tensor

    if sharded:
        return DTensor.from_local(
            value.to(param.device),
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "assign_full",
    "barrier",
    "full_tensor",
    "init_distributed",
    "is_dtensor",
    "like_param",
    "local_tensor",
    "shard",
    "shutdown",
]
