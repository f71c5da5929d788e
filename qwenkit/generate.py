"""Generation as plain functions over token ids: `sample`, `prefill`, `decode_step`, and
`generate`, which yields one token per row per step. No tokenizer here; text streaming lives a
layer up. Defaults come from the checkpoint's generation_config.json.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from qwenkit.model import KVCache, QwenForCausalLM


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    seed: int | None = None

    @classmethod
    def from_model(cls, model: QwenForCausalLM, **overrides) -> "SamplingParams":
        """The checkpoint's generation_config.json, then the caller's overrides (None: keep)."""
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        values = {k: v for k, v in model.generation_config.items() if k in known}
        values.update({k: v for k, v in overrides.items() if k in known and v is not None})
        eos = values.get("eos_token_id", model.config.eos_token_id)
        values["eos_token_id"] = tuple([eos] if isinstance(eos, int) else eos or ())
        params = cls(**values)
        if params.temperature <= 0:
            params.do_sample = False
        return params


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row from (B, vocab) logits."""
    if not p.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Drop a token once the tokens above it already hold top_p of the mass; the first always stays.
        drop = sorted_probs.cumsum(-1) - sorted_probs > p.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: divide positive logits of seen tokens, multiply negative."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(-1, seen)
    logits = logits.scatter(-1, seen, torch.where(picked > 0, picked / penalty, picked * penalty))
    return logits


@torch.inference_mode()
def prefill(model: QwenForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            cache: KVCache) -> torch.Tensor:
    """Run the prompt through the model, filling the cache; returns the last position's logits (B, vocab)."""
    return model(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]


@torch.inference_mode()
def decode_step(model: QwenForCausalLM, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per row (B,); returns the next logits (B, vocab)."""
    return model(tokens[:, None], cache=cache, logits_to_keep=1).logits[:, -1]


def generate(model: QwenForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             params: SamplingParams | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), until each row has met an eos or max_new_tokens.

    A row that has finished keeps yielding the pad id while the others go on.
    """
    p = params or SamplingParams.from_model(model)
    B, T = input_ids.shape
    if T + p.max_new_tokens > model.config.max_position_embeddings and model.config.rope_scaling is None:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({p.max_new_tokens}) exceed the context "
                         f"length ({model.config.max_position_embeddings})")
    generator = None
    if p.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(p.seed)
    pad = p.pad_token_id if p.pad_token_id is not None else (p.eos_token_id[0] if p.eos_token_id else 0)
    eos = torch.tensor(p.eos_token_id, dtype=torch.long, device=input_ids.device)
    cache = KVCache(model.config, B, T + p.max_new_tokens, dtype=model.dtype, device=input_ids.device)
    seen = input_ids.clone() if attention_mask is None else input_ids.masked_fill(attention_mask == 0, pad)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = prefill(model, input_ids, attention_mask, cache)
    for step in range(p.max_new_tokens):
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        token = sample(logits, p, generator).masked_fill(done, pad)
        yield token
        done |= torch.isin(token, eos)
        if done.all() or step == p.max_new_tokens - 1:
            return
        seen = torch.cat([seen, token[:, None]], dim=1)
        logits = decode_step(model, token, cache)


def generate_ids(model: QwenForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int | None = None, max_length: int | None = None, **kwargs) -> torch.Tensor:
    """The transformers-style call: returns (B, T + new) ids, the prompt then the generated tokens.

    `max_length` counts the prompt, as in transformers; `max_new_tokens` does not.
    """
    if max_new_tokens is None and max_length is not None:
        max_new_tokens = max(max_length - input_ids.shape[1], 0)
    params = SamplingParams.from_model(model, max_new_tokens=max_new_tokens, **kwargs)
    if params.max_new_tokens == 0:
        return input_ids
    new = list(generate(model, input_ids, attention_mask, params))
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
