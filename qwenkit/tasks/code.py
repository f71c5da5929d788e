"""Code generation: ask for code, take it out of the reply, run the given tests in the sandbox, and
with repair rounds feed the failures back until the tests pass or the rounds run out.

Evaluation: HumanEval's. A record holds `task_id`, `prompt` (a signature and docstring), `test`
(a `check(candidate)` function) and `entry_point`; the program run is the prompt with the
completion appended, then the test, then `check(entry_point)`. Scores are pass@1 and, with several
samples per problem, pass@k by the unbiased estimator.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from qwenkit.errors import UserError
from qwenkit.generate import SamplingParams
from qwenkit.model import QwenForCausalLM
from qwenkit.tasks import metrics, sandbox
from qwenkit.tasks.base import Context, GenerativeTask, Messages, chat
from qwenkit.tokenizer import Tokenizer

LANG_ALIASES = {
    "py": "python",
    "python3": "python",
    "js": "javascript",
    "node": "javascript",
    "ts": "typescript",
    "c++": "cpp",
    "cxx": "cpp",
    "sh": "bash",
    "shell": "bash",
    "golang": "go",
    "rs": "rust",
}
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)


def normalize_lang(lang: str) -> str:
    lang = lang.strip().lower()
    return LANG_ALIASES.get(lang, lang)


def system_prompt(lang: str) -> str:
    return (
        f"You are an expert {lang} programmer. Reply with the complete solution in a single ```{lang} code "
        f"block, with every import it needs and no example usage or tests, and nothing after the block."
    )


def extract_code(reply: str, lang: str = "python") -> str:
    """The code in a reply: the fenced blocks tagged with the language (or untagged) joined, else any
    fenced block; an unclosed fence (the reply ran out of tokens) counts up to the end; a reply with
    no fence counts as code if it parses as Python, else from its first line that starts code."""
    lang = normalize_lang(lang)
    blocks = [(normalize_lang(tag) if tag else "", body) for tag, body in _FENCE.findall(reply)]
    if blocks:
        chosen = (
            [body for tag, body in blocks if tag == lang]
            or [body for tag, body in blocks if not tag]
            or [max((body for _, body in blocks), key=len)]
        )
        return "\n\n".join(b.strip("\n") for b in chosen).strip("\n") + "\n"
    opened = re.search(r"^[ \t]*```[^\n]*\n", reply, re.MULTILINE)
    if opened:
        return reply[opened.end() :].strip("\n") + "\n"
    text = reply.strip("\n")
    if not text.strip():
        return ""
    if lang == "python":
        try:
            ast.parse(text)
            return text + "\n"
        except SyntaxError:
            pass
        lines = text.splitlines()
        starts = (i for i, line in enumerate(lines) if re.match(r"(def|class|import|from|async def|@)\b", line))
        start = next(starts, None)
        return "\n".join(lines[start:]) + "\n" if start is not None else ""
    return text + "\n"


def defined_functions(code: str) -> list[str]:
    """Names of the top-level functions of Python code (empty if it does not parse)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@dataclass
class Attempt:
    reply: str
    code: str
    result: sandbox.SandboxResult | None = None  # None: no tests were run


@dataclass
class CodeResult:
    code: str  # the last attempt's code
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def passed(self) -> bool | None:
        """True or False when tests ran, None without tests."""
        last = self.attempts[-1].result if self.attempts else None
        return None if last is None else last.passed


def feedback(attempt: Attempt) -> str:
    """The repair request: what went wrong, in the sandbox's words."""
    if not attempt.code.strip():
        return "Your reply had no code block. Reply with the complete solution in a single ```python code block."
    r = attempt.result
    output = (r.stderr.strip() or r.stdout.strip())[-2000:] if r else ""
    return (
        f"The code failed the tests ({r.summary() if r else 'no result'}).\n```\n{output}\n```\n"
        "Fix it. Reply with the complete corrected solution in a single ```python code block."
    )


