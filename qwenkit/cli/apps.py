"""The applications' commands, `write`, `qa`, `translate`, `sentiment`, `code` and `eval`: typed
functions defined in qwenkit.tasks.commands, beside the tasks they drive. Importing them imports
neither torch nor a model."""

from __future__ import annotations

from qwenkit.tasks import commands

COMMANDS = {
    "write": commands.write,
    "qa": commands.qa,
    "translate": commands.translate,
    "sentiment": commands.sentiment,
    "code": commands.code,
    "eval": commands.eval_,
}
