"""Text in, text out, one layer above the engine.

Prompts (plain text or chat messages) go through the tokenizer and its chat template; the
engine's tokens come back as text row by row through `RowText`, the one token-to-text state
machine: the streaming detokenizer, stop strings that may span tokens, the end-of-turn ids, the
token budget and the finish reason. `TextStream` and `complete` drive it over a batch for the
CLI and the applications; the server's engine keeps one `RowText` per request, so a served
request's text is the text `TextStream` gives for the same tokens.
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


class RowText:
    """One row's generated tokens turned into text, as they come.

    `push` each token; it returns the text now safe to show (a character split across tokens, or
    a tail that may grow into a stop string, is held back) and whether the row has finished:
    an end-of-turn id releases the held text and ends it with "stop", as does a stop string (cut,
    never shown), and the budget's last token ends it with "length". A caller that ends a row
    itself (`generate` stopped at max_new_tokens or the context) calls `finish`. `TextStream`
    keeps one per row, the server's engine one per request.

    Args:
        tok: the tokenizer.
        stop: strings that end the row; they are not part of its text.
        eos: end-of-turn ids; they are not part of the row's ids or text.
        budget: tokens the row may generate (None: the caller ends the row with `finish`).
    """

    def __init__(self, tok: Tokenizer, stop: Sequence[str] = (), eos: Sequence[int] = (), budget: int | None = None):
        self.decoder = StreamDecoder(tok)
        self.matcher = StopMatcher(stop)
        self.eos = frozenset(eos)
        self.budget = budget
        self.token_ids: list[int] = []  # the completion's ids, an end-of-turn id not among them
        self.finish_reason: str | None = None  # "stop" (eos or a stop string) or "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> tuple[str, bool]:
        """Add the row's next token; return (new text, whether the row has finished). A finished
        row ignores what follows (a batch goes on yielding pad ids for it)."""
        if self.finished:
            return "", True
        if token in self.eos:
            return self.finish("stop"), True
        self.token_ids.append(token)
        text, hit = self.matcher.feed(self.decoder.push(token))
        if hit:
            self.finish_reason = "stop"
            return text, True
        if self.budget is not None and len(self.token_ids) >= self.budget:
            return text + self.finish("length"), True
        return text, False

    def finish(self, reason: str) -> str:
        """End the row with `reason`; return the text the detokenizer and the stop matcher still
        hold (a stop string completed by that tail is still cut)."""
        self.finish_reason = reason
        text, hit = self.matcher.feed(self.decoder.flush())
        return text if hit else text + self.matcher.flush()


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
        # No budget: `generate` ends the rows that run out of tokens, at max_new_tokens or the context.
        rows = [RowText(self.tok, self.stop, self.params.eos_token_id) for _ in range(B)]
        for c, row in zip(self.completions, rows):
            c.token_ids = row.token_ids

        # A stop string is text, which `generate` cannot see: it learns of those rows from here.
        def stop_rows(tokens: torch.Tensor) -> torch.Tensor:
            return torch.tensor([row.finished for row in rows], device=tokens.device)  # (B,)

        for tokens in generate(
            self.model, ids.to(self.model.device), mask.to(self.model.device), self.params, stop_rows
        ):
            deltas = [row.push(token)[0] for row, token in zip(rows, tokens.tolist())]
            self._record(rows, deltas)
            yield deltas
        # Rows still going ran out of tokens: whatever the detokenizer and the stop matcher hold.
        tail = ["" if row.finished else row.finish("length") for row in rows]
        self._record(rows, tail)
        if any(tail):
            yield tail

    def _record(self, rows: list[RowText], deltas: list[str]) -> None:
        """Add each row's delta to its completion, with the row's finish reason so far."""
        for c, row, d in zip(self.completions, rows, deltas):
            c.text += d
            c.finish_reason = row.finish_reason


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
