"""What the commands that run a model share: the dtype names, the model from --model, --dtype and
--quantize, and the sampling parameters from the sampling flags.

Torch is imported inside the functions: `qwenkit --help` imports this module and should not pay
for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from qwenkit import config
from qwenkit.errors import UserError

if TYPE_CHECKING:
    import os

    import torch

    from qwenkit.generate import SamplingParams

# --dtype's choices: qwenkit.config's dtype names, spelled as torch names them.
Dtype = Literal["float32", "bfloat16"]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a --dtype name (qwenkit.config's table)."""
    return config.torch_dtype(name)


def load_from_flags(model: str | os.PathLike | None, dtype: str, quantize: bool = False):
    """(model, tokenizer) for --model (None or "default": the default model), --dtype and --quantize."""
    from qwenkit.hub import load

    return load(model, torch_dtype(dtype), quantize)


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

    max_new_tokens = flags.get("max_new_tokens")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if greedy and flags.get("temperature") is None:
        flags["do_sample"] = False
    return SamplingParams.from_model(model, **flags)
