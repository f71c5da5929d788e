"""Text in, text out, one layer above the engine.

Prompts (plain text or chat messages) go through the tokenizer and its chat template; the
engine's tokens come back as text through the streaming detokenizer, row by row, with stop
strings that may span tokens. The CLI and the server build on `TextStream` and `complete`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qwenkit.generate import SamplingParams, generate
from qwenkit.model import QwenForCausalLM
from qwenkit.tokenizer import StreamDecoder, Tokenizer

Prompt = str | Sequence[dict[str, Any]]  # plain text, or chat messages


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos or a stop string) or "length"
    prompt_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class StopMatcher:
    """Finds stop strings in streamed text. It holds back only a tail that could still grow into a
    stop string, so a stop split across tokens is caught and never shown."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.buffer = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to show, whether a stop string was hit)."""
        self.buffer += delta
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        hold = next(
            (
                k
                for k in range(min(len(self.buffer), max(map(len, self.stops), default=1) - 1), 0, -1)
                if any(s.startswith(self.buffer[-k:]) for s in self.stops)
            ),
            0,
        )
        out, self.buffer = self.buffer[: len(self.buffer) - hold], self.buffer[len(self.buffer) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def encode_prompt(tok: Tokenizer, prompt: Prompt, chat: bool = True, system: str | None = None) -> list[int]:
    """Token ids of one prompt: chat messages (or a string as one user turn) through the chat
    template with the generation prompt, or with `chat=False` the plain text."""
    if isinstance(prompt, str) and not chat:
        return tok.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return tok.apply_chat_template(messages, add_generation_prompt=True)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left so that every row ends at the last column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


class TextStream:
    """Generate for a batch of token-id prompts; iterate for each step's text deltas, one per row.

    After the loop, `completions` holds each row's text, ids and finish reason.
    """

    def __init__(
        self,
        model: QwenForCausalLM,
        tok: Tokenizer,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        stop: Sequence[str] = (),
    ):
        self.model, self.tok, self.params = model, tok, params
        self.prompts = [list(p) for p in prompts]
        self.stop = list(stop)
        self.completions = [Completion(prompt_tokens=len(p)) for p in self.prompts]

    def __iter__(self) -> Iterator[list[str]]:
        B = len(self.prompts)
        pad = self.params.pad_token_id if self.params.pad_token_id is not None else (self.tok.pad_token_id or 0)
        ids, mask = left_pad(self.prompts, pad)
        decoders = [StreamDecoder(self.tok) for _ in range(B)]
        matchers = [StopMatcher(self.stop) for _ in range(B)]
        eos = set(self.params.eos_token_id)
        stopped = torch.zeros(B, dtype=torch.bool)
        rows = range(B)

        def stop_rows(_tokens):
            return stopped.clone()

        for tokens in generate(
            self.model, ids.to(self.model.device), mask.to(self.model.device), self.params, stop_rows
        ):
            deltas = [""] * B
            for i, token in zip(rows, tokens.tolist()):
                c = self.completions[i]
                if c.finish_reason is not None:
                    continue
                if token in eos:
                    c.finish_reason = "stop"
                    deltas[i], _ = matchers[i].feed(decoders[i].flush())
                    deltas[i] += matchers[i].flush()
                    continue
                c.token_ids.append(token)
                deltas[i], hit = matchers[i].feed(decoders[i].push(token))
                if hit:
                    c.finish_reason = "stop"
                    stopped[i] = True
            for i, d in enumerate(deltas):
                self.completions[i].text += d
            yield deltas
        # Rows that ran out of tokens: whatever the decoder and the stop matcher still hold.
        tail = [""] * B
        for i, c in enumerate(self.completions):
            if c.finish_reason is None:
                c.finish_reason = "length"
                out, hit = matchers[i].feed(decoders[i].flush())
                tail[i] = out if hit else out + matchers[i].flush()
                c.text += tail[i]
        if any(tail):
            yield tail


def stream_text(
    model: QwenForCausalLM, tok: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams, stop: Sequence[str] = ()
) -> Iterator[str]:
    """Text deltas of one prompt's completion, as they are generated."""
    for deltas in TextStream(model, tok, [prompt_ids], params, stop):
        if deltas[0]:
            yield deltas[0]


def complete(
    model: QwenForCausalLM,
    tok: Tokenizer,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    stop: Sequence[str] = (),
    chat: bool = True,
    system: str | None = None,
) -> list[Completion]:
    """Complete a batch of prompts together (left-padded); greedy rows equal their unbatched runs."""
    stream = TextStream(model, tok, [encode_prompt(tok, p, chat, system) for p in prompts], params, stop)
    for _ in stream:
        pass
    return stream.completions
