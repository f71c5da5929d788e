"""What the task modules share: loading, batched chat generation with a progress bar, the
log-likelihood of a continuation under the chat template, cleaning of chatty replies, JSONL files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from qwenkit.generate import SamplingParams
from qwenkit.model import QwenForCausalLM
from qwenkit.text import Completion, complete
from qwenkit.tokenizer import Tokenizer

Messages = list[dict[str, Any]]


def sampling(
    model: QwenForCausalLM,
    max_new_tokens: int,
    temperature: float | None = None,
    seed: int | None = None,
    greedy: bool = True,
) -> SamplingParams:
    """The checkpoint's generation defaults, greedy unless asked otherwise: answers to translate, QA and
    code tasks are scored against references, and greedy decoding is how they are evaluated."""
    overrides: dict[str, Any] = {"max_new_tokens": max_new_tokens, "seed": seed}
    if temperature is not None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        overrides.update(temperature=temperature, do_sample=temperature > 0)
    elif greedy:
        overrides["do_sample"] = False
    return SamplingParams.from_model(model, **overrides)


def chat(
    model: QwenForCausalLM,
    tok: Tokenizer,
    conversations: Sequence[Messages],
    params: SamplingParams,
    batch_size: int = 8,
    stop: Sequence[str] = (),
    desc: str | None = None,
) -> list[Completion]:
    """Complete many conversations, `batch_size` at a time, with a progress bar when `desc` is given."""
    from tqdm import tqdm

    out: list[Completion] = []
    with tqdm(total=len(conversations), desc=desc, unit="prompt", disable=desc is None or not conversations) as bar:
        for start in range(0, len(conversations), batch_size):
            batch = conversations[start : start + batch_size]
            out += complete(model, tok, batch, params, stop=stop)
            bar.update(len(batch))
    return out


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
    (batch, length, vocab) of a full forward.
    """
    if len(prefixes) != len(continuations):
        raise ValueError("one continuation per prefix")
    head: Callable = model.logits
    scores: list[float] = []
    for start in range(0, len(prefixes), batch_size):
        rows = [
            (list(p), list(c))
            for p, c in zip(prefixes[start : start + batch_size], continuations[start : start + batch_size])
        ]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, c) in enumerate(rows):
            if not p:
                raise ValueError("a continuation needs a non-empty prefix to be predicted from")
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
        hidden = model.hidden_states(ids.to(model.device), mask.to(model.device))  # (B, T, C)
        for i, (p, c) in enumerate(rows):
            if not c:
                scores.append(0.0)
                continue
            # Position t predicts token t+1: the continuation's tokens are predicted from len(p)-1 on.
            logits = head(hidden[i, len(p) - 1 : len(p) + len(c) - 1]).float()  # (len(c), vocab)
            targets = torch.tensor(c, device=logits.device)
            scores.append(logits.log_softmax(-1).gather(-1, targets[:, None]).sum().item())
    return scores


def defuse(tok: Tokenizer, text: str) -> str:
    """Untrusted text (documents, rows of a data file) without the special tokens' spellings, so that
    a document holding `<|im_end|>` cannot close its turn and forge another when the rendered prompt
    is tokenized."""
    for special in tok.all_special_tokens:
        text = text.replace(special, "")
    return text


_PREAMBLE = re.compile(
    r"^\s*(sure|certainly|of course|okay|ok|absolutely|here('s| is| are)|below is|the (following|translation)"
    r"|translation|translated)\b",
    re.IGNORECASE,
)


def strip_preamble(reply: str) -> str:
    """A reply without the chatty lead-in models put before the content ("Sure! Here's the ...:")."""
    lines = reply.strip().splitlines()
    while len(lines) > 1 and (
        not lines[0].strip()
        or (_PREAMBLE.match(lines[0]) and lines[0].rstrip().endswith(":"))
        or re.fullmatch(r"\s*(sure|certainly|of course|okay)[!.,]?\s*", lines[0], re.I)
    ):
        lines.pop(0)
    return "\n".join(lines).strip()


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSONL file; a bad line raises ValueError naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
