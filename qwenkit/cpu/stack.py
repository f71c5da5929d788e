"""A whole decoding step through every block in one native call (csrc/decode.c).

`DecodeStack.build(model, cache)` checks, once per generation, that every block is exactly as
qwenkit.model builds it (no LoRA layer, no bias where Qwen2 has none, no hook), and binds
each block's tensors and the cache's storage, in the layout `BlockTensors` defines and decode.c
indexes. `NativeDecoder` is the decoding step qwenkit.cpu gives a model: the embedding, the
rotary tables and the cache's bookkeeping in PyTorch, the blocks and the final norm in one call
(or module by module on the streaming layers where the stack does not apply), and the LM head
streamed on every core.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from qwenkit import generate
from qwenkit.cache import KVCache
from qwenkit.cpu import ops
from qwenkit.cpu.layers import StreamingAttention, StreamingLinear, StreamingQuantLinear, StreamingRMSNorm, stream
from qwenkit.model import MLP, Attention, Block, QwenForCausalLM, RMSNorm
from qwenkit.quant import BLOCK_FORMATS, QuantLinear, row_bytes

_NORMS = (RMSNorm, StreamingRMSNorm)
_LINEARS = (nn.Linear, StreamingLinear)
_QUANT = (QuantLinear, StreamingQuantLinear)
# the ggml type number decode.c takes for weights in the activations' dtype
_DTYPE_TYPES = {torch.float32: 0, torch.bfloat16: 30}


class BlockTensors(NamedTuple):
    """One block's tensors in decode.c's order (csrc/qwenkit.h's `enum block_tensor`, which a test
    holds equal to these fields). Weights are (out, in); the biases may be None."""

    input_layernorm: torch.Tensor  # (C,)
    q_proj: torch.Tensor  # (H*D, C)
    q_bias: torch.Tensor | None  # (H*D,)
    k_proj: torch.Tensor  # (K*D, C)
    k_bias: torch.Tensor | None  # (K*D,)
    v_proj: torch.Tensor  # (K*D, C)
    v_bias: torch.Tensor | None  # (K*D,)
    o_proj: torch.Tensor  # (C, H*D)
    post_attention_layernorm: torch.Tensor  # (C,)
    gate_proj: torch.Tensor  # (I, C)
    up_proj: torch.Tensor  # (I, C)
    down_proj: torch.Tensor  # (C, I)
    k_cache: torch.Tensor  # (B, K, S, D)
    v_cache: torch.Tensor  # (B, K, S, D)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def block_tensors(block: nn.Module, k_cache: torch.Tensor, v_cache: torch.Tensor) -> BlockTensors | None:
    """A block's tensors, or None where the block is not exactly as qwenkit.model builds it (a LoRA
    layer, a bias on o/gate/up/down, a hook), so that decode.c would compute another thing. A
    projection in a GGUF block format (QuantLinear) gives its blocks (out, row bytes) uint8."""
    if type(block) is not Block:
        return None
    attn, mlp = block.self_attn, block.mlp
    norms = (block.input_layernorm, block.post_attention_layernorm)
    if type(attn) not in (Attention, StreamingAttention) or type(mlp) is not MLP:
        return None
    projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if any(type(m) not in _LINEARS + _QUANT for m in projections) or any(type(m) not in _NORMS for m in norms):
        return None
    if any(_hooked(m) for m in (block, attn, mlp, *norms, *projections)):
        return None
    if any(m.bias is not None for m in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        return None
    q, k, v, o, gate, up, down = (_weights(m)[0] for m in projections)
    return BlockTensors(
        norms[0].weight, q, attn.q_proj.bias, k, attn.k_proj.bias, v, attn.v_proj.bias, o,
        norms[1].weight, gate, up, down, k_cache, v_cache,
    )  # fmt: skip


def _weights(module: nn.Module) -> tuple[torch.Tensor, bool]:
    """A projection's weight as decode.c reads it, and whether it is packed (ops.pack's tiles): a
    streaming QuantLinear's kernel weights, a QuantLinear's blocks, else the weight."""
    if isinstance(module, StreamingQuantLinear):
        return module.kernel_weights()
    return (module.blocks, False) if isinstance(module, QuantLinear) else (module.weight, False)


def block_types(block: nn.Module, dtype: torch.dtype) -> list[int]:
    """The ggml type number of each of a block's tensors (BlockTensors' order) as decode.c reads
    them: a QuantLinear's format (plus ops.PACKED where packed), else the activations' dtype."""
    types = [_DTYPE_TYPES[dtype]] * len(BlockTensors._fields)
    attn, mlp = block.self_attn, block.mlp
    modules = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj, "o_proj": attn.o_proj,
               "gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}  # fmt: skip
    for name, module in modules.items():
        if isinstance(module, QuantLinear):
            packed = _weights(module)[1]
            types[BlockTensors._fields.index(name)] = BLOCK_FORMATS[module.qtype][0] + (ops.PACKED if packed else 0)
    return types


class DecodeStack:
    """Every block of a model over one cache, bound for decode.c. Build with `DecodeStack.build`."""

    def __init__(self, fn, blocks: list[BlockTensors], types: list[list[int]] | None, final_norm: torch.Tensor,
                 eps: float, dims: tuple):  # fmt: skip
        self._fn, self.blocks, self.final_norm, self.eps, self.dims = fn, blocks, final_norm, eps, dims
        self.dtype = final_norm.dtype
        # The blocks' tensors stay referenced here as long as the pointers are in use.
        pointers = [None if t is None else t.data_ptr() for block in blocks for t in block]
        self._pointers = (ctypes.c_void_p * len(pointers))(*pointers)
        flat = None if types is None else [t for block in types for t in block]
        self._types = None if flat is None else (ctypes.c_int32 * len(flat))(*flat)

    @classmethod
    def build(cls, model: QwenForCausalLM, cache: KVCache) -> DecodeStack | None:
        """The stack for `model` decoding over `cache`, or None where decode.c does not apply: a block
        that is not plain (block_tensors), a tensor not contiguous on the CPU or not of one dtype
        (fp32 or bf16), more than MAX_ROWS rows, or no library."""
        norm = model.model.norm
        if type(norm) not in _NORMS or _hooked(norm) or not model.model.layers:
            return None
        layers = model.model.layers
        blocks = [block_tensors(b, cache.k[i], cache.v[i]) for i, b in enumerate(layers)]
        if None in blocks or norm.weight.dtype not in _DTYPE_TYPES:
            return None
        dtype = norm.weight.dtype
        types = [block_types(b, dtype) for b in layers]
        B, K, S, D = blocks[0].k_cache.shape
        C, HD = norm.weight.shape[0], layers[0].self_attn.q_proj.out_features
        I = layers[0].mlp.gate_proj.out_features
        shapes = BlockTensors(
            (C,), (HD, C), (HD,), (K * D, C), (K * D,), (K * D, C), (K * D,), (C, HD),
            (C,), (I, C), (I, C), (C, I), (B, K, S, D), (B, K, S, D),
        )  # fmt: skip
        for block, kinds in zip(blocks, types):
            for t, shape, kind in zip(block, shapes, kinds):
                if kind != _DTYPE_TYPES[dtype]:  # a block format: uint8 rows of blocks, or packed tiles
                    number = kind & ~ops.PACKED
                    qtype = next(q for q, (n, _, _) in BLOCK_FORMATS.items() if n == number)
                    rb = row_bytes(qtype, shape[1])
                    shape = ops.packed_shape(shape[0], rb) if kind & ops.PACKED else (shape[0], rb)
                    want = torch.uint8
                else:
                    want = dtype
                if t is not None and (t.shape != shape or t.dtype != want or not t.is_cpu or not t.is_contiguous()):
                    return None
        if norm.weight.shape != (C,) or not norm.weight.is_cpu or not 0 < B <= ops.MAX_ROWS or HD % D:
            return None
        fn = ops.function("decode_layers", dtype)
        if fn is None:
            return None
        plain = all(kind == _DTYPE_TYPES[dtype] for kinds in types for kind in kinds)
        return cls(fn, blocks, None if plain else types, norm.weight, norm.eps, (B, C, HD // D, K, S, D, I))

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """x (B, 1, C): the new tokens' embeddings; cos, sin (B, 1, D): their rotary tables; slots (B,)
        where each row's new token goes; valid (B, S), the new tokens' flags already set. Returns the
        final-normed hidden states (B, 1, C). Inputs the stack was not built for are refused with a
        ValueError before any pointer is read (a model moved to another dtype during a generation)."""
        B, C, H, K, S, D, I = self.dims
        expected = {"x": (x, (B, 1, C)), "cos": (cos, (B, 1, D)), "sin": (sin, (B, 1, D)), "slots": (slots, (B,)),
                    "valid": (valid, (B, S))}  # fmt: skip
        dtypes = {"x": self.dtype, "cos": self.dtype, "sin": self.dtype, "slots": torch.int64, "valid": torch.bool}
        for name, (t, shape) in expected.items():
            if t.shape != shape or t.dtype != dtypes[name] or not t.is_cpu or not t.is_contiguous():
                raise ValueError(
                    f"the decode stack was built for {name} {shape} {dtypes[name]}, got {tuple(t.shape)} {t.dtype}"
                )
        out = x.clone()  # (B, 1, C): the residual stream, updated in place
        pointers = (t.data_ptr() for t in (self.final_norm, out, cos, sin, slots, valid))
        status = self._fn(self._pointers, self._types, len(self.blocks), *pointers, B, C, H, K, S, D, I, self.eps,
                          torch.get_num_threads())  # fmt: skip
        if status != 0:
            raise RuntimeError(
                f"qwenkit's decode_layers kernel rejected its inputs (status {status}): x {tuple(x.shape)}, "
                f"cache ({B}, {K}, {S}, {D}), slots {slots.tolist()}"
            )
        return out


class NativeDecoder:
    """The decoding step of one generation: tokens (B,) [, attention_mask (B,)] -> logits (B, vocab).

    The blocks run in one native call where the stack applies (`stack`), else module by module on
    the streaming layers. Built by `make_decoder`, which has checked that no hook is registered.
    """

    def __init__(self, model: QwenForCausalLM, cache: KVCache, stack: DecodeStack | None):
        self.model, self.cache, self.stack = model, cache, stack

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        model, cache = self.model, self.cache
        mask = None if attention_mask is None else attention_mask[:, None]  # (B, 1)
        if self.stack is None:
            h = model.hidden_states(tokens[:, None], mask, cache=cache)  # (B, 1, C)
        else:
            slots, positions = cache.extend(1, None if mask is None else mask.bool())  # (B, 1) each
            x = model.model.embed_tokens(tokens[:, None])  # (B, 1, C)
            cos, sin = model.model.rotary_emb(positions, x.dtype)  # (B, 1, D) each
            h = self.stack(x, cos, sin, slots[:, 0], cache.valid)
        return model.logits(h)[:, -1]  # (B, vocab)


def make_decoder(model: QwenForCausalLM, cache: KVCache) -> Callable[..., torch.Tensor]:
    """The decoding step of one generation over `cache`, chosen now from what the model is: the
    plain model's where a forward hook is registered anywhere (so that it sees every module run),
    else a NativeDecoder, with the stack where every block is plain. Layers added to the model
    since the last generation (qwenkit.quantize, merge_lora) are made streaming first."""
    stream(model)
    hooked = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    if hooked or any(_hooked(m) for m in model.modules()):
        return functools.partial(generate.decode_step, model, cache=cache)
    return NativeDecoder(model, cache, DecodeStack.build(model, cache))
