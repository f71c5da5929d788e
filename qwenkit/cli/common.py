"""What the commands that run a model share: the dtype names, the sampling flags and the weights'
flags (each a dataclass whose fields a command takes as `Flags`), the model from --model, --dtype,
--quantize and --adapter, and the sampling parameters from the sampling flags.

Torch is imported inside the functions: `qwenkit --help` imports this module and should not pay
for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from qwenkit import config
from qwenkit.cli.signature import Flags
from qwenkit.errors import UserError

if TYPE_CHECKING:
    import os

    import torch

    from qwenkit.generate import SamplingParams

# --dtype's choices: qwenkit.config's dtype names, spelled as torch names them.
Dtype = Literal["float32", "bfloat16"]


@dataclass(frozen=True)
class Sampling:
    """The sampling flags. One not given (None) leaves the checkpoint's generation_config.json value;
    a command names the flags it offers, sets their defaults and may word their help its own way.

    Args:
        max_new_tokens: the most tokens to generate per prompt.
        temperature: sampling temperature; 0 means greedy.
        top_p: nucleus sampling: keep the smallest set of tokens holding this much probability.
        top_k: sample among the k most likely tokens.
        min_p: drop tokens below this fraction of the most likely token's probability.
        repetition_penalty: >1 discourages tokens already in the prompt or the output.
        presence_penalty: subtracted from the logit of every token already generated.
        frequency_penalty: subtracted once per earlier occurrence in the output.
        seed: random seed, to reproduce a sampled run.
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self):
        check_max_new_tokens(self.max_new_tokens)


# The sampling flags each kind of command offers, in --help's order: `generate` every one, `chat` the
# usual few, and the applications how long, how random and the seed (the rest is their task's).
SamplingFlags = Annotated[Sampling, Flags()]
ChatSampling = Annotated[Sampling, Flags("max_new_tokens", "temperature", "top_p", "top_k", "seed")]
Decoding = Annotated[Sampling, Flags("max_new_tokens", "temperature", "seed")]


@dataclass(frozen=True)
class Weights:
    """How the weights sit in memory.

    Args:
        dtype: the weights' dtype in memory (a GGUF file's: the activations').
        quantize: quantize a checkpoint's weights to Q8_0 in memory (8.5 bits a weight, a quarter of
            fp32's memory traffic; slightly different outputs). A .gguf --model runs as the file
            stores it (Q4_K_M, Q8_0, ...) without this flag.
        adapter: a LoRA adapter folder (PEFT's format, as `qwenkit finetune --method lora` writes it)
            applied on top of the weights, quantized or not, without merging it.
    """

    dtype: Dtype = "float32"
    quantize: bool = False
    adapter: str | None = None


WeightFlags = Annotated[Weights, Flags()]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a --dtype name (qwenkit.config's table)."""
    return config.torch_dtype(name)


def check_max_new_tokens(max_new_tokens: int | None) -> None:
    """--max-new-tokens, when given, asks for at least one token."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")


def load_from_flags(model: str | os.PathLike | None, dtype: str, quantize: bool = False, adapter: str | None = None):
    """(model, tokenizer) for --model (None or "default": the default model), --dtype, --quantize and
    --adapter (applied last, so that it sits on the quantized layers)."""
    from qwenkit.hub import load
    from qwenkit.lora import load_adapter

    m, tok = load(model, torch_dtype(dtype), quantize)
    return (m if adapter is None else load_adapter(m, adapter)), tok


def sampling_from_flags(model, *, greedy: bool = False, **flags) -> SamplingParams:
    """The checkpoint's generation_config.json, then the sampling flags that were given (None: not
    given). `SamplingParams.from_model` holds the temperature rule.

    Args:
        model: the loaded model, whose generation_config.json gives the defaults.
        greedy: decode greedily unless --temperature is given (for answers that are scored against
            references, as the checkpoint's sampling defaults would make them vary).
        flags: SamplingParams fields: max_new_tokens, temperature, top_p, top_k, seed, ...
    """
    from qwenkit.generate import SamplingParams

    check_max_new_tokens(flags.get("max_new_tokens"))
    if greedy and flags.get("temperature") is None:
        flags["do_sample"] = False
    return SamplingParams.from_model(model, **flags)
