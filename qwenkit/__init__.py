"""qwenkit: the Qwen2.5 family natively in PyTorch.

The public entry points; see README.md for a tour.
"""

from qwenkit.config import PRESETS, QwenConfig, from_hf_config
from qwenkit.checkpoint import load_model
from qwenkit.tokenizer import Tokenizer, load_tokenizer

__all__ = ["PRESETS", "QwenConfig", "Tokenizer", "from_hf_config", "load_model", "load_tokenizer"]
__version__ = "0.1.0"
