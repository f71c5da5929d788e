"""The five applications, each a small module with its prompt, its output parsing and its evaluation.

| module | application | eval data fields | metric |
| --- | --- | --- | --- |
| write | continue a text; story, news, dialogue | prompt, reference? | reference perplexity, distinct-1/2 |
| qa | closed-book or grounded; BM25, citations | question, context?, answers | SQuAD exact match, F1 |
| translate | any pair; detection; sentence batches | source, reference, src_lang, tgt_lang | sacreBLEU BLEU, chrF |
| sentiment | label log-likelihoods, probabilities | text, label | accuracy, macro-F1, confusion |
| code | extraction, sandboxed tests, repair | HumanEval records | pass@1, pass@k |

`metrics` holds the metrics as pure functions, `sandbox` runs generated code, `evaluate` is
`qwenkit eval`, and `commands` the CLI commands. Importing this package does not import torch.
"""

from __future__ import annotations

from pathlib import Path

TASKS = ("sentiment", "qa", "translate", "code", "write")
DATA = Path(__file__).parent / "data"


def sample_data(task: str) -> Path:
    """The small sample file of a task shipped with qwenkit (a few dozen rows, for tests and demos)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return DATA / f"{task}.jsonl"
