"""Streaming versions of the model's modules, for decoding on the CPU.

Decoding reads every weight once per token, so it is bound by memory bandwidth, and PyTorch runs a
product of a few rows on one core at about half of it. Each class here is a subclass of the module
it replaces, with no state of its own: `qwenkit.cpu.accelerate` retypes the model's modules in
place, so parameters, names, hooks and state dicts stay as they were. In inference (no autograd)
a product of at most ops.MAX_ROWS rows goes to a native kernel that streams the weight on every
core; everything else is the parent's forward, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.cpu import ops
from qwenkit.gguf_file import drop_pages
from qwenkit.model import Attention, RMSNorm
from qwenkit.quant import QuantEmbedding, QuantLinear


def decoding(x: torch.Tensor, width: int) -> bool:
    """A few rows of `width` features on the CPU, outside autograd: what the kernels are for."""
    return x.is_cpu and not torch.is_grad_enabled() and x.numel() <= ops.MAX_ROWS * width


class StreamingLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.gemv(x, self.weight, self.bias) if decoding(x, self.in_features) else None
        return F.linear(x, self.weight, self.bias) if y is None else y


class StreamingRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.rms_norm(x, self.weight, self.eps) if decoding(x, x.shape[-1]) else None
        return super().forward(x) if y is None else y


class StreamingQuantLinear(QuantLinear):
    """csrc/quant.c's products over the blocks. Every integer format (ops.PACKABLE) is packed once,
    at the first product, into quant.c's tiles of 16 rows, which every product then reads:
    decoding and prefill alike, with x quantized to int8. F16 multiplies the file's rows for a few
    rows of x, and prefill dequantizes tiles of rows into a matmul, never the whole weight at once.
    The packed copy is the one state this subclass adds (not in state dicts: it is made again
    from the blocks); blocks that are views of a mapped file give their pages back once packed,
    so the weights are resident once."""

    def kernel_weights(self) -> tuple[torch.Tensor, bool]:
        """The weights the kernels read: the packed tiles (True), or the blocks as they are."""
        packed = self.__dict__.get("_packed")
        if packed is None and self.qtype in ops.PACKABLE:
            # Blocks mapped from a GGUF file would be resident twice, packed and as the file's
            # pages: each chunk's pages go back once it is packed (read again from the page cache
            # if a state dict or a dequantize wants them).
            packed = ops.pack(self.blocks, self.qtype, done=lambda b: drop_pages(b.data_ptr(), b.numel()))
            if packed is not None:
                self.__dict__["_packed"] = packed
        return (self.blocks, False) if packed is None else (packed, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and not torch.is_grad_enabled():
            weights, packed = self.kernel_weights()
            if packed or x.numel() <= ops.MAX_ROWS * self.in_features:
                rows = self.out_features if packed else None
                y = ops.qgemv(x, weights, self.qtype, self.bias, packed_rows=rows)  # (..., out) fp32
                if y is not None:
                    return y.to(x.dtype)
        return super().forward(x)

    def dequantize_rows(self, n0: int, n1: int) -> torch.Tensor:
        w = ops.dequantize(self.blocks[n0:n1], self.qtype, self.in_features)
        return super().dequantize_rows(n0, n1) if w is None else w


class StreamingQuantEmbedding(QuantEmbedding):
    def dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        w = ops.dequantize(rows.contiguous(), self.qtype, self.embedding_dim)
        return super().dequantize(rows) if w is None else w


class StreamingAttention(Attention):
    """One new token per row with a cache: RoPE, the cache write and the attention in one native
    call (the same values as the parent's path), instead of about thirty small PyTorch ops."""

    def forward(self, x, cos, sin, mask, cache=None, slots=None) -> torch.Tensor:
        i = self.layer_idx
        if cache is None or x.shape[1] != 1 or torch.is_grad_enabled() or not x.is_cpu:
            return super().forward(x, cos, sin, mask, cache, slots)
        if x.dtype not in ops.SUFFIXES or cache.k[i].dtype != x.dtype:
            return super().forward(x, cos, sin, mask, cache, slots)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, 1, H*D), (B, 1, K*D), (B, 1, K*D)
        y = ops.decode_attention(q, k, v, cos, sin, cache.k[i], cache.v[i], slots[:, 0], cache.valid)
        if y is None:  # a layout the kernel does not take: the parent's path, from the start
            return super().forward(x, cos, sin, mask, cache, slots)
        return self.o_proj(y)  # (B, 1, C)


STREAMING: dict[type, type] = {
    nn.Linear: StreamingLinear,
    RMSNorm: StreamingRMSNorm,
    Attention: StreamingAttention,
    QuantLinear: StreamingQuantLinear,
    QuantEmbedding: StreamingQuantEmbedding,
}


def stream(model: nn.Module) -> None:
    """Retype every plain module of `model` that has a streaming subclass, in place. Each subclass
    adds no state, so the module keeps its parameters, buffers and hooks (as FSDP2's fully_shard
    retypes modules); layers added since the last call (quantize, merge_lora) are taken too."""
    for module in model.modules():
        streaming = STREAMING.get(type(module))
        if streaming is not None:
            module.__class__ = streaming
