"""The `qwenkit` command: one parser over the command groups, and one error handler.

Each command is a typed function in the module of its group (run, quantize, serve, demo, apps); its
signature becomes its flags and its docstring its --help (qwenkit.cli.signature). `finetune`'s
flags are a recipe's keys, built from FinetuneConfig's fields by the same machinery when the
command runs (so that `qwenkit --help` imports no torch), and it runs under the same handler.
An error the user can act on (a QwenkitError, or a missing file) is printed as one line,
`qwenkit COMMAND: error: MESSAGE`, with exit status 2; Ctrl-C exits with 130. Nothing outside this
package imports it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from qwenkit import __version__
from qwenkit.cli import apps, demo, finetune, quantize, run, serve
from qwenkit.cli.signature import add_command, summary
from qwenkit.errors import QwenkitError

# Command names to typed functions, in the order of `qwenkit --help`; "convert gguf" is the
# subcommand gguf of the group convert.
COMMANDS: dict[str, Callable] = {
    **run.COMMANDS,
    **quantize.COMMANDS,
    **demo.COMMANDS,
    **serve.COMMANDS,
    **apps.COMMANDS,
}
# Commands that parse their own arguments, given whole.
OWN_PARSERS: dict[str, Callable[[list[str]], int]] = {"finetune": finetune.finetune}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenkit",
        description="A toolkit for Qwen2.5: run, fine-tune, "
        "evaluate and serve the model. `qwenkit COMMAND --help` explains each command.",
    )
    parser.add_argument("--version", action="version", version=f"qwenkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, fn in OWN_PARSERS.items():  # listed here; `main` hands them their arguments unparsed
        sub.add_parser(name, help=summary(fn), add_help=False)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, fn in COMMANDS.items():
        where = sub
        if " " in name:
            group, _, name = name.partition(" ")
            if group not in groups:
                groups[group] = sub.add_parser(group, help=f"{group} subcommands").add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            where = groups[group]
        add_command(where, name, fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in OWN_PARSERS:
        return _run(argv[0], OWN_PARSERS[argv[0]], argv[1:])
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    name = args.pop("command")
    if name is None:
        parser.print_help()
        return 2
    if "subcommand" in args:
        name = f"{name} {args.pop('subcommand')}"
    return _run(name, COMMANDS[name], **args)


def _run(name: str, fn: Callable, *args, **kwargs) -> int:
    """The one error handler: a command's status (None is 0), or 2 after one line on stderr for an
    error the user can fix, or 130 on Ctrl-C. Other exceptions are bugs and keep their traceback."""
    try:
        status = fn(*args, **kwargs)
    except (QwenkitError, FileNotFoundError) as e:
        print(f"qwenkit {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status or 0