def solve(
    generate: Callable[[Messages], str],
    task: str,
    lang: str = "python",
    tests: str | None = None,
    entry_point: str | None = None,
    repair: int = 0,
    timeout: float = 10.0,
) -> CodeResult:
    """Generate code for a task and, given tests, run them; on failure, up to `repair` more rounds
    with the failure fed back.

    Args:
        generate: reply to a conversation (the model behind it is the caller's choice).
        task: what the code should do.
        lang: the programming language; tests run for Python only.
        tests: test code (asserts, or a HumanEval `check(candidate)` function), or None.
        entry_point: the function `check` is called with (default: the last top-level function the
            code defines).
        repair: how many times to retry after failing tests.
        timeout: wall-clock seconds for each test run.
    """
    lang = normalize_lang(lang)
    if tests is not None and lang != "python":
        raise UserError(f"tests can run only for Python code, not {lang}")
    messages: Messages = [{"role": "system", "content": system_prompt(lang)}, {"role": "user", "content": task}]
    attempts: list[Attempt] = []
    for _ in range(repair + 1):
        reply = generate(messages)
        code = extract_code(reply, lang)
        attempt = Attempt(reply, code)
        attempts.append(attempt)
        if tests is None:
            break
        entry = entry_point or (defined_functions(code) or [None])[-1]
        attempt.result = sandbox.run_tests(code, tests, entry, timeout=timeout)
        if attempt.result.passed:
            break
        messages = [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": feedback(attempt)}]
    return CodeResult(attempts[-1].code, attempts)


def generate_code(model: QwenForCausalLM, tok: Tokenizer, task: str, params: SamplingParams, **options) -> CodeResult:
    """`solve` with the model writing the replies, sampled with `params`; the options (lang, tests,
    entry_point, repair, timeout) as `solve`'s."""
    return solve(lambda messages: chat(model, tok, [messages], params)[0].text, task, **options)


# ---- evaluation ------------------------------------------------------------------------------------------


def humaneval_messages(prompt: str) -> Messages:
    """The chat that asks a chat model to complete a HumanEval prompt."""
    return [
        {"role": "system", "content": system_prompt("python")},
        {
            "role": "user",
            "content": "Complete the following Python function. Reply with the whole function, "
            f"its signature included.\n```python\n{prompt.strip()}\n```",
        },
    ]


def completion_from_reply(reply: str, entry_point: str) -> str:
    """What to append to the prompt: the extracted code, which redefines the whole function when it
    holds its `def` (the prompt's own def, a docstring alone, is then overridden), else a body."""
    code = extract_code(reply, "python")
    if re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return "\n" + code
    return code


@dataclass(frozen=True)
class CodeTask(GenerativeTask):
    """HumanEval records. Several records of one `task_id` are several samples of its problem, scored
    as pass@k; `qwenkit eval --samples N` makes them.

    Args:
        workers: programs run in the sandbox at once.
    """

    workers: int = 2

    name = "code"
    required = ("task_id", "prompt", "test", "entry_point")
    key = "task_id"
    max_new_tokens = 512  # a whole function

    def build_messages(self, tok: Tokenizer, row: dict) -> Messages:
        return humaneval_messages(row["prompt"])

    def parse(self, reply: str, row: dict) -> dict:
        """The completion as the prediction, and the whole reply."""
        return {"prediction": completion_from_reply(reply, row["entry_point"]), "reply": reply}

    def score(self, records: Sequence[dict], ctx: Context) -> tuple[dict, list[dict]]:
        """Run every record's program in the sandbox (ctx.timeout seconds each); pass@1 and pass@k
        over problems."""

        def run(r: dict) -> sandbox.SandboxResult:
            program = r["prompt"] + str(r["prediction"] or "")
            return sandbox.run_tests(program, r["test"], r["entry_point"], timeout=ctx.timeout)

        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            results = list(
                tqdm(pool.map(run, records), total=len(records), desc="testing", unit="program", disable=not records)
            )
        out, by_task = [], {}
        for r, res in zip(records, results):
            by_task.setdefault(r["task_id"], []).append(res.passed)
            out.append({**r, "passed": res.passed, "result": res.summary()})
        samples = {len(v) for v in by_task.values()}
        # HumanEval's k of 1, 10 and 100, and k = n (any sample passes) when n is none of them.
        ks = sorted({1, 10, 100, min(samples, default=1)})
        return {
            **metrics.mean_pass_at_k(by_task, ks),
            "problems": len(by_task),
            "samples_per_problem": samples.pop() if len(samples) == 1 else sorted(samples),
            "count": len(records),
        }, out


TASK = CodeTask()
