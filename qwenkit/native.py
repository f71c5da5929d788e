"""Which decoding steps run natively: a whole step through every block in one call (kernels.DecodeStack).

A decoding step on the CPU goes to decode.c when the model's blocks are exactly as qwenkit.model
builds them: a LoRA or int8 layer, a bias where Qwen2 has none, or a forward hook anywhere in the
blocks keeps the path of one module at a time. The check walks every block, so it runs at a
cache's first step and is kept with the cache while no module, parameter or buffer is assigned
anywhere and the model is not moved: walking 24 blocks costs ~0.7 ms per step once decoding has
flushed the CPU's caches, 4% of a small model's step. (So a forward hook added to a block's
submodule during a generation is seen from the next one.)
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from qwenkit import kernels

# Bumped whenever any module, parameter or buffer is assigned anywhere (LoRA layers, int8 layers,
# loading with assign=True) and when a model is moved or retyped (QwenForCausalLM._apply): a
# checked DecodeStack is kept only while this stays the same.
_structure_version = [0]


def structure_changed(*_) -> None:
    _structure_version[0] += 1


nn.modules.module.register_module_module_registration_hook(structure_changed)
nn.modules.module.register_module_parameter_registration_hook(structure_changed)
nn.modules.module.register_module_buffer_registration_hook(structure_changed)


def decode_step(model, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor | None:
    """The final-normed hidden states (B, 1, C) of one decoding step of `model` (a QwenForCausalLM)
    through its native stack, or None where the stack does not apply. x (B, 1, C) the embeddings;
    cos, sin (B, 1, D) the step's rotary tables; cache the model's KVCache."""
    if (
        not x.is_cpu
        or torch.is_grad_enabled()
        or not kernels.enabled()
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    ):
        return None
    key = (id(model), _structure_version[0], x.dtype, cache.k[0].shape, cache.data_pointers())
    known = cache._stacks.get(key)
    if known is None or known[0]() is not model:
        if len(cache._stacks) >= 16:  # keys of an older structure, or row ranges of a server's cache
            cache._stacks.clear()
        known = cache._stacks[key] = (weakref.ref(model), _build_stack(model, cache))
    stack = known[1]
    return None if stack is None else stack(x, cos, sin, cache.lengths, cache.valid, model.config.rms_norm_eps)


def _build_stack(model, cache) -> kernels.DecodeStack | None:
    from qwenkit.model import RMSNorm

    norm = model.model.norm
    blocks = [plain_block_tensors(block) for block in model.model.layers]
    if type(norm) is not RMSNorm or norm._forward_hooks or norm._forward_pre_hooks or not blocks or None in blocks:
        return None
    layers = [(*tensors, cache.k[i], cache.v[i]) for i, tensors in enumerate(blocks)]
    return kernels.DecodeStack.build(layers, final_norm=norm.weight)


def plain_block_tensors(block: nn.Module) -> tuple | None:
    """A block's weights in kernels.LAYER_TENSORS' order (without the caches), or None where the
    block is not as qwenkit.model builds it (a LoRA or int8 layer, a hook). Reads the module dicts
    directly, which is several times quicker than nn.Module's attribute lookup."""
    from qwenkit.model import MLP, Attention, Block, Linear, RMSNorm

    if type(block) is not Block:
        return None
    mods = block._modules
    attn, mlp, norm1, norm2 = mods["self_attn"], mods["mlp"], mods["input_layernorm"], mods["post_attention_layernorm"]
    if type(attn) is not Attention or type(mlp) is not MLP or type(norm1) is not RMSNorm or type(norm2) is not RMSNorm:
        return None
    q, k, v, o = linears = tuple(attn._modules[name] for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    gate, up, down = mlp_linears = tuple(mlp._modules[name] for name in ("gate_proj", "up_proj", "down_proj"))
    if any(type(m) is not Linear for m in linears + mlp_linears):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in (block, attn, mlp, norm1, norm2, *linears, *mlp_linears)):
        return None
    if any(m._parameters["bias"] is not None for m in (o, gate, up, down)):
        return None
    w = {m: m._parameters["weight"] for m in (norm1, q, k, v, o, norm2, gate, up, down)}
    return (
        w[norm1],
        w[q],
        q._parameters["bias"],
        w[k],
        k._parameters["bias"],
        w[v],
        v._parameters["bias"],
        w[o],
        w[norm2],
        w[gate],
        w[up],
        w[down],
    )
