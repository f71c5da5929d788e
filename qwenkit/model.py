"""The Qwen2.5 network, natively in PyTorch.

Decoder-only: token embeddings, then blocks of RMSNorm -> grouped-query attention (q/k/v bias,
rotary positions in the rotate-half layout, optional YaRN) -> RMSNorm -> SwiGLU MLP, each with a
residual, then a final RMSNorm and the LM head (tied to the embeddings in the small sizes).

Parameter names are Hugging Face's, so a checkpoint loads with no key map and saves back the same.
Shapes: B batch, T new tokens, S key slots, H query heads, K kv heads, D head dim, C hidden size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwenkit import kernels, native
from qwenkit.config import QwenConfig

IGNORE_INDEX = -100


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that a product with a few rows (decoding) streams the weight on every core.

    Decoding reads every weight once per token, so it is bound by memory bandwidth. A single-row
    matmul on CPU runs on one core at about half of it. Inference (no autograd) with few rows goes
    to the native kernel (qwenkit.kernels.gemv); where that is unavailable, the weight's rows are
    viewed as one block per thread (a view, no copy) and multiplied as one batched matmul that the
    threads share. Training and larger products keep F.linear.
    """
    if x.device.type != "cpu" or torch.is_grad_enabled() or x.numel() > _FEW_ROWS * weight.shape[1]:
        return F.linear(x, weight, bias)
    y = kernels.gemv(x, weight, bias)
    if y is not None:
        return y
    parts = torch.get_num_threads()
    out, inp = weight.shape
    if parts < 2 or out % parts or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    rows = x.reshape(1, -1, inp).expand(parts, -1, -1)  # (P, N, in)
    blocks = weight.view(parts, out // parts, inp).transpose(1, 2)  # (P, in, out/P)
    y = torch.bmm(rows, blocks).transpose(0, 1).reshape(*x.shape[:-1], out)  # (..., out)
    return y if bias is None else y + bias


_FEW_ROWS = kernels.MAX_ROWS  # up to here streaming the weight beats a matmul (benchmarks/bench_generate.py)


class Linear(nn.Linear):
    """nn.Linear computed by `linear`: same parameters and names, decoding on every core."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and not torch.is_grad_enabled() and x.numel() <= _FEW_ROWS * x.shape[-1]:  # decoding
            y = kernels.rms_norm(x, self.weight, self.eps)
            if y is not None:
                return y
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
        device = device or self.inv_freq.device
        if device == torch.device("meta"):
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


def _yarn_inv_freq(inv_freq: torch.Tensor, base: float, dim: int, s) -> torch.Tensor:
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


class KVCache:
    """A static, preallocated key/value cache for every layer, with a fill length per row.

    Row b's tokens occupy its slots 0..lengths[b]-1; `valid` marks the slots that hold real tokens
    (left padding does not), and a row's rotary positions count only its valid slots. Rows move
    on their own: a row can be reset and refilled (through `rows`) while the others decode, and a
    step whose mask is all zeros for a row leaves that row where it was.
    """

    def __init__(
        self,
        config: QwenConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, config.num_key_value_heads, max_len, config.dim_per_head)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.max_len = max_len
        self._pointers: tuple[int, ...] | None = None
        self._stacks: dict = {}  # the native decoders checked for this cache (qwenkit.native)

    def data_pointers(self) -> tuple[int, ...]:
        """The addresses of every layer's key and value storage (what the native decoder writes)."""
        if self._pointers is None:
            self._pointers = tuple(t.data_ptr() for t in (*self.k, *self.v))
        return self._pointers

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows start:stop that shares this one's storage (views, no copy)."""
        view = KVCache.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.valid, view.lengths, view.max_len = self.valid[start:stop], self.lengths[start:stop], self.max_len
        view._pointers, view._stacks = None, self._stacks
        return view

    def reset(self) -> None:
        self.valid.zero_()
        self.lengths.zero_()


def cache_slots(cache: KVCache, T: int) -> torch.Tensor:
    """(B, T) slots of T new tokens: each row continues from its own length."""
    return cache.lengths[:, None] + torch.arange(T, device=cache.lengths.device)


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention for one new token per row (decoding), in fp32 matmuls; q (B, H, 1, D), k/v (B, K, S, D).

    The heads that share a kv head become the rows of one matmul against it, so kv is never repeated.
    For bf16 on CPU this takes about a third of SDPA's time (its flash kernel's fixed cost dominates
    a single query), and it accumulates in fp32 as SDPA does.
    """
    B, H, _, D = q.shape
    K, S = k.shape[1], k.shape[2]
    scores = q.reshape(B, K, H // K, D).float() @ k.float().transpose(-1, -2) * D**-0.5  # (B, K, H/K, S)
    scores = scores.masked_fill(~mask.reshape(B, 1, 1, S), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v.float()  # (B, K, H/K, D)
    return y.reshape(B, H, 1, D).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        C, H, K, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.dim_per_head
        self.n_heads, self.n_kv, self.head_dim, self.layer_idx = H, K, D, layer_idx
        self.q_proj = Linear(C, H * D, bias=config.attention_bias)
        self.k_proj = Linear(C, K * D, bias=config.attention_bias)
        self.v_proj = Linear(C, K * D, bias=config.attention_bias)
        self.o_proj = Linear(H * D, C, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, H*D), (B, T, K*D), (B, T, K*D)
        if cache is not None and T == 1 and not torch.is_grad_enabled():  # decoding: one native call
            i = self.layer_idx
            y = kernels.decode_attention(q, k, v, cos, sin, cache.k[i], cache.v[i], cache.lengths, cache.valid)
            if y is not None:
                return self.o_proj(y)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            end = mask.shape[-1]  # slots in use: up to the longest row's new end
            # Indexed assignment writes only the new slots; scatter_ with an expanded index costs
            # time in proportion to the whole cache (11 ms a layer at 32k slots, against 6 us).
            rows, slots = torch.arange(B, device=x.device)[:, None], cache_slots(cache, T)  # (B, 1), (B, T)
            cache.k[self.layer_idx][rows, :, slots] = k.transpose(1, 2)  # indexed view (B, T, K, D)
            cache.v[self.layer_idx][rows, :, slots] = v.transpose(1, 2)
            k, v = cache.k[self.layer_idx][:, :, :end], cache.v[self.layer_idx][:, :, :end]  # (B, K, S, D)
        if T == 1 and q.device.type == "cpu" and q.dtype != torch.float32:
            y = attend_one_query(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: QwenConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, blocks and the final norm: HF's `model.` prefix."""

    def __init__(self, config: QwenConfig):
        super().__init__()
        # nn.Embedding's own N(0, 1) init is the one op of the model that PyTorch's meta device runs
        # in Python: on first use it imports ~830 modules (73 MiB, 1.3 s) for a tensor that a load
        # or init_weights overwrites. Given its weight, the module skips it.
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
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config: dict = {}  # from the checkpoint's generation_config.json
        self.gradient_checkpointing = False  # recompute each block's activations in backward

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

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
        return self.lm_head(x) if self.lm_head is not None else linear(x, self.output_weight())

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor:
        """The final-normed hidden states (B, T, C), before the LM head: what a chunked loss needs."""
        make_mask, position_ids = self._mask_and_positions(input_ids, attention_mask, position_ids, cache)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        # The native decoder ends with the final norm (None: the blocks run here, one by one)
        y = self._decode_natively(x, cos, sin, cache) if cache is not None and input_ids.shape[1] == 1 else None
        if y is None:
            mask = make_mask()
            for block in self.model.layers:
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
                else:
                    x = block(x, cos, sin, mask, cache)
            x = self.model.norm(x)
        if cache is not None:  # a row with no real token this step stays put
            cache.lengths += (
                input_ids.shape[1] if attention_mask is None else input_ids.shape[1] * attention_mask.any(-1)
            )
        return x if y is None else y

    def _decode_natively(self, x, cos, sin, cache: KVCache) -> torch.Tensor | None:
        """Every block of a decoding step and the final norm in one native call, or None (qwenkit.native)."""
        return native.decode_step(self, x, cos, sin, cache)

    def _apply(self, *args, **kwargs):
        """Moving or retyping the model (to, float, bfloat16...) swaps its tensors' storage."""
        native.structure_changed()
        return super()._apply(*args, **kwargs)

    def _mask_and_positions(self, input_ids, attention_mask, position_ids, cache):
        """(B, T) rotary positions, and a function that builds the boolean (B, 1, T, S) mask, True
        where a query may attend: the native decoder needs no mask, and its dozen small ops cost
        ~0.15 ms per step once decoding has flushed the CPU's caches. Writes the new tokens' valid
        flags into the cache."""
        B, T = input_ids.shape
        device = input_ids.device
        real = None if attention_mask is None else attention_mask.bool()  # None: every token is real
        packed = position_ids is not None and cache is None
        if cache is not None:
            q_slot = cache.lengths[:, None] if T == 1 else cache_slots(cache, T)  # (B, T): where each new token goes
            end = int(cache.lengths.max()) + T
            if end > cache.max_len:
                raise ValueError(f"the KV cache holds {cache.max_len} tokens per row; {end} do not fit")
            before = cache.valid.sum(-1, keepdim=True)  # (B, 1): real tokens already cached
            cache.valid.scatter_(1, q_slot, True if real is None else real)
            keys_real = cache.valid[:, :end]  # (B, S)
        else:
            q_slot = torch.arange(T, device=device).expand(B, T)
            end, before = T, 0
            keys_real = torch.ones(B, T, dtype=torch.bool, device=device) if real is None else real
        if position_ids is None and real is None and T == 1 and cache is not None:
            position_ids = before  # decoding: the new token follows the row's real tokens
        elif position_ids is None:
            # Each row counts its own real tokens, so left padding does not shift positions.
            counted = torch.arange(1, T + 1, device=device) if real is None else real.long().cumsum(-1)
            position_ids = (before + counted - 1).clamp(min=0).expand(B, T)

        def make_mask() -> torch.Tensor:
            k_slot = torch.arange(end, device=device)
            mask = (k_slot <= q_slot[..., None]) & keys_real[:, None, :]  # (B, T, S)
            if packed:
                # Packed samples: a sample starts where the position resets to 0.
                sample = (position_ids == 0).cumsum(-1)  # (B, T)
                mask = mask & (sample[:, :, None] == sample[:, None, :])
            # A query always sees itself, so padding queries never meet an all-masked row (NaN in SDPA).
            mask = mask | (k_slot == q_slot[..., None])
            return mask[:, None]

        return make_mask, position_ids

    def save_pretrained(self, out_dir, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> None:
        """Write a Hugging Face checkpoint folder that transformers loads unchanged."""
        from qwenkit.checkpoint import save_model

        save_model(self, out_dir, max_shard_size=max_shard_size, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> QwenForCausalLM:
        from qwenkit.checkpoint import load_model

        return load_model(path, dtype=dtype, device=device)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """HF-style generation: returns the prompt followed by the new tokens. See qwenkit.generate."""
        from qwenkit.generate import generate_ids

        return generate_ids(self, input_ids, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over the labels that are not -100; computed in fp32."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): position t predicts t+1
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
    )
