"""Weights in llama.cpp's block formats (GGUF's tensor types), as modules of the model.

`QuantLinear` holds a linear layer's weight as the rows of blocks a GGUF file stores (Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K or F16): a uint8 tensor (out, row bytes) that may be a view of
the memory-mapped file itself, never dequantized whole. `QuantEmbedding` does the same for the
token embedding, dequantizing only the rows it looks up. `qwenkit.gguf.load_gguf` builds them from
a file; `quantize(model)` makes them from a loaded model's weights, with the `gguf` package's
quantizers (Q8_0 and Q4_0), the same blocks a file written by `qwenkit quantize` holds.

The forwards here are the reference: each dequantizes a tile of rows at a time with the `gguf`
package (numpy) and multiplies in fp32. qwenkit.cpu retypes these modules as streaming ones,
which run the same blocks through native kernels (qwenkit/cpu/csrc/quant.c).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.errors import GGUFError

# GGUF tensor type -> (ggml's number for it, weights, bytes) per block: the formats these modules
# hold, and the number qwenkit/cpu/csrc/quant.c takes for each (gguf.GGMLQuantizationType's)
BLOCK_FORMATS: dict[str, tuple[int, int, int]] = {
    "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210),
}  # fmt: skip
QUANTIZERS = ("Q8_0", "Q4_0")  # what quantize() writes: the gguf package's quantizers
TILE_BYTES = 8 << 20  # a dequantized tile of rows (fp32) for products of many rows: about L2 to L3 sized


def row_bytes(qtype: str, K: int) -> int:
    """The bytes of a row of K weights in format qtype, or 0 where K is not a whole number of blocks."""
    _, size, nbytes = BLOCK_FORMATS[qtype]
    return K // size * nbytes if K > 0 and K % size == 0 else 0


def dequantize(blocks: torch.Tensor, qtype: str, K: int) -> torch.Tensor:
    """fp32 weights (rows, K) of `blocks` (rows, row bytes), with the gguf package's dequantizer."""
    import gguf

    values = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(-1, K))


def tile_rows(K: int) -> int:
    return max(16, TILE_BYTES // (4 * K))


class QuantLinear(nn.Module):
    """y = x @ W.T + bias, W (out, in) kept in a GGUF block format; y in x's dtype. Inference only."""

    def __init__(self, blocks: torch.Tensor, qtype: str, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        if qtype not in BLOCK_FORMATS:
            raise GGUFError(f"{qtype} is not a block format qwenkit multiplies in ({', '.join(BLOCK_FORMATS)})")
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row_bytes(qtype, in_features):
            raise GGUFError(
                f"{qtype} weights of {in_features} inputs take rows of {row_bytes(qtype, in_features)} bytes; "
                f"got a {blocks.dtype} tensor of shape {tuple(blocks.shape)}"
            )
        self.qtype, self.in_features, self.out_features = qtype, in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks, persistent=False)
        self.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (M, in)
        rows = tile_rows(self.in_features)
        parts = [
            F.linear(x2, self.dequantize_rows(n, min(n + rows, self.out_features)))
            for n in range(0, self.out_features, rows)
        ]
        y = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # (M, out)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantize_rows(self, n0: int, n1: int) -> torch.Tensor:
        """Output rows [n0, n1) of the weight in fp32, (n1 - n0, in)."""
        return dequantize(self.blocks[n0:n1], self.qtype, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.dequantize_rows(0, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype}"


class QuantEmbedding(nn.Module):
    """A token embedding (vocab, C) in a block format: a lookup dequantizes only the rows it reads."""

    def __init__(self, blocks: torch.Tensor, qtype: str, embedding_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.head = QuantLinear(blocks, qtype, embedding_dim)  # the same blocks, for a tied LM head
        self.qtype, self.embedding_dim, self.dtype = qtype, embedding_dim, dtype
        self.num_embeddings = blocks.shape[0]

    @property
    def blocks(self) -> torch.Tensor:
        return self.head.blocks

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks[ids.reshape(-1)]  # (N, row bytes): a copy of the looked-up rows only
        return self.dequantize(rows).to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        return dequantize(rows, self.qtype, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype}"


def quantize_weight(weight: torch.Tensor, qtype: str = "Q8_0") -> torch.Tensor:
    """A weight (out, in) as rows of blocks of qtype (one of QUANTIZERS), uint8 (out, row bytes)."""
    import gguf

    if qtype not in QUANTIZERS:
        raise GGUFError(f"qwenkit quantizes to {' or '.join(QUANTIZERS)}, not {qtype}")
    w = weight.detach().float().cpu().numpy()
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])  # (out, row bytes) uint8
    return torch.from_numpy(np.ascontiguousarray(blocks))


@torch.no_grad()
def quantize(model: nn.Module, qtype: str = "Q8_0", head: bool = True) -> nn.Module:
    """Replace the model's linear layers by QuantLinear in `qtype` ("Q8_0", 8.5 bits a weight, or
    "Q4_0", 4.5), in place; returns the model. Layers whose input width is not a multiple of 32 stay
    as they are. Activations stay in the model's dtype.

    Args:
        model: a loaded QwenForCausalLM (inference only: a quantized model is not trained or saved).
        qtype: the block format, as `qwenkit quantize --type` writes it.
        head: also quantize the LM head. With tied embeddings the head gets its own quantized copy
            of the embedding matrix (the lookup keeps the float one): the largest single matrix read
            at every decoded token.
    """
    qtype = qtype.upper()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}".lstrip(".")
            if isinstance(child, nn.Linear):
                if child.in_features % 32 == 0 and (head or full != "lm_head"):
                    setattr(module, child_name, QuantLinear(quantize_weight(child.weight, qtype), qtype,
                                                            child.in_features, child.bias))  # fmt: skip
    if head and getattr(model, "lm_head", True) is None and model.model.embed_tokens.embedding_dim % 32 == 0:
        weight = model.model.embed_tokens.weight
        model.lm_head = QuantLinear(quantize_weight(weight, qtype), qtype, weight.shape[1])
    model.quantized = True
    return model
