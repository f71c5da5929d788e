"""Question answering: closed-book, grounded in a passage, or over several documents, whose passages
are ranked with BM25 first; the answer cites the numbered passages it used.

Evaluation: SQuAD's exact match and F1 (metrics.squad) of the short answer against the gold answers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qwenkit.errors import UserError
from qwenkit.generate import SamplingParams
from qwenkit.model import QwenForCausalLM
from qwenkit.tasks import metrics
from qwenkit.tasks.base import Context, GenerativeTask, Messages, chat
from qwenkit.tasks.hygiene import strip_special_tokens
from qwenkit.tokenizer import Tokenizer

SYSTEM_CLOSED = (
    "You are a knowledgeable assistant. Answer the user's question as briefly as possible: a name, a "
    "number, a date or a short phrase, with no explanation. Reply in the form:\nAnswer: <answer>"
)
SYSTEM_GROUNDED = (
    "You answer questions using only the numbered passages the user gives. Reply in exactly this form:\n"
    "Answer: <the shortest answer, in words taken from the passages where possible>\n"
    "Sources: <the numbers of the passages the answer comes from, like [1], [3]>\n"
    "If the passages do not hold the answer, reply:\nAnswer: unknown\nSources: none"
)

DOCUMENT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}


@dataclass
class Passage:
    source: str  # the file it came from, or "context"
    text: str
    number: int = 0  # its [n] in the prompt, from 1
    score: float = 0.0  # BM25 score for the question


@dataclass
class QAResult:
    answer: str
    reply: str
    citations: list[Passage] = field(default_factory=list)
    passages: list[Passage] = field(default_factory=list)  # what the model was shown


# ---- documents and retrieval --------------------------------------------------------------------------


def load_documents(items: Sequence[str]) -> list[tuple[str, str]]:
    """(source, text) of each --context item: a folder (its text files, recursively, in name order), a
    file, or else the item itself as text."""
    docs: list[tuple[str, str]] = []
    for item in items:
        path = Path(item)
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError:  # a long text is no path
            is_dir = is_file = False
        if is_dir:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES)
            if not files:
                raise UserError(f"{item}: no text files (.txt, .md, .rst) in this folder")
            docs += [(str(p), p.read_text(encoding="utf-8", errors="replace")) for p in files]
        elif is_file:
            docs.append((str(path), path.read_text(encoding="utf-8", errors="replace")))
        elif re.fullmatch(r"[\w./\\~-]*(/|\\|\.[A-Za-z]\w{0,4})", item.strip()):
            # It reads as a file or folder name, not as a passage: a typo should not become the context.
            raise UserError(f"{item}: no such file or folder")
        else:
            docs.append(("context", item))
    return docs


def split_passages(source: str, text: str, max_words: int = 120) -> list[Passage]:
    """Paragraphs of a document, long ones cut at sentence ends into pieces of about max_words."""
    out = []
    for para in re.split(r"\n\s*\n", text.strip()):
        words, piece = 0, []
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
            n = len(sentence.split())
            if piece and words + n > max_words:
                out.append(Passage(source, " ".join(piece)))
                words, piece = 0, []
            piece.append(sentence)
            words += n
        if piece and any(piece):
            out.append(Passage(source, " ".join(piece)))
    return out


def _terms(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 over a fixed set of texts (k1=1.5, b=0.75), with the idf that stays positive,
    log(1 + (N - df + 0.5) / (df + 0.5)), as Lucene uses."""

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.docs = [Counter(_terms(t)) for t in texts]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avgdl = sum(self.lengths) / len(self.docs) if self.docs else 0.0
        df = Counter(term for d in self.docs for term in d)
        n = len(self.docs)
        self.idf = {term: math.log(1 + (n - f + 0.5) / (f + 0.5)) for term, f in df.items()}

    def scores(self, query: str) -> list[float]:
        terms = _terms(query)
        out = []
        for doc, length in zip(self.docs, self.lengths):
            s = 0.0
            for term in terms:
                tf = doc.get(term, 0)
                if tf:
                    norm = self.k1 * (1 - self.b + self.b * length / self.avgdl)
                    s += self.idf[term] * tf * (self.k1 + 1) / (tf + norm)
            out.append(s)
        return out


def retrieve(question: str, passages: Sequence[Passage], top_k: int = 3) -> list[Passage]:
    """The top_k passages for the question by BM25, best first, numbered from 1."""
    scores = BM25([p.text for p in passages]).scores(question)
    order = sorted(range(len(passages)), key=lambda i: -scores[i])[:top_k]
    return [Passage(passages[i].source, passages[i].text, n, scores[i]) for n, i in enumerate(order, 1)]


# ---- prompting and parsing ------------------------------------------------------------------------------


