"""The Qwen2.5 network, natively in PyTorch.

Decoder-only: token embeddings, then blocks of RMSNorm -> grouped-query attention (q/k/v bias,
rotary positions in the rotate-half layout, optional YaRN) -> RMSNorm -> SwiGLU MLP, each with a
residual, then a final RMSNorm and the LM head (tied to the embeddings in the small sizes).

Parameter names are Hugging Face's, so a checkpoint loads with no key map and saves back the same.
This file is the reference: plain PyTorch, one attention path through SDPA. Speed is applied from
outside (qwenkit.cpu.accelerate swaps in streaming modules and a native decoding step), and the
tests hold those paths equal to this one.
Shapes: B batch, T new tokens, S key slots, H query heads, K kv heads, D head dim, C hidden size.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpoint_activations

from qwenkit import checkpoint, generate
from qwenkit.cache import KVCache
from qwenkit.config import QwenConfig, YarnScaling, from_hf_config

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32, scale in the input dtype: the order the reference uses, so bf16 matches.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for explicit positions; YaRN rescales the frequencies and the magnitude."""

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.dim_per_head // 2), persistent=False)
        self.mscale = config.rope_scaling.mscale if config.rope_scaling else 1.0
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute inv_freq; needed after building on the meta device."""
        c, dim = self.config, self.config.dim_per_head
        device = torch.device(device) if device is not None else self.inv_freq.device
        if device.type == "meta":
            return
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
        inv_freq = 1.0 / (c.rope_theta**exponents)  # (D/2,)
        if c.rope_scaling is not None:
            inv_freq = _yarn_inv_freq(inv_freq, c.rope_theta, dim, c.rope_scaling)
        self.inv_freq = inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return (emb.cos() * self.mscale).to(dtype), (emb.sin() * self.mscale).to(dtype)


def _yarn_inv_freq(inv_freq: torch.Tensor, base: float, dim: int, s: YarnScaling) -> torch.Tensor:
    """YaRN (arXiv:2309.00071): interpolate low frequencies by `factor`, keep high ones, ramp between."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / max(high - low, 1e-3)
    keep = 1 - ramp.clamp(0, 1)  # 1: extrapolate (high frequency), 0: interpolate
    return inv_freq / s.factor * (1 - keep) + inv_freq * keep


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, D); cos, sin (B, T, D)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        C, H, K, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.dim_per_head
        self.n_heads, self.n_kv, self.head_dim, self.layer_idx = H, K, D, layer_idx
        self.q_proj = nn.Linear(C, H * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(C, K * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(C, K * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, slots=None) -> torch.Tensor:
        """x (B, T, C); mask (B, 1, T, S), True where a query may attend; with a cache, the new keys
        and values go to `slots` (B, T) of this layer's rows, and the queries attend to slots :S."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k_cache, v_cache = cache.k[self.layer_idx], cache.v[self.layer_idx]  # (B, K, max_len, D)
            # Indexed assignment writes only the new slots; scatter_ with an expanded index would
            # cost time in proportion to the whole cache.
            rows = torch.arange(B, device=x.device)[:, None]  # (B, 1)
            k_cache[rows, :, slots] = k.transpose(1, 2)  # indexed view (B, T, K, D)
            v_cache[rows, :, slots] = v.transpose(1, 2)
            S = mask.shape[-1]
            k, v = k_cache[:, :, :S], v_cache[:, :, :S]  # (B, K, S, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, slots=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, blocks and the final norm: HF's `model.` prefix."""

    def __init__(self, config: QwenConfig):
        super().__init__()
        # nn.Embedding's own N(0, 1) init is the one op of the model that PyTorch's meta device runs
        # in Python, importing torch's compiler stack for a tensor that a load or init_weights
        # overwrites. Given its weight, the module skips it.
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, vocab); only the last `logits_to_keep` positions when that is set
    loss: torch.Tensor | None = None


class QwenForCausalLM(nn.Module):
    """The Qwen2.5 causal language model. Build on the meta device and load to avoid a second copy."""

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.generation_config: dict = {}  # from the checkpoint's generation_config.json
        self.gradient_checkpointing = False  # recompute each block's activations in backward

    # The final norm's weight, not the embedding's: an embedding in a GGUF block format has no
    # float weight (qwenkit.quant), and the norm is in the activations' dtype either way.
    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> QwenForCausalLM:
        """Initialize for training from scratch: N(0, initializer_range) weights, zero biases, unit norms."""
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        self.model.rotary_emb.reset_buffers()
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Args:
        input_ids: (B, T) token ids.
        attention_mask: (B, T), 1 for real tokens and 0 for padding (left or right).
        labels: (B, T) targets, aligned with input_ids (the shift happens here); -100 is ignored.
        position_ids: (B, T) explicit positions. Without a cache, a position that restarts at 0
            starts a new packed sample, and tokens never attend across samples.
        cache: a KVCache to read and extend (generation); its length advances by T.
        logits_to_keep: compute logits for the last N positions only (0: all).
        """
        x = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.logits(x)  # (B, T, vocab)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head over final hidden states (..., C) -> (..., vocab)."""
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.output_weight())

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor:
        """The final-normed hidden states (B, T, C), before the LM head: what a chunked loss needs.
        With a cache, the new tokens first take the next slots of their rows (cache.extend), and
        each block writes their keys and values there."""
        B, T = input_ids.shape
        real = None if attention_mask is None else attention_mask.bool()  # (B, T); None: every token is real
        if cache is not None:
            slots, rope_positions = cache.extend(T, real)  # (B, T) each
            keys_real = cache.valid[:, : int(slots.max()) + 1]  # (B, S): S, the longest row's new end
        else:  # the queries are the keys, slots 0..T-1
            slots = torch.arange(T, device=input_ids.device).expand(B, T)
            rope_positions = slots if real is None else (real.long().cumsum(-1) - 1).clamp(min=0)
            keys_real = torch.ones_like(slots, dtype=torch.bool) if real is None else real
        # Explicit positions without a cache are packed samples: each restart at 0 begins a new one.
        samples = position_ids if cache is None else None
        if position_ids is not None:
            rope_positions = position_ids
        mask = attention_mask_for(slots, keys_real, samples)  # (B, 1, T, S)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.model.rotary_emb(rope_positions, x.dtype)  # (B, T, D) each
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint_activations(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, slots)
        return self.model.norm(x)

    def decoder(self, cache: KVCache) -> Callable[..., torch.Tensor]:
        """The decoding step of one generation over `cache`: tokens (B,) [, attention_mask (B,)] ->
        next logits (B, vocab). This is the plain model's; qwenkit.cpu.accelerate retypes a model
        as a subclass whose decoder is native."""
        return functools.partial(generate.decode_step, self, cache=cache)

    def save_pretrained(self, out_dir, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> None:
        """Write a Hugging Face checkpoint folder that transformers loads unchanged."""
        if getattr(self, "quantized", False):
            raise ValueError(
                "this model is quantized for inference (GGUF blocks); save the original (unquantized) model, "
                "or write a GGUF with `qwenkit quantize`"
            )
        state = {name: p.detach() for name, p in self.named_parameters()}  # tied: no lm_head.weight
        generation_config = self.generation_config or checkpoint.default_generation_config(self.config)
        checkpoint.write_checkpoint(state, self.config, generation_config, out_dir, max_shard_size, dtype)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> QwenForCausalLM:
        return load_model(path, dtype=dtype, device=device)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """HF-style generation: returns the prompt followed by the new tokens. See qwenkit.generate."""
        return generate.generate_ids(self, input_ids, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def attention_mask_for(q_slots: torch.Tensor, keys_real: torch.Tensor, positions: torch.Tensor | None = None):
    """The boolean (B, 1, T, S) mask, True where a query may attend: keys at or before the query's
    slot (B, T) that hold real tokens (B, S). With `positions` (packed samples), a sample starts
    where the position resets to 0, and no query attends across samples."""
    k_slot = torch.arange(keys_real.shape[-1], device=keys_real.device)
    mask = (k_slot <= q_slots[..., None]) & keys_real[:, None, :]  # (B, T, S)
    if positions is not None:
        sample = (positions == 0).cumsum(-1)  # (B, T)
        mask = mask & (sample[:, :, None] == sample[:, None, :])
    # A query always sees itself, so padding queries never meet an all-masked row (NaN in SDPA).
    return (mask | (k_slot == q_slots[..., None]))[:, None]


def load_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> QwenForCausalLM:
    """Load a Hugging Face checkpoint folder into a QwenForCausalLM, the plain reference model.
    (`qwenkit.load_model` also applies the device's fast paths.)

    Args:
        path: a folder with config.json and model.safetensors (or shards and their index); a hub
            id where a hub is reachable.
        dtype: the weights' dtype in memory; default float32 on CPU and bfloat16 elsewhere (never
            float16, which overflows on these weights).
        device: where the weights go.
    """
    folder = checkpoint.resolve_model_path(path)
    config = from_hf_config(folder / "config.json")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with torch.device("meta"):  # no storage yet: each tensor is read straight into its final place
        model = QwenForCausalLM(config)
    checkpoint.load_weights(model, folder, dtype=dtype, device=device)
    model.model.rotary_emb.reset_buffers(device)
    model.generation_config = checkpoint.read_generation_config(folder)
    return model.eval()


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels aligned with the inputs -> (B, T) targets: position t predicts token t + 1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over the labels that are not -100; computed in fp32."""
    targets = shift_labels(labels)  # (B, T)
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
    )
