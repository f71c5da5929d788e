"""The model's configuration: a frozen dataclass, presets for the Qwen2.5 family, and `config.json` IO.

Every field is one that Qwen2-family checkpoints use; a Llama-architecture `config.json` maps onto
the same fields (it is the same network without q/k/v bias). Change a config with
`dataclasses.replace`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenkit.errors import ConfigError, UserError
from qwenkit.qwen_vocab import ENDOFTEXT_ID, IM_END_ID

if TYPE_CHECKING:
    import torch

# The weights' dtypes qwenkit offers, by the names flags and files use. float16 is not among them:
# it overflows on Qwen2.5's weights.
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def torch_dtype(name: str | torch.dtype, error: type[Exception] = UserError) -> torch.dtype:
    """The torch dtype of a name in DTYPE_NAMES ("torch.bfloat16" and torch dtypes pass through);
    another name raises `error` (the caller's own kind, e.g. GGUFError for a conversion)."""
    import torch  # here, not at the top: the CLI reads this module before it needs torch

    if isinstance(name, torch.dtype) and str(name).removeprefix("torch.") in DTYPE_NAMES:
        return name
    key = name.removeprefix("torch.") if isinstance(name, str) else name
    if key not in DTYPE_NAMES:
        raise error(f"dtype {name!r}: choose float32 or bfloat16 (float16 overflows on Qwen2.5 weights)")
    return getattr(torch, DTYPE_NAMES[key])


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rotary scaling, as Qwen2.5 enables it for contexts past 32k tokens."""

    factor: float = 4.0
    original_max_position_embeddings: int = 32768
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: 0.1 * ln(factor) + 1, as in the YaRN paper

    @property
    def mscale(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0


@dataclass(frozen=True)
class QwenConfig:
    vocab_size: int = 151936  # embedding rows; larger than the tokenizer's 151665 on purpose
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: YarnScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = True  # q/k/v bias: True for Qwen2, False for Llama
    initializer_range: float = 0.02
    bos_token_id: int | None = ENDOFTEXT_ID
    eos_token_id: int | list[int] | None = IM_END_ID
    model_type: str = "qwen2"  # "qwen2" or "llama": which HF class the saved config names
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        _validate(self)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that transformers' Qwen2ForCausalLM (or LlamaForCausalLM) loads."""
        d: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_dropout": 0.0,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
        }
        if self.head_dim is not None:
            d["head_dim"] = self.head_dim
        if self.model_type == "qwen2":
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        else:
            d.update(attention_bias=self.attention_bias, mlp_bias=False)
        if self.rope_scaling is not None:
            s = {k: v for k, v in asdict(self.rope_scaling).items() if v is not None}
            d["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **s}
        return d


def _validate(c: QwenConfig) -> None:
    def bad(field_name: str, why: str):
        raise ConfigError(f"field '{field_name}' {why}")

    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
    ):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            bad(name, f"must be a positive integer, got {value!r}")
    if c.head_dim is None and c.hidden_size % c.num_attention_heads:
        bad("num_attention_heads", f"({c.num_attention_heads}) must divide hidden_size ({c.hidden_size})")
    if c.num_attention_heads % c.num_key_value_heads:
        bad(
            "num_key_value_heads",
            f"({c.num_key_value_heads}) must divide num_attention_heads ({c.num_attention_heads})",
        )
    if c.dim_per_head % 2:
        bad("head_dim", f"must be even for rotary embeddings, got {c.dim_per_head}")
    if c.model_type not in ("qwen2", "llama"):
        bad("model_type", f"must be 'qwen2' or 'llama', got {c.model_type!r}")
    if not c.rope_theta > 0:
        bad("rope_theta", f"must be positive, got {c.rope_theta!r}")


