"""Text generation: continue a text, or write a story, a news article or a dialogue from a prompt.

Evaluation: the perplexity of reference texts under the model (each reference scored as the
assistant's reply to its prompt, so it measures what the model would write for that request) and
distinct-1/2 of the generated texts (how little they repeat themselves).
"""

from __future__ import annotations

from collections.abc import Sequence

from qwenkit.errors import UserError
from qwenkit.generate import SamplingParams
from qwenkit.model import QwenForCausalLM
from qwenkit.tasks import metrics
from qwenkit.tasks.base import Context, GenerativeTask, Messages, chat
from qwenkit.tasks.hygiene import strip_preamble
from qwenkit.tasks.scoring import answer_ids, continuation_logprobs
from qwenkit.tokenizer import Tokenizer

STYLES = {
    "continue": "You are a skilled writer. The user gives the beginning of a text. Continue it in the same "
    "voice, tense and style, starting exactly where it stops. Reply with the continuation only: do "
    "not repeat the beginning, add a title, or comment on it.",
    "story": "You are a creative fiction writer. Write a short, vivid story from the user's prompt, with a "
    "beginning, a middle and an end. Reply with the story only.",
    "news": "You are a news journalist. Write a short news article from the user's prompt: a headline on the "
    "first line, then factual, neutral paragraphs in the inverted-pyramid style. Reply with the "
    "article only.",
    "dialogue": "You are a playwright. Write a natural dialogue from the user's prompt, one line per turn in the "
    "form `Name: words`. Reply with the dialogue only.",
}


def build_messages(prompt: str, style: str = "continue") -> Messages:
    """The chat for one writing request."""
    if style not in STYLES:
        raise UserError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    return [{"role": "system", "content": STYLES[style]}, {"role": "user", "content": prompt}]


def clean(reply: str, prompt: str, style: str = "continue") -> str:
    """The piece without a chatty lead-in; for a continuation, without an echo of the beginning."""
    text = strip_preamble(reply)
    if style == "continue" and prompt.strip() and text.startswith(prompt.strip()):
        text = text[len(prompt.strip()) :]
    return text.strip() if style != "continue" else text.rstrip()


def join(prompt: str, continuation: str) -> str:
    """The beginning and its continuation as one text."""
    if not continuation:
        return prompt
    if prompt.endswith((" ", "\n")) or continuation[0] in " \n.,;:!?'\")":
        return prompt + continuation
    return prompt + " " + continuation.lstrip()


def write(
    model: QwenForCausalLM,
    tok: Tokenizer,
    prompts: Sequence[str],
    params: SamplingParams,
    style: str = "continue",
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Write one piece per prompt.

    Args:
        prompts: the beginnings to continue, or the prompts of the pieces.
        params: sampling parameters (the checkpoint's defaults suit open-ended writing).
        style: "continue" (the default), "story", "news" or "dialogue".
        batch_size: prompts generated together.
        progress: show a progress bar.
    """
    done = chat(
        model,
        tok,
        [build_messages(p, style) for p in prompts],
        params,
        batch_size,
        desc="writing" if progress else None,
    )
    return [clean(c.text, p, style) for p, c in zip(prompts, done)]


def reference_nll(
    model: QwenForCausalLM,
    tok: Tokenizer,
    prompts: Sequence[str],
    references: Sequence[str],
    styles: Sequence[str] | None = None,
    batch_size: int = 4,
) -> tuple[list[float], list[int]]:
    """Per reference, its summed negative log-likelihood (nats) as the reply to its prompt, and the
    number of tokens scored (the reference's text and the end-of-turn token).

    Args:
        prompts: the prompts.
        references: one reference text per prompt.
        styles: the style of each prompt (default: "continue").
        batch_size: rows scored together.
    """
    styles = styles or ["continue"] * len(prompts)
    pairs = [answer_ids(tok, build_messages(p, s), r) for p, r, s in zip(prompts, references, styles)]
    logps = continuation_logprobs(model, [p for p, _ in pairs], [c for _, c in pairs], batch_size)
    return [-lp for lp in logps], [len(c) for _, c in pairs]


# ---- evaluation ------------------------------------------------------------------------------------------


class WriteTask(GenerativeTask):
    """Rows hold a `prompt`, optionally its `style` and a `reference` text. Sampled by default:
    greedy decoding of open-ended text repeats itself."""

    name = "write"
    required = ("prompt",)
    max_new_tokens = 256
    sampled = True

    def build_messages(self, tok: Tokenizer, row: dict) -> Messages:
        return build_messages(row["prompt"], row.get("style", "continue"))

    def parse(self, reply: str, row: dict) -> dict:
        return {"prediction": clean(reply, row["prompt"], row.get("style", "continue"))}

    def score(self, records: Sequence[dict], ctx: Context) -> tuple[dict, list[dict]]:
        """distinct-1/2 of the predictions and, given the model, the perplexity of the references."""
        texts = [r["prediction"] for r in records]
        result: dict = {
            "distinct_1": metrics.distinct_n(texts, 1),
            "distinct_2": metrics.distinct_n(texts, 2),
            "count": len(records),
        }
        with_ref = [r for r in records if r.get("reference")]
        if with_ref and ctx.model is not None and ctx.tok is not None:
            nll, counts = reference_nll(
                ctx.model,
                ctx.tok,
                [r["prompt"] for r in with_ref],
                [r["reference"] for r in with_ref],
                [r.get("style", "continue") for r in with_ref],
                ctx.batch_size,
            )
            result["perplexity"] = metrics.perplexity(nll, counts)
            result["reference_tokens"] = sum(counts)
            for r, n, c in zip(with_ref, nll, counts):
                r["reference_nll"], r["reference_tokens"] = n, c
        elif with_ref:
            result["perplexity"] = None
            result["note"] = "the perplexity of the references needs the model: pass --model"
        return result, list(records)


TASK = WriteTask()