def build_messages(question: str, passages: Sequence[Passage] = ()) -> Messages:
    """The chat for one question, closed-book or with numbered passages."""
    if not passages:
        return [{"role": "system", "content": SYSTEM_CLOSED}, {"role": "user", "content": question}]
    shown = "\n\n".join(
        f"[{p.number}] ({Path(p.source).name}) {p.text}" if p.source != "context" else f"[{p.number}] {p.text}"
        for p in passages
    )
    return [
        {"role": "system", "content": SYSTEM_GROUNDED},
        {"role": "user", "content": f"Passages:\n{shown}\n\nQuestion: {question}"},
    ]


def parse_reply(reply: str, passages: Sequence[Passage] = ()) -> tuple[str, list[Passage]]:
    """(the short answer, the passages it cites). The answer is what follows "Answer:" up to the end
    of its line (else the reply's first line); citations are the [n] of shown passages named on the
    "Sources:" line (else anywhere in the reply)."""
    text = reply.strip()
    m = re.search(r"answer\s*:\s*(.*)", text, re.IGNORECASE)
    answer = m.group(1) if m else (text.splitlines()[0] if text else "")
    answer = re.split(r"\s*\bsources?\s*:", answer, flags=re.IGNORECASE)[0]
    answer = re.sub(r"\s*\[\d+\]", "", answer).strip().strip('"“”').strip()
    sources = re.search(r"sources?\s*:(.*)", text, re.IGNORECASE)
    numbers = re.findall(r"\[(\d+)\]", sources.group(1) if sources else text)
    if sources and not numbers:
        numbers = re.findall(r"\b(\d+)\b", sources.group(1))
    by_number = {p.number: p for p in passages}
    cited = []
    for n in dict.fromkeys(int(x) for x in numbers):
        if n in by_number:
            cited.append(by_number[n])
    return answer, cited


def prepare(tok: Tokenizer, question: str, context: Sequence[str] | str | None, top_k: int = 3) -> list[Passage]:
    """The passages to show for one question: none (closed-book), all of a short context, or the
    top_k by BM25 when the context has more passages than that."""
    if not context:
        return []
    docs = [("context", context)] if isinstance(context, str) else load_documents(context)
    passages = [p for source, text in docs for p in split_passages(source, strip_special_tokens(tok, text))]
    if len(passages) <= top_k:
        return [Passage(p.source, p.text, n) for n, p in enumerate(passages, 1)]
    return retrieve(question, passages, top_k)


def answer(
    model: QwenForCausalLM,
    tok: Tokenizer,
    questions: Sequence[str],
    params: SamplingParams,
    contexts: Sequence[Sequence[str] | str | None] | None = None,
    top_k: int = 3,
    batch_size: int = 8,
    progress: bool = False,
) -> list[QAResult]:
    """Answer questions, each closed-book or from its context.

    Args:
        questions: the questions.
        contexts: per question, None (closed-book), a passage (a string), or a list of --context
            items (files, folders, or texts) to retrieve passages from.
        params: sampling parameters (greedy for evaluation).
        top_k: how many passages to show when retrieving.
        batch_size: questions answered together.
        progress: show a progress bar.
    """
    contexts = contexts if contexts is not None else [None] * len(questions)
    shown = [prepare(tok, q, c, top_k) for q, c in zip(questions, contexts)]
    done = chat(
        model,
        tok,
        [build_messages(strip_special_tokens(tok, q), p) for q, p in zip(questions, shown)],
        params,
        batch_size,
        desc="answering" if progress else None,
    )
    results = []
    for c, passages in zip(done, shown):
        text, cited = parse_reply(c.text, passages)
        results.append(QAResult(text, c.text, cited, passages))
    return results


# ---- evaluation ------------------------------------------------------------------------------------------


class QATask(GenerativeTask):
    """Rows hold a `question`, its gold `answers` and optionally a `context` passage."""

    name = "qa"
    required = ("question", "answers")
    max_new_tokens = 64  # a short answer, and its sources

    def build_messages(self, tok: Tokenizer, row: dict) -> Messages:
        question = row["question"]
        return build_messages(strip_special_tokens(tok, question), prepare(tok, question, row.get("context")))

    def parse(self, reply: str, row: dict) -> dict:
        """The short answer as the prediction, and the whole reply."""
        return {"prediction": parse_reply(reply)[0], "reply": reply}

    def score(self, records: Sequence[dict], ctx: Context) -> tuple[dict, list[dict]]:
        """SQuAD exact match and F1, overall and per row."""
        answers = [[r["answers"]] if isinstance(r["answers"], str) else list(r["answers"]) for r in records]
        preds = [str(r["prediction"] or "") for r in records]
        out = [
            {**r, "exact_match": metrics.exact_match(p, a), "f1": metrics.token_f1(p, a)}
            for r, p, a in zip(records, preds, answers)
        ]
        return metrics.squad(preds, answers), out


TASK = QATask()
