"""The terminal chat of `qwenkit chat`: a conversation that streams its replies, keeps its
history within the model's context (dropping the oldest turns, with a notice), and answers the
commands /reset, /system TEXT, /save FILE, /help and /quit."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from qwenkit.errors import ContextLengthError
from qwenkit.generate import SamplingParams, check_fits, context_length
from qwenkit.model import QwenForCausalLM
from qwenkit.text import stream_text
from qwenkit.tokenizer import Tokenizer

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (empty TEXT: the template's default)
  /save FILE      write the conversation as JSON
  /quit           leave (or Ctrl-D)"""


class ContextFull(ContextLengthError):
    """The newest message alone does not leave room for an answer."""


class ChatSession:
    """A conversation with a model. `ask` streams the reply and records both turns."""

    def __init__(
        self,
        model: QwenForCausalLM,
        tok: Tokenizer,
        params: SamplingParams,
        system: str | None = None,
        notice: TextIO = sys.stderr,
    ):
        self.model, self.tok, self.params, self.system = model, tok, params, system
        self.turns: list[dict[str, str]] = []  # user and assistant messages, oldest first
        self.notice = notice

    @property
    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def _prompt_ids(self) -> list[int]:
        """The rendered conversation, dropping the oldest turns until an answer of max_new_tokens fits.
        A message that cannot fit even alone is refused before any history is dropped."""
        limit = context_length(self.model.config)
        # A whole answer fits when the prompt and all but the answer's last token fit as a prompt
        # does (the last token is predicted, never fed): generate's own rule, check_fits.
        answer = self.params.max_new_tokens - 1
        head = [{"role": "system", "content": self.system}] if self.system else []
        alone = len(self.tok.apply_chat_template(head + self.turns[-1:], add_generation_prompt=True))
        try:
            check_fits(alone + answer, limit)
        except ContextLengthError:
            raise ContextFull(
                f"this message is {alone} tokens with the system prompt; the context holds "
                f"{limit}, {self.params.max_new_tokens} of them kept for the answer"
            ) from None
        while True:
            ids = self.tok.apply_chat_template(self.messages, add_generation_prompt=True)
            try:
                check_fits(len(ids) + answer, limit)
                return ids
            except ContextLengthError:
                pass
            # The oldest exchange goes: the user turn and the answer that followed it.
            drop = 2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1
            del self.turns[:drop]
            print(
                f"[history: dropped the oldest turn to fit the context of {limit} tokens]", file=self.notice, flush=True
            )

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`; the exchange joins the history once it is complete."""
        self.turns.append({"role": "user", "content": text})
        try:
            ids = self._prompt_ids()
        except ContextFull:
            self.turns.pop()
            raise
        reply = []
        try:
            for delta in stream_text(self.model, self.tok, ids, self.params):
                reply.append(delta)
                yield delta
        finally:
            # An interrupted answer (Ctrl-C) is kept as far as it got, so the history stays well-formed.
            self.turns.append({"role": "assistant", "content": "".join(reply)})

    def reset(self) -> None:
        self.turns = []

    def save(self, path: str | os.PathLike) -> Path:
        # Written in place, not through files.atomic_write: the file may be a device (/dev/stdout).
        path = Path(path)
        path.write_text(json.dumps({"messages": self.messages}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return path


def run(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """The read-eval-print loop: a prompt when the input is a terminal, replies streamed as they come."""
    interactive = stdin.isatty()
    if interactive:
        print("Chat with the model. /help lists the commands.", file=stdout)
    while True:
        if interactive:
            print("\nyou> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            return
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            command, _, arg = text[1:].partition(" ")
            if command in ("quit", "exit"):
                return
            elif command == "reset":
                session.reset()
                print("[conversation reset]", file=stdout)
            elif command == "system":
                session.system = arg.strip() or None
                print(f"[system prompt {'set' if session.system else 'back to the default'}]", file=stdout)
            elif command == "save" and arg.strip():
                print(f"[saved to {session.save(arg.strip())}]", file=stdout)
            else:
                print(HELP, file=stdout)
            continue
        if interactive:
            print("assistant> ", end="", file=stdout, flush=True)
        try:
            for delta in session.ask(text):
                print(delta, end="", file=stdout, flush=True)
        except ContextFull as e:
            print(f"[not sent: {e}]", file=stdout)
            continue
        except KeyboardInterrupt:
            print("\n[interrupted]", file=stdout)
            continue
        print(file=stdout, flush=True)
