"""The serving engine: one loop that batches the decode steps of concurrent requests.

Continuous batching over a static KV cache with one row per slot. A request joins between two
steps (its prompt is prefilled into a free row while the other rows wait), then decodes one token
per step together with every other active row, and leaves as soon as it finishes or is cancelled,
its row going to the next request in the queue. The queue is bounded: past `max_queue` waiting
requests, `submit` raises `QueueFull` (the web layer answers 429) rather than piling up work.

The loop runs in its own thread. Requests come in through `submit` and `cancel`, which any
thread may call; results go out through each request's `on_output` callback, called on the
engine's thread (the web layer hands them to its event loop).

Each request keeps its own sampling parameters, seed, stop strings and token budget. Its logits
go through the same penalties and `sample` as `qwenkit.generate.generate`, and its tokens become
text through `text.RowText`, the state machine `text.TextStream` runs for each of its rows, so
that a request's output equals `model.generate` on its prompt alone (greedy, or sampled with a
seed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from qwenkit.cache import KVCache
from qwenkit.errors import QwenkitError
from qwenkit.generate import (
    SamplingParams,
    apply_output_penalties,
    apply_repetition_penalty,
    check_fits,
    context_length,
    sample,
)
from qwenkit.model import QwenForCausalLM
from qwenkit.text import Completion, RowText
from qwenkit.tokenizer import Tokenizer

log = logging.getLogger("qwenkit.server")


class QueueFull(QwenkitError):
    """Every slot is busy and the waiting queue is full."""


@dataclass
class Output:
    """What one request produced since its last output."""

    text: str = ""  # new text (often "" while a character or a possible stop string is held back)
    tokens: int = 0  # tokens generated so far, the end-of-turn token included
    finish_reason: str | None = None  # on the last output: stop, length, cancelled or error
    error: str | None = None


@dataclass(eq=False)  # identity: two requests with the same prompt are still two
class Request:
    """One sequence to generate.

    Args:
        prompt: the prompt's token ids.
        params: sampling parameters; `max_new_tokens` is the budget (capped by the context), `seed`
            gives the request its own random generator.
        stop: strings that end the generation; they are not part of the output.
        on_output: called on the engine's thread with each `Output`; must be quick and not block.
    """

    prompt: list[int]
    params: SamplingParams
    stop: Sequence[str] = ()
    on_output: Callable[[Output], None] | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False  # set by `Engine.cancel` from any thread; read by the loop between steps

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Slot:
    request: Request
    text: RowText  # its tokens as text: stop strings, end-of-turn ids, the budget, the finish reason
    generator: torch.Generator | None
    last: int = 0  # the token fed at the next decode step


class Engine:
    """Continuous batching for one model.

    Args:
        model: the model, in eval mode, on its device.
        tok: its tokenizer (detokenizes each request's tokens, for its text and its stop strings).
        max_batch: requests decoded together: the KV cache's rows.
        max_queue: requests that may wait for a row; more are refused with `QueueFull`.
        max_model_len: tokens per row (prompt and completion); default: the model's context, at
            most 4096, since the cache for every row is allocated up front.
    """

    def __init__(
        self,
        model: QwenForCausalLM,
        tok: Tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        max_model_len: int | None = None,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tok = model, tok
        self.max_batch, self.max_queue = max_batch, max_queue
        limit = context_length(model.config)
        self.max_len = min(limit, max_model_len or 4096)
        self.cache = KVCache(model.config, max_batch, self.max_len, dtype=model.dtype, device=model.device)
        self.slots: list[_Slot | None] = [None] * max_batch
        # Prompt and output ids per row, for the repetition penalty. Unused places hold the row's
        # first token: penalizing a token twice is the same as once (the penalty gathers from the
        # unpenalized logits), so padded rows batch exactly.
        self.seen = torch.zeros(max_batch, self.max_len, dtype=torch.long, device=model.device)
        self.seen_len = [0] * max_batch
        self.counts: torch.Tensor | None = None  # (max_batch, vocab) output counts, for presence/frequency
        self.stats: Counter[str] = Counter()  # requests, finished, cancelled, rejected, tokens, steps
        self._waiting: deque[Request] = deque()
        self._occupied = 0
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._decoders: dict[int, object] = {}  # rows -> the model's decoding step over cache rows :rows

    # ---- the API other threads use ----------------------------------------------------------------

    @property
    def active(self) -> int:
        """Requests holding a row of the cache."""
        return self._occupied

    @property
    def waiting(self) -> int:
        """Requests in the queue, waiting for a row."""
        return len(self._waiting)

    def start(self) -> Engine:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="qwenkit-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop; requests still waiting or running finish with "cancelled"."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for b, slot in enumerate(self.slots):
            if slot is not None:
                self._finish(b, "cancelled")
        while self._waiting:
            self._emit(self._waiting.popleft(), Output(finish_reason="cancelled"), "cancelled")

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue requests, all or none (the `n` choices of one API call go together).

        Raises:
            QueueFull: the rows and the queue cannot take them all.
            ContextLengthError: a prompt leaves no room for a single new token.
        """
        for r in requests:
            if not r.prompt:
                raise ValueError("the prompt is empty")
            check_fits(len(r.prompt), self.max_len)
        with self._cond:
            if self._occupied + len(self._waiting) + len(requests) > self.max_batch + self.max_queue:
                self.stats["rejected"] += len(requests)
                raise QueueFull(
                    f"{self._occupied} requests running and {len(self._waiting)} waiting; "
                    f"the queue holds {self.max_queue}"
                )
            self._waiting.extend(requests)
            self.stats["requests"] += len(requests)
            self._cond.notify_all()

    def cancel(self, request: Request) -> None:
        """Stop a request at the next step and free its row (no-op once it has finished)."""
        with self._cond:
            request.cancelled = True
            if request in self._waiting:  # never got a row: leave the queue now, not at its turn
                self._waiting.remove(request)
                self._emit(request, Output(finish_reason="cancelled"), "cancelled")
            self._cond.notify_all()

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, stop: Sequence[str] = (), timeout: float | None = None
    ) -> Completion:
        """Run one request to the end and return its completion (blocking; not on the engine's thread).

        Args:
            prompt: the prompt's token ids.
            params: its sampling parameters (`max_new_tokens` is the budget).
            stop: stop strings.
            timeout: seconds to wait before cancelling it and raising TimeoutError.
        """
        done = threading.Event()
        text: list[str] = []

        def on_output(out: Output) -> None:
            text.append(out.text)
            if out.finish_reason is not None:
                done.set()

        request = Request(list(prompt), params, stop, on_output)
        self.submit([request])
        if not done.wait(timeout):
            self.cancel(request)
            raise TimeoutError(f"the request did not finish in {timeout} s")
        return Completion(
            text="".join(text),
            token_ids=list(request.token_ids),
            finish_reason=request.finish_reason,
            prompt_tokens=len(request.prompt),
        )

    # ---- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():  # thread-local: entered on the engine's own thread
            while True:
                with self._cond:
                    while self._running and not self._waiting and not self._occupied:
                        self._cond.wait()
                    if not self._running:
                        return
                try:
                    # Only this thread frees rows: cancelled ones first, then the freed rows are
                    # given to waiting requests and prefilled in the same step.
                    self._drop_cancelled()
                    with self._cond:
                        joining = self._take_waiting()
                    if joining:
                        self._prefill(joining)
                    if self._occupied:
                        self._decode()
                except Exception as e:  # a failed step must not take the server down with it
                    log.exception("engine step failed")
                    for b, slot in enumerate(self.slots):
                        if slot is not None:
                            self._finish(b, "error", error=f"{type(e).__name__}: {e}")

    def _take_waiting(self) -> list[int]:
        """Give free rows to waiting requests, first come first served (called under the lock)."""
        joined = []
        for b in range(self.max_batch):
            if not self._waiting:
                break
            if self.slots[b] is not None:
                continue
            while self._waiting and self._waiting[0].cancelled:
                self._emit(self._waiting.popleft(), Output(finish_reason="cancelled"), "cancelled")
            if not self._waiting:
                break
            request = self._waiting.popleft()
            p = request.params
            budget = min(p.max_new_tokens, self.max_len - len(request.prompt))
            self.slots[b] = _Slot(
                request=request,
                text=RowText(self.tok, request.stop, p.eos_token_id, budget),
                generator=torch.Generator(device=self.model.device).manual_seed(p.seed) if p.seed is not None else None,
            )
            self._occupied += 1
            joined.append(b)
        return joined

    def _drop_cancelled(self) -> None:
        for b, slot in enumerate(self.slots):
            if slot is not None and slot.request.cancelled:
                self._finish(b, "cancelled")

    def _prefill(self, rows: list[int]) -> None:
        """Each joining prompt into its own row (the other rows keep their place, and no prompt is
        padded), then the first token of all of them from one pass of the LM head."""
        last = []
        for b in rows:
            prompt = self.slots[b].request.prompt
            ids = torch.tensor([prompt], device=self.model.device)  # (1, T)
            last.append(self.model.hidden_states(ids, cache=self.cache.rows(b, b + 1))[:, -1])  # (1, C)
            self.seen[b].fill_(prompt[0])
            self.seen[b, : len(prompt)] = ids[0]
            self.seen_len[b] = len(prompt)
            if self.counts is not None:
                self.counts[b].zero_()
        self._sample_and_emit(rows, self.model.logits(torch.cat(last)))  # (len(rows), vocab)

    def _decode(self) -> None:
        """One step for every active row; free rows below the highest active one sit it out."""
        rows = [b for b, s in enumerate(self.slots) if s is not None]
        hi = rows[-1] + 1
        tokens = torch.zeros(hi, dtype=torch.long)  # (B,)
        mask = torch.zeros(hi, dtype=torch.long)  # (B,): 0 leaves a free row where it is
        for b in rows:
            tokens[b] = self.slots[b].last
            mask[b] = 1
        device = self.model.device
        logits = self._decoder(hi)(tokens.to(device), None if len(rows) == hi else mask.to(device))  # (B, vocab)
        self.stats["steps"] += 1
        self._sample_and_emit(rows, logits if len(rows) == hi else logits[rows])

    def _decoder(self, rows: int):
        """The model's decoding step over the cache's first `rows` rows (qwenkit.generate's seam),
        chosen once for each width and kept for the server's life: the model does not change under a
        running server."""
        if rows not in self._decoders:
            self._decoders[rows] = self.model.decoder(self.cache.rows(0, rows))
        return self._decoders[rows]

    def _sample_and_emit(self, rows: list[int], logits: torch.Tensor) -> None:
        """Next token of each row from its logits (n, vocab), in `generate`'s order: repetition
        penalty, presence/frequency penalties, then `sample` with the row's own parameters."""
        logits = logits.float()
        n = len(rows)
        params = [self.slots[b].request.params for b in rows]
        for penalty, idx in _groups(params, lambda p: p.repetition_penalty if p.repetition_penalty != 1.0 else None):
            picked = [rows[i] for i in idx]
            seen = self.seen[picked, : max(self.seen_len[b] for b in picked)]  # (n, L)
            logits = _update(logits, idx, apply_repetition_penalty, seen, penalty)
        for _, idx in _groups(
            params,
            lambda p: (p.presence_penalty, p.frequency_penalty) if p.presence_penalty or p.frequency_penalty else None,
        ):
            if self.counts is None:
                self.counts = torch.zeros(self.max_batch, logits.shape[-1], device=logits.device)
            counts = self.counts[[rows[i] for i in idx]]
            logits = _update(logits, idx, apply_output_penalties, counts, params[idx[0]])
        tokens = torch.empty(n, dtype=torch.long, device=logits.device)
        # Rows that sample alike share one `sample` call; a seeded row draws from its own generator.
        key = lambda p: (p.do_sample, p.temperature, p.top_k, p.top_p, p.min_p) if p.do_sample else (False,)
        for _, idx in _groups(params, lambda p: None if p.seed is not None and p.do_sample else key(p)):
            tokens[_index(idx, n)] = sample(logits[_index(idx, n)], params[idx[0]])
        for i, b in enumerate(rows):
            if params[i].seed is not None and params[i].do_sample:
                tokens[i] = sample(logits[i : i + 1], params[i], self.slots[b].generator)[0]
        for b, token in zip(rows, tokens.tolist()):
            self._advance(b, token)

    def _advance(self, b: int, token: int) -> None:
        """Record row b's new token, turn it into text, and finish the request if it is done."""
        slot = self.slots[b]
        request = slot.request
        request.token_ids.append(token)  # the end-of-turn token too: it counts in the usage
        self.stats["tokens"] += 1
        text, finished = slot.text.push(token)
        if finished:
            return self._finish(b, slot.text.finish_reason, text)
        slot.last = token
        self.seen[b, self.seen_len[b]] = token
        self.seen_len[b] += 1
        if self.counts is not None:
            self.counts[b, token] += 1
        if text:  # a token whose text is held back (half a character, a possible stop) has nothing to say
            self._emit(request, Output(text=text, tokens=len(request.token_ids)))

    def _finish(self, b: int, reason: str, text: str = "", error: str | None = None) -> None:
        """End row b's request and free the row: length 0 and no valid slot, ready for a new prompt."""
        request = self.slots[b].request
        self.cache.lengths[b] = 0
        self.cache.valid[b] = False
        with self._cond:
            self.slots[b] = None
            self._occupied -= 1
        self._emit(request, Output(text=text, tokens=len(request.token_ids), finish_reason=reason, error=error), reason)

    def _emit(self, request: Request, out: Output, finish_reason: str | None = None) -> None:
        if finish_reason is not None:
            request.finish_reason = finish_reason
            self.stats["finished" if finish_reason in ("stop", "length") else finish_reason] += 1
        if request.on_output is not None:
            try:
                request.on_output(out)
            except Exception:  # a consumer that went away (its event loop closed) must not stop the loop
                log.exception("on_output failed")


def _index(idx: list[int], n: int) -> list[int] | slice:
    """Row indexes as a slice when they are all n rows: a view, not a copy of (n, vocab) logits."""
    return slice(None) if len(idx) == n else idx


def _update(logits: torch.Tensor, idx: list[int], fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """logits with rows idx replaced by fn(those rows, *args), which returns new rows (the common
    case, all rows, copies nothing more)."""
    if len(idx) == logits.shape[0]:
        return fn(logits, *args)
    logits[idx] = fn(logits[idx], *args)
    return logits


def _groups(items: list, key: Callable) -> list[tuple[object, list[int]]]:
    """Indexes of items grouped by key(item), skipping items whose key is None; in first-seen order."""
    groups: dict[object, list[int]] = {}
    for i, item in enumerate(items):
        k = key(item)
        if k is not None:
            groups.setdefault(k, []).append(i)
    return list(groups.items())


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Wait until no request is running or waiting; False if that did not happen in time."""
    deadline = time.monotonic() + timeout
    while engine.active or engine.waiting:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
