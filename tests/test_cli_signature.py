"""The CLI's flags come from typed Python: a function's signature and `Args:` docstring, or a
dataclass's fields (the machinery that makes `finetune`'s recipe keys flags); and every command runs
under the one error handler."""

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest

from qwenkit.cli import COMMANDS, main
from qwenkit.cli.signature import (
    Flags,
    Negation,
    add_command,
    add_params,
    arg_help,
    dataclass_params,
    function_params,
)
from qwenkit.errors import ConfigError, UserError


def command(
    path: str,
    extra: str | None = None,
    *,
    out: str,
    mode: Literal["fast", "exact"] = "exact",
    steps: int = 3,
    scale: float | None = None,
    tag: list[str] | None = None,
    verbose: bool = False,
    chat: Annotated[bool, Negation("--raw")] = True,
    from_: str | None = None,
) -> int:
    """Do a thing.

    More words for --help.

    Args:
        path: the input.
        extra: a second input,
            said on two lines.
        out: where it goes.
        mode: how.
        steps: how many.
        scale: a factor.
        tag: a label (repeat for several).
        verbose: say more.
        chat: chat or raw.
        from_: the source.
    """
    return 0


def parser_for(fn) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    add_command(parser.add_subparsers(dest="command"), "cmd", fn)
    return parser


def test_a_signature_becomes_flags():
    parse = lambda *argv: vars(parser_for(command).parse_args(["cmd", *argv]))  # noqa: E731
    assert parse("in", "--out", "o") == {
        "command": "cmd",
        "path": "in",
        "extra": None,
        "out": "o",
        "mode": "exact",
        "steps": 3,
        "scale": None,
        "tag": None,
        "verbose": False,
        "chat": True,
        "from_": None,
    }
    args = parse("in", "more", "--out", "o", "--mode", "fast", "--steps", "5", "--scale", "0.5", "--tag", "a")
    assert (args["extra"], args["mode"], args["steps"], args["scale"], args["tag"]) == ("more", "fast", 5, 0.5, ["a"])
    args = parse("in", "--out", "o", "--tag", "a", "--tag", "b", "--verbose", "--raw", "--from", "fr")
    assert (args["tag"], args["verbose"], args["chat"], args["from_"]) == (["a", "b"], True, False, "fr")
    assert parse("in", "--out", "o", "--no-verbose", "--chat")["chat"] is True
    for bad in (["in"], ["in", "--out", "o", "--mode", "slow"], ["in", "--out", "o", "--steps", "x"]):
        with pytest.raises(SystemExit):
            parse(*bad)


def test_the_docstring_becomes_help():
    assert arg_help(command.__doc__)["extra"] == "a second input, said on two lines."
    sub = parser_for(command)._subparsers._group_actions[0].choices["cmd"]
    text = sub.format_help()
    assert "Do a thing." in text and "More words for --help." in text and "Args:" not in text
    assert "how many. (default: 3)" in " ".join(text.split())
    assert "the opposite of --chat" in text


@dataclass
class Recipe:
    model: str = field(default="", metadata={"doc": "the model"})
    method: Literal["full", "lora"] = field(default="lora", metadata={"doc": "how to train"})
    lr: float = field(default=2e-4, metadata={"doc": "learning rate"})
    packing: bool = field(default=False, metadata={"doc": "pack samples"})
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={"doc": "modules"})
    layers: int | list[str] | None = field(default=None, metadata={"doc": "N or names"})


def test_a_dataclass_becomes_flags():
    params = dataclass_params(Recipe)
    assert [p.name for p in params] == [f.name for f in dataclasses.fields(Recipe)]
    assert params[4].default == ["q_proj", "v_proj"] and params[4].help == "modules"
    parser = argparse.ArgumentParser()
    add_params(parser, params)
    assert vars(parser.parse_args([])) == dataclasses.asdict(Recipe())
    args = parser.parse_args(["--lr", "1e-3", "--packing", "--targets", "o_proj", "--layers", "2"])
    assert (args.lr, args.packing, args.targets, args.layers) == (1e-3, True, ["o_proj"], "2")  # replaced, not appended
    assert Recipe().targets == ["q_proj", "v_proj"]  # the default list is untouched
    assert "modules (default: q_proj,v_proj)" in " ".join(parser.format_help().split())
    with pytest.raises(SystemExit):
        parser.parse_args(["--method", "freeze"])


def test_dataclass_flags_can_leave_out_what_was_not_given():
    parser = argparse.ArgumentParser()
    add_params(parser, dataclass_params(Recipe), suppress_defaults=True)
    assert vars(parser.parse_args(["--method", "full", "--no-packing", "--targets", "a"])) == {
        "method": "full",
        "packing": False,
        "targets": ["a"],
    }
    assert "learning rate (default: 0.0002)" in parser.format_help()


