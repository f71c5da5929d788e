"""qwenkit: the Qwen2.5 family natively in PyTorch.

The public entry points; see README.md for a tour. They load on first use, so that
`import qwenkit` (and `qwenkit --help`) stays fast: torch is imported only when needed.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "QwenConfig": "qwenkit.config",
    "PRESETS": "qwenkit.config",
    "from_hf_config": "qwenkit.config",
    "QwenForCausalLM": "qwenkit.model",
    "KVCache": "qwenkit.cache",
    "load_model": "qwenkit.hub",
    "accelerate": "qwenkit.cpu",
    "Tokenizer": "qwenkit.tokenizer",
    "load_tokenizer": "qwenkit.hub",
    "StreamDecoder": "qwenkit.tokenizer",
    "encode_chat": "qwenkit.tokenizer",
    "quantize": "qwenkit.quant",
    "SamplingParams": "qwenkit.generate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qwenkit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
