"""Generation as plain functions over token ids: `sample`, `prefill`, `decode_step`, and
`generate`, which yields one token per row per step. No tokenizer here; text streaming lives a
layer up. Defaults come from the checkpoint's generation_config.json.

The engine knows no model class: it drives a causal LM through `model(...)` and takes each
generation's decoding step from `model.decoder(cache)`, the one seam where speed is applied
(qwenkit.cpu.accelerate puts native decoding there). So qwenkit.model can offer `model.generate`
on top of this module without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from qwenkit.cache import KVCache
from qwenkit.errors import ContextLengthError, UserError

if TYPE_CHECKING:
    from qwenkit.model import QwenForCausalLM


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # on prompt and output tokens, as transformers
    presence_penalty: float = 0.0  # on output tokens, as OpenAI and vLLM
    frequency_penalty: float = 0.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    seed: int | None = None

    @classmethod
    def from_model(cls, model: QwenForCausalLM, **overrides) -> SamplingParams:
        """The checkpoint's generation_config.json, then the caller's overrides (None: keep).

        The temperature rule, for every caller (CLI, server, applications): a temperature given
        without `do_sample` turns sampling on when it is above 0, and a temperature of 0 (or a
        checkpoint's) is always greedy. A negative one is a UserError.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        given = {k: v for k, v in overrides.items() if v is not None}
        temperature = given.get("temperature")
        if temperature is not None:
            if temperature < 0:
                raise UserError(f"temperature must be >= 0, got {temperature}")
            given.setdefault("do_sample", temperature > 0)
        values = {k: v for k, v in model.generation_config.items() if k in known}
        values.update(given)
        eos = values.get("eos_token_id", model.config.eos_token_id)
        values["eos_token_id"] = tuple([eos] if isinstance(eos, int) else eos or ())
        params = cls(**values)
        if params.temperature <= 0:
            params.do_sample = False
        return params


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row from (B, vocab) logits."""
    if not p.do_sample:
        return greedy(logits)
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


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax(-1) of (B, vocab) logits, the first maximum where several tie, as torch.argmax.

    torch's argmax over a 152k vocabulary runs on one core, and bf16 logits would first be copied
    to fp32: so the maxima of 64 blocks are taken in the logits' own dtype (vectorized, threaded),
    then the argmax within the first block that holds the row's maximum; the index is the same.
    """
    B, V = logits.shape
    if V % 64:
        return logits.argmax(-1)
    blocks = logits.reshape(B, 64, V // 64)
    first = blocks.amax(-1).float().argmax(-1)  # (B,): the first block holding the maximum (or a NaN)
    return first * (V // 64) + blocks[torch.arange(B, device=logits.device), first].float().argmax(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: divide positive logits of seen tokens, multiply negative."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(-1, seen)
    return logits.scatter(-1, seen, torch.where(picked > 0, picked / penalty, picked * penalty))


def apply_output_penalties(logits: torch.Tensor, counts: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the tokens generated so far; counts (B, vocab)."""
    return logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)


def context_length(config) -> int:
    """How many positions the model serves: YaRN stretches the original window by its factor."""
    if config.rope_scaling is not None:
        s = config.rope_scaling
        return max(config.max_position_embeddings, int(s.original_max_position_embeddings * s.factor))
    return config.max_position_embeddings


def check_fits(n_tokens: int, limit: int) -> None:
    """The one context rule: a prompt of `n_tokens` must leave room for at least one new token in a
    context of `limit` positions (the model's `context_length`, or a server's smaller window)."""
    if n_tokens >= limit:
        raise ContextLengthError(
            f"the prompt has {n_tokens} tokens; the model's context holds {limit}, "
            f"so no token can be generated. Shorten the prompt."
        )


@torch.inference_mode()
def prefill(
    model: QwenForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache
) -> torch.Tensor:
    """Run the prompt through the model, filling the cache; returns the last position's logits (B, vocab)."""
    return model(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]


@torch.inference_mode()
def decode_step(
    model: QwenForCausalLM, tokens: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Feed one token per row (B,); returns the next logits (B, vocab). A row whose `attention_mask`
    (B,) is 0 stays where it is (a free row of a server's cache)."""
    mask = None if attention_mask is None else attention_mask[:, None]
    return model(tokens[:, None], attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]


def generate(
    model: QwenForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    stop_rows: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), until each row has finished.

    A row finishes on an eos id, after max_new_tokens, at the context length, or when `stop_rows`
    (called with each step's tokens) marks it: the hook for stop strings, which need text. A
    finished row yields the pad id while the others go on.
    """
    p = params or SamplingParams.from_model(model)
    B, T = input_ids.shape
    limit = context_length(model.config)
    check_fits(T, limit)
    max_new = min(p.max_new_tokens, limit - T)
    generator = None
    if p.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(p.seed)
    pad = p.pad_token_id if p.pad_token_id is not None else (p.eos_token_id[0] if p.eos_token_id else 0)
    eos = torch.tensor(p.eos_token_id, dtype=torch.long, device=input_ids.device)
    cache = KVCache(model.config, B, T + max_new, dtype=model.dtype, device=input_ids.device)
    seen = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, pad)
    counts = None
    if p.presence_penalty or p.frequency_penalty:
        counts = torch.zeros(B, model.config.vocab_size, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = prefill(model, input_ids, attention_mask, cache)
    decode = model.decoder(cache)  # this generation's step: the plain model's, or an accelerator's
    for step in range(max_new):
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        if counts is not None:
            logits = apply_output_penalties(logits.float(), counts, p)
        token = sample(logits, p, generator).masked_fill(done, pad)
        yield token
        done |= torch.isin(token, eos)
        if stop_rows is not None and (stopped := stop_rows(token)) is not None:
            done |= stopped
        if done.all() or step == max_new - 1:
            return
        if p.repetition_penalty != 1.0:
            seen = torch.cat([seen, token[:, None]], dim=1)
        if counts is not None:
            counts[torch.arange(B), token] += (~done).float()
        logits = decode(token)


def generate_ids(
    model: QwenForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    **kwargs,
) -> torch.Tensor:
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
