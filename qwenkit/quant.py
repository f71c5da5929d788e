"""Weight-only int8 quantization, applied as a transform on a loaded model.

Each linear layer's weight becomes int8 with one fp scale per output row (symmetric, absmax /
127); activations stay in floating point. Decoding is bound by reading the weights, so a quarter
of the bytes of fp32 (half of bf16) is the point. Activations are rounded to bf16 (what torch's
int8 weight-only kernel takes). qwenkit.cpu.accelerate streams these layers natively on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * row scale).T + bias, never materializing the float weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # (N, in)
        if x2.device.type == "cpu" and self.in_features % 16 == 0:
            # torch's kernel crashes (torch 2.13: a segfault) or returns garbage when in % 16 != 0
            y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scale)  # (N, out)
        else:  # elsewhere: dequantize on the fly (still half the bytes moved of a bf16 weight at rest)
            y = F.linear(x2, self.weight_int8.to(torch.bfloat16)) * self.scale
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


@torch.no_grad()
def quantize(model: nn.Module, head: bool = True) -> nn.Module:
    """Replace the model's linear layers by Int8Linear, in place; returns the model.

    Args:
        model: a loaded QwenForCausalLM (inference only: a quantized model is not trained or saved).
        head: also quantize the LM head. With tied embeddings the head gets its own int8 copy of
            the embedding matrix (the lookup keeps the float one): the largest single matrix read
            at every decoded token.
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and (head or f"{name}.{child_name}".lstrip(".") != "lm_head"):
                setattr(module, child_name, Int8Linear(child.weight, child.bias))
    if head and getattr(model, "lm_head", True) is None:
        model.lm_head = Int8Linear(model.model.embed_tokens.weight, None)
    model.quantized = True
    return model