def test_dataclass_flags_can_be_left_as_text_for_the_caller_to_read():
    parser = argparse.ArgumentParser()
    add_params(parser, dataclass_params(Recipe), suppress_defaults=True, as_text=True)
    argv = ["--lr", "fast", "--method", "LoRA", "--packing", "--targets", "o_proj,v_proj", "--layers", "2"]
    assert vars(parser.parse_args(argv)) == {
        "lr": "fast",  # the caller's check words the error
        "method": "LoRA",  # choices are shown, not checked
        "packing": True,  # a switch stays a switch
        "targets": "o_proj,v_proj",  # one value, not a repeated flag
        "layers": "2",
    }
    text = " ".join(parser.format_help().split())
    assert "--method {full,lora}" in text and "--targets TARGETS,..." in text and "(default: lora)" in text


def test_every_finetune_key_becomes_a_flag():
    from qwenkit.finetune.config import FinetuneConfig

    params = dataclass_params(FinetuneConfig)
    assert params and all(p.help for p in params)
    parser = argparse.ArgumentParser()
    add_params(parser, params, suppress_defaults=True)
    args = parser.parse_args(["--method", "full", "--max-steps", "5", "--lr", "1e-3", "--packing"])
    assert vars(args) == {"method": "full", "max_steps": 5, "lr": 1e-3, "packing": True}


def test_every_command_has_its_flags_documented():
    for name, fn in COMMANDS.items():
        params = function_params(fn)
        assert fn.__doc__ and all(p.help for p in params), name


def test_one_handler_for_every_command(monkeypatch, capsys):
    def failing(*, error: str = "config") -> int:
        """Fail."""
        raise {
            "config": ConfigError("bad field", file="config.json", field="hidden_size"),
            "missing": FileNotFoundError(2, "No such file or directory", "x.yaml"),
            "interrupt": KeyboardInterrupt(),
            "bug": RuntimeError("a bug"),
        }[error]

    monkeypatch.setitem(COMMANDS, "fail", failing)
    assert main(["fail"]) == 2
    assert capsys.readouterr().err == "qwenkit fail: error: config.json: hidden_size: bad field\n"
    assert main(["fail", "--error", "missing"]) == 2
    assert capsys.readouterr().err.startswith("qwenkit fail: error: [Errno 2] No such file or directory")
    assert main(["fail", "--error", "interrupt"]) == 130
    with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback
        main(["fail", "--error", "bug"])


def test_finetune_runs_under_the_same_handler(capsys):
    assert main(["finetune", "lora_rank=8"]) == 2
    assert capsys.readouterr().err.startswith("qwenkit finetune: error: unknown key 'lora_rank'")
    assert main(["finetune", "--dry-run", "model=m", "data=d.jsonl", "output=o", "--max-steps", "7"]) == 0
    assert "max_steps: 7\n" in capsys.readouterr().out


@dataclass(frozen=True)
class Knobs:
    """Flags several commands share.

    Args:
        size: how big.
        rate: how fast.
        loud: make noise.
        mode: which way.
    """

    size: int | None = None
    rate: float = 1.0
    loud: bool = False
    mode: Literal["a", "b"] = "a"

    def __post_init__(self):
        if self.size is not None and self.size < 1:
            raise UserError(f"--size must be at least 1, got {self.size}")


def knobbed(path: str, *, knobs: Annotated[Knobs, Flags("rate", "size", "loud")] = Knobs(size=3), after: int = 0):
    """Turn the knobs.

    Args:
        path: the input.
        size: how big, for this command.
        after: a flag after the group.
    """
    return 0


def test_a_dataclass_parameter_becomes_flags_in_its_place():
    parser = parser_for(knobbed)
    assert vars(parser.parse_args(["cmd", "p"])) == {"command": "cmd", "path": "p", "knobs": Knobs(size=3), "after": 0}
    args = parser.parse_args(["cmd", "p", "--size", "5", "--loud", "--rate", "0.5", "--after", "1"])
    assert args.knobs == Knobs(size=5, rate=0.5, loud=True) and args.after == 1
    assert parser.parse_args(["cmd", "p", "--loud", "--no-loud"]).knobs.loud is False
    assert Knobs().size is None  # the default instance is replaced, not changed
    with pytest.raises(SystemExit):
        parser.parse_args(["cmd", "p", "--mode", "b"])  # a field not named is no flag
    text = " ".join(parser._subparsers._group_actions[0].choices["cmd"].format_help().split())
    # in the parameter's place and the order named; the command's help, else the dataclass's
    assert "[--rate RATE] [--size SIZE] [--loud | --no-loud] [--after AFTER] path" in text
    assert "how big, for this command. (default: 3)" in text and "how fast. (default: 1.0)" in text
    assert [p.name for p in function_params(knobbed)] == ["path", "rate", "size", "loud", "after"]


def test_a_value_the_dataclass_refuses_is_a_usage_error(capsys):
    parser = parser_for(knobbed)
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["cmd", "p", "--size", "0"])
    assert exit.value.code == 2 and "error: --size must be at least 1, got 0" in capsys.readouterr().err


def test_dataclass_parameter_flags_can_leave_out_what_was_not_given():
    parser = argparse.ArgumentParser()
    add_params(parser, function_params(knobbed), suppress_defaults=True)
    assert vars(parser.parse_args(["p"])) == {"path": "p"}
    assert vars(parser.parse_args(["p", "--rate", "2"])) == {"path": "p", "knobs": Knobs(size=3, rate=2.0)}
