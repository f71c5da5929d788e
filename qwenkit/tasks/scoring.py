"""Log-likelihood scoring of answers under the chat template: what sentiment classifies by and what
write's reference perplexity measures. The answer's tokens come from the template's own rendering,
and the logits from the model's own LM head (`model.logits`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwenkit.generate import check_fits, context_length
from qwenkit.model import QwenForCausalLM
from qwenkit.tasks.base import Messages
from qwenkit.tokenizer import Tokenizer


def answer_ids(tok: Tokenizer, messages: Messages, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) where the prompt is the conversation with the generation prompt and
    the answer is what the chat template puts after it for an assistant turn holding `answer`: the
    text and the token that ends the turn (`<|im_end|>` for ChatML). Both come from one rendering, so
    the answer's tokens are exactly those the model would have to produce."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the answer's prefix differently from the generation prompt")
    tail = full[len(prompt) :].rstrip()  # the template's newline after the end-of-turn token is no answer
    prompt_ids, full_ids = tok.encode(prompt), tok.encode(prompt + tail)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids) :]
    return prompt_ids, tok.encode(tail)  # a BPE merge across the boundary (not with ChatML): encode apart


@torch.inference_mode()
def continuation_logprobs(
    model: QwenForCausalLM,
    prefixes: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 8,
    pad_id: int = 0,
) -> list[float]:
    """log p(continuation | prefix), summed over the continuation's tokens, for each pair.

    Rows are right-padded into batches; the LM head runs only on the positions that predict a
    continuation token, one row at a time, so a long reference costs (tokens, vocab), not the
    (batch, length, vocab) of a full forward. A pair must fit the model's context as a prompt does:
    the prefix and all but the last continuation token are fed, and predict one token more.
    """
    if len(prefixes) != len(continuations):
        raise ValueError("one continuation per prefix")
    limit = context_length(model.config)
    scores: list[float] = []
    for start in range(0, len(prefixes), batch_size):
        rows = [
            (list(p), list(c))
            for p, c in zip(prefixes[start : start + batch_size], continuations[start : start + batch_size])
        ]
        # The last continuation token is predicted, never fed: each row's input is prefix + c[:-1].
        inputs = [p + c[:-1] for p, c in rows]
        for (p, _), row in zip(rows, inputs):
            if not p:
                raise ValueError("a continuation needs a non-empty prefix to be predicted from")
            check_fits(len(row), limit)
        width = max(len(row) for row in inputs)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for i, row in enumerate(inputs):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        hidden = model.hidden_states(ids.to(model.device), mask.to(model.device))  # (B, T, C)
        for i, (p, c) in enumerate(rows):
            if not c:
                scores.append(0.0)
                continue
            # Position t predicts token t+1: the continuation's tokens are predicted from len(p)-1 on.
            logits = model.logits(hidden[i, len(p) - 1 : len(p) + len(c) - 1]).float()  # (len(c), vocab)
            targets = torch.tensor(c, device=logits.device)  # (len(c),)
            scores.append(logits.log_softmax(-1).gather(-1, targets[:, None]).sum().item())
    return scores