# Shapes as in each checkpoint's config.json, the source above each row (the 14B Instruct twin
# differs from its base only in max_position_embeddings; the 3B is read from the Omni model's text
# network, the same one). Each preset's parameter count matches its model card (tests/test_config.py).
_COLUMNS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)
_SHAPES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    # https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/config.json
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    # https://huggingface.co/Qwen/Qwen2.5-1.5B-Instruct/blob/main/config.json
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    # https://huggingface.co/Qwen/Qwen2.5-Omni-3B/blob/main/config.json (thinker_config.text_config)
    "qwen2.5-3b": (2048, 11008, 36, 16, 2, 151936, True),
    # https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
    # https://huggingface.co/Qwen/Qwen2.5-14B/blob/main/config.json
    "qwen2.5-14b": (5120, 13824, 48, 40, 8, 152064, False),
    # https://huggingface.co/Qwen/Qwen2.5-32B-Instruct/blob/main/config.json
    "qwen2.5-32b": (5120, 27648, 64, 40, 8, 152064, False),
    # https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/config.json
    "qwen2.5-72b": (8192, 29568, 80, 64, 8, 152064, False),
    # Not a checkpoint: the Qwen2.5 structure (GQA 2:1, q/k/v bias, tied head) at toy size, for tests.
    "tiny": (64, 128, 2, 4, 2, 151936, True),
}
PRESETS: dict[str, QwenConfig] = {
    name: QwenConfig(
        **dict(zip(_COLUMNS, shape)), rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=32768
    )
    for name, shape in _SHAPES.items()
}


def get_preset(name: str) -> QwenConfig:
    key = name.lower().removesuffix("-instruct")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[key]


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def from_hf_config(source: str | Path | dict[str, Any]) -> QwenConfig:
    """Read a Qwen2 (or Llama-architecture) `config.json`: a folder, the file, or its parsed dict.

    Errors name the file and the field.
    """
    if isinstance(source, dict):
        where, raw = "config", source
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        where = str(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such file; a checkpoint folder needs its config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")

    def bad(field_name: str, why: str):
        raise ConfigError(f"{where}: field '{field_name}' {why}")

    model_type = raw.get("model_type")
    if model_type not in ("qwen2", "llama"):
        bad("model_type", f"is {model_type!r}; qwenkit reads 'qwen2' (Qwen2, Qwen2.5) and 'llama' checkpoints")
    for name in _REQUIRED:
        if name not in raw:
            bad(name, "is missing")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        bad("hidden_act", f"is {act!r}; Qwen2.5's SwiGLU MLP uses 'silu'")
    if raw.get("use_sliding_window"):
        bad("use_sliding_window", "is true; sliding-window attention is not implemented (Qwen2.5 ships it off)")
    if raw.get("mlp_bias"):
        bad("mlp_bias", "is true; the Qwen2 MLP has no bias")
    if model_type == "llama" and raw.get("attention_bias"):
        bad("attention_bias", "is true; a Llama o_proj bias has no place in the Qwen2 network")

    rope_theta, rope_scaling = _read_rope(raw, bad)
    kwargs = {name: raw[name] for name in _REQUIRED}
    kwargs.update(
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        head_dim=raw.get("head_dim"),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=raw.get("tie_word_embeddings", model_type == "qwen2"),
        attention_bias=model_type == "qwen2",
        initializer_range=raw.get("initializer_range", 0.02),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        model_type=model_type,
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype") or "bfloat16",
    )
    # A head_dim equal to the default adds nothing; keeping None makes saved configs match the originals.
    if kwargs["head_dim"] == kwargs["hidden_size"] // max(kwargs["num_attention_heads"], 1):
        kwargs["head_dim"] = None
    try:
        return QwenConfig(**kwargs)
    except (ConfigError, TypeError) as e:  # TypeError: e.g. a string where a number belongs
        raise ConfigError(f"{where}: {e}") from None


def _read_rope(raw: dict[str, Any], bad) -> tuple[float, YarnScaling | None]:
    """rope_theta and YaRN from either layout: `rope_theta` + `rope_scaling` (checkpoints as
    published) or transformers 5's `rope_parameters`."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or params
    theta = raw.get("rope_theta", params.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        bad("rope_theta", f"must be a number, got {theta!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "yarn":
        bad("rope_scaling", f"has type {kind!r}; qwenkit implements 'yarn' (the Qwen2.5 long-context recipe)")
    if "factor" not in scaling:
        bad("rope_scaling.factor", "is missing")
    return float(theta), YarnScaling(
        factor=float(scaling["factor"]),
        original_max_position_embeddings=int(
            scaling.get("original_max_position_embeddings") or raw.get("max_position_embeddings", 32768)
        ),
        beta_fast=float(scaling.get("beta_fast") or 32.0),
        beta_slow=float(scaling.get("beta_slow") or 1.0),
        attention_factor=scaling.get("attention_factor"),
    )


__all__ = ["ConfigError", "PRESETS", "QwenConfig", "YarnScaling", "from_hf_config", "get_preset"]
