"""Native decoding on the CPU, applied to a built model from outside.

`accelerate(model)` is the one place it is applied (qwenkit.hub and `qwenkit.load_model` call it
for a model on the CPU). It does two things, in place, and returns the model:

1. It retypes the model's nn.Linear, RMSNorm, Attention, QuantLinear and QuantEmbedding modules as their streaming
   subclasses (qwenkit.cpu.layers), which keep every parameter and name: a product of a few rows
   streams its weight on every core, and anything else runs the module's own forward. (Retyping a
   module in place, as FSDP2's fully_shard does, keeps its parameters, buffers and hooks.)
2. The model itself becomes a StreamingQwenForCausalLM: its tied LM head streams too, and its
   decoder (`model.decoder(cache)`, which qwenkit.generate asks for once per generation) is
   `make_decoder`, which looks at the model then. Where every block is plain, each decoding step
   runs all the blocks and the final norm in one native call (qwenkit.cpu.stack); where one is
   not (a LoRA layer), the blocks run module by module on the streaming layers; where a
   forward hook is registered anywhere, it is the plain model's step, so the hook sees every
   module run. A change made to the model during a generation is seen by the next one, and layers
   added since (qwenkit.quantize, merge_lora) are made streaming then.

The plain model (qwenkit.model) is the reference and the fallback: without a C compiler, or with
QWENKIT_KERNELS=0, `accelerate` leaves the model as it is.
"""

from __future__ import annotations

import torch

from qwenkit.cache import KVCache
from qwenkit.cpu import ops
from qwenkit.cpu.layers import STREAMING, decoding, stream
from qwenkit.cpu.stack import NativeDecoder, make_decoder
from qwenkit.model import QwenForCausalLM


class StreamingQwenForCausalLM(QwenForCausalLM):
    """The model as accelerate leaves it: its LM head streams too, tied or not (the embedding
    matrix is the largest single read of a decoding step), and its decoder is make_decoder's."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.gemv(x, self.output_weight()) if self.lm_head is None and decoding(x, x.shape[-1]) else None
        return super().logits(x) if y is None else y

    def decoder(self, cache: KVCache):
        return make_decoder(self, cache)


def accelerate(model: QwenForCausalLM) -> QwenForCausalLM:
    """Streaming modules and native decoding for a model on the CPU, in place (see the module's
    docstring); the model unchanged where the kernels are unavailable."""
    if model.device.type != "cpu" or not ops.available():
        return model
    if type(model) is QwenForCausalLM:
        model.__class__ = StreamingQwenForCausalLM
    stream(model)
    return model


__all__ = ["STREAMING", "NativeDecoder", "StreamingQwenForCausalLM", "accelerate", "make_decoder", "stream"]
