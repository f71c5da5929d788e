"""argparse from typed Python: a function's signature and the `Args:` section of its docstring, or a
dataclass's fields and their `doc` metadata, become an argument parser.

The rules, the same for both:
- a positional parameter is a positional argument (optional when it has a default); a keyword-only
  one (or a field) is a flag, required when it has no default;
- `X | None` is an optional X; `Literal[...]` gives the choices; `list[X]` is a flag repeated for
  several values; `bool` is `--x/--no-x`, and `Annotated[bool, Negation("--raw")]` names the off
  switch; a union of several types (`int | list[str]`) is read as a string, for the caller to parse;
- `from_` is `--from` (a trailing underscore keeps a Python keyword out of the way), `max_new_tokens`
  is `--max-new-tokens`.

A caller that reads values with its own rules (a recipe, whose `--key value` must mean what
`key=value` means) asks for them as text: switches stay booleans, `Literal` choices are shown but
not checked, and a list is one value for the caller to split.

Flags that several commands share (the sampling flags, say) are the fields of one dataclass: a
parameter `sampling: Annotated[Sampling, Flags("temperature", "seed")] = Sampling(...)` is a flag
per field named, in its place, and the command gets one instance (see `Flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from qwenkit.errors import QwenkitError

REQUIRED = inspect.Parameter.empty  # the default of a parameter that has none


class Negation:
    """`Annotated[bool, Negation("--raw")]`: the flag's off switch has its own name."""

    def __init__(self, flag: str):
        self.flag = flag


class Flags:
    """`Annotated[SomeDataclass, Flags("a", "b")]`: a parameter given as flags, one per field named
    (every field when none is), in that order and in the parameter's place.

    The parameter's default, an instance, gives each flag's default (a command sets its own), and
    the command gets that instance with the fields given on the command line replaced. A flag's
    help is the command's `Args:` entry for the field, else the dataclass's: its docstring's `Args:`
    entry or the field's `doc` metadata.
    """

    def __init__(self, *fields: str):
        self.fields = fields


@dataclass(frozen=True)
class Group:
    """The `Flags` parameter a flag sets a field of, and that parameter's default instance."""

    name: str
    default: Any


@dataclass(frozen=True)
class Param:
    """One argument to be: its Python name, annotation, default (REQUIRED when none), help text, and
    whether it is positional."""

    name: str
    annotation: Any
    default: Any = REQUIRED
    help: str = ""
    positional: bool = False
    group: Group | None = None  # set for a field of a `Flags` parameter

    @property
    def flag(self) -> str:
        return "--" + self.name.rstrip("_").replace("_", "-")


def function_params(fn: Callable) -> list[Param]:
    """The parameters of a typed function, with their help from its docstring's `Args:` section; a
    `Flags` parameter is one per field it names."""
    helps = arg_help(inspect.getdoc(fn) or "")
    hints = typing.get_type_hints(fn, include_extras=True)
    params = []
    for p in inspect.signature(fn).parameters.values():
        flags = next((m for m in getattr(hints[p.name], "__metadata__", ()) if isinstance(m, Flags)), None)
        if flags is None:
            params.append(
                Param(p.name, hints[p.name], p.default, helps.get(p.name, ""), p.kind is p.POSITIONAL_OR_KEYWORD)
            )
        else:
            params += _group_params(p.name, typing.get_args(hints[p.name])[0], p.default, flags, helps)
    return params


def _group_params(name: str, cls: type, default: Any, flags: Flags, helps: dict[str, str]) -> list[Param]:
    """The flags of a `Flags` parameter: the fields named, their defaults the default instance's."""
    default = cls() if default is REQUIRED else default
    fields = {p.name: p for p in dataclass_params(cls)}
    unknown = [f for f in flags.fields if f not in fields]
    if unknown:
        raise TypeError(f"{name}: {cls.__name__} has no field {', '.join(unknown)}")
    own = arg_help(inspect.getdoc(cls) or "")  # the dataclass's `Args:`, where it documents its fields
    group = Group(name, default)
    return [
        dataclasses.replace(
            fields[f], default=getattr(default, f), help=helps.get(f) or own.get(f) or fields[f].help, group=group
        )
        for f in flags.fields or fields
    ]


def dataclass_params(cls: type, doc_key: str = "doc") -> list[Param]:
    """The fields of a dataclass as flags, each field's help from `field(metadata={doc_key: ...})`."""
    hints = typing.get_type_hints(cls, include_extras=True)
    params = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        params.append(Param(f.name, hints[f.name], default, f.metadata.get(doc_key, "")))
    return params


def arg_help(doc: str) -> dict[str, str]:
    """The `Args:` section of a docstring: {name: help}, continuation lines joined."""
    helps: dict[str, str] = {}
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    name = None
    for line in section.splitlines():
        m = re.match(r"\s{4,8}(\w+):\s*(.*)", line)
        if m and len(line) - len(line.lstrip()) <= 8:
            name = m.group(1)
            helps[name] = m.group(2)
        elif name and line.strip():
            helps[name] += " " + line.strip()
    return helps


class _Repeat(argparse.Action):
    """A repeatable flag: its values replace the default list. (argparse's "append" would add them
    to the default.)"""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, self.dest, None)
        given = [] if given is None or given is self.default else given
        setattr(namespace, self.dest, [*given, values])


class _Field(argparse.Action):
    """A flag of a `Flags` parameter: its value replaces one field of the instance at `dest`."""

    def __init__(self, option_strings, dest, *, group: Group, field: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.group, self.field = group, field

    def __call__(self, parser, namespace, values, option_string=None):
        _set_field(self, parser, namespace, values)


class _SwitchField(argparse.BooleanOptionalAction):
    """A boolean field of a `Flags` parameter: --x sets it, --no-x clears it."""

    def __init__(self, option_strings, dest, *, group: Group, field: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.group, self.field = group, field

    def __call__(self, parser, namespace, values, option_string=None):
        _set_field(self, parser, namespace, not option_string.startswith("--no-"))


def _set_field(action: _Field | _SwitchField, parser, namespace: argparse.Namespace, value: Any) -> None:
    """Replace the field; a value the dataclass refuses (a QwenkitError) is a usage error, as a bad type is."""
    instance = getattr(namespace, action.dest, action.group.default)  # absent with suppress_defaults
    try:
        setattr(namespace, action.dest, dataclasses.replace(instance, **{action.field: value}))
    except QwenkitError as e:
        parser.error(str(e))


def _options(p: Param, as_text: bool = False) -> dict:
    """argparse keywords for one parameter: its type (Optional unwrapped), Literal choices, lists (a
    repeatable flag), help with the default; with `as_text`, every value but a switch's is a string."""
    annotation = p.annotation
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    kind = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        kind = options[0] if len(options) == 1 else str
    text = p.help
    if p.default not in (None, REQUIRED, "") and "default" not in text:
        shown = ",".join(map(str, p.default)) if isinstance(p.default, (list, tuple)) else p.default
        text = f"{text} (default: {shown})"
    options: dict = {"help": text}
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if as_text:  # the caller checks the value, and words its error
            options["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        else:
            options["choices"] = choices
        kind = type(choices[0])
    if typing.get_origin(kind) is list and as_text:
        options["metavar"] = p.name.upper() + ",..."  # one value, for the caller to split
    elif typing.get_origin(kind) is list:
        options["action"] = _Repeat
        kind = typing.get_args(kind)[0]
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    else:
        options["type"] = str if as_text else kind
    return options


def add_params(
    parser: argparse.ArgumentParser, params: Sequence[Param], *, suppress_defaults: bool = False, as_text: bool = False
) -> None:
    """Add one argument per parameter.

    Args:
        parser: the parser (or argument group) to add to.
        params: from `function_params` or `dataclass_params`.
        suppress_defaults: leave a flag that was not given out of the parsed namespace instead of
            setting its default, for a caller that layers the flags over other settings (a YAML file).
        as_text: give every value but a switch's on as the string typed, for a caller that reads
            values with its own rules.
    """
    for p in params:
        options = _options(p, as_text)
        if p.group is not None:  # one field of a `Flags` parameter's instance
            _add_field(parser, p, options, argparse.SUPPRESS if suppress_defaults else p.group.default)
            continue
        default = argparse.SUPPRESS if suppress_defaults else p.default
        negation = next((m for m in getattr(p.annotation, "__metadata__", ()) if isinstance(m, Negation)), None)
        if negation is not None:  # --chat / --raw: two named switches for one boolean
            parser.add_argument(p.flag, dest=p.name, action="store_true", default=default, help=options["help"])
            parser.add_argument(negation.flag, dest=p.name, action="store_false", help=f"the opposite of {p.flag}")
        elif p.positional and p.default is REQUIRED:
            parser.add_argument(p.name, **options)
        elif p.positional:
            parser.add_argument(p.name, nargs="?", default=default, **options)
        elif p.default is REQUIRED:
            parser.add_argument(p.flag, dest=p.name, required=True, **options)
        else:
            parser.add_argument(p.flag, dest=p.name, default=default, **options)


def _add_field(parser: argparse.ArgumentParser, p: Param, options: dict, default: Any) -> None:
    """The flag of one field of a `Flags` parameter; its `default` is the parameter's instance."""
    action = options.pop("action", None)
    if action not in (None, argparse.BooleanOptionalAction):
        raise TypeError(f"{p.flag}: a list field cannot be one of a Flags parameter's flags")
    if action is None and "choices" not in options and "metavar" not in options:
        options["metavar"] = p.name.upper()  # as its own flag would show it, not the parameter's name
    kind = _Field if action is None else _SwitchField
    parser.add_argument(p.flag, dest=p.group.name, default=default, action=kind, group=p.group, field=p.name, **options)


def summary(fn: Callable) -> str:
    """The first paragraph of a function's docstring: its line in the list of commands."""
    return (inspect.getdoc(fn) or "").split("\n\n")[0]


def add_command(subparsers: argparse._SubParsersAction, name: str, fn: Callable) -> argparse.ArgumentParser:
    """A subcommand whose flags are `fn`'s parameters and whose --help is its docstring."""
    description = (inspect.getdoc(fn) or "").split("Args:")[0].strip()
    parser = subparsers.add_parser(
        name, help=summary(fn), description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_params(parser, function_params(fn))
    return parser
