"""A fine-tuning recipe: every key of `qwenkit finetune`, its default, its meaning and its check.

A recipe comes from a YAML file, `key=value` overrides and `--key` flags, in that order. Values are
coerced to each key's type (so `lr: 1e-4`, which YAML reads as a string, is a float), and an
unknown key or a bad value is an error that names the key. Paths are not checked here: a recipe
can be validated on a machine that does not hold the model.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from qwenkit.errors import RecipeError
from qwenkit.gguf import is_gguf
from qwenkit.lora import ALL_LINEAR


def _key(default, doc: str, **kw):
    return field(default=default, metadata={"doc": doc, **kw})


def _list_key(default, doc: str):
    return field(default_factory=lambda: list(default), metadata={"doc": doc})


@dataclass
class FinetuneConfig:
    # What to train, on what.
    model: str = _key("", "base checkpoint folder (HF format), or a hub id where a hub is reachable")
    data: str = _key("", "training data: a JSONL, JSON or CSV file, or a folder saved by `datasets`")
    val_data: str | None = _key(None, "validation data file (default: a fraction of `data`, see val_fraction)")
    val_fraction: float = _key(0.0, "fraction of `data` held out for validation when val_data is not given")
    format: Literal["auto", "alpaca", "sharegpt", "openai"] = _key(
        "auto",
        "data format: alpaca (instruction/input/output), sharegpt (conversations of from/value), "
        "openai (messages of role/content), or auto (detected from the first row)",
    )
    skip_bad_rows: bool = _key(False, "skip (and count) malformed rows instead of stopping at the first one")
    output: str = _key("", "output folder: adapter or checkpoint, metrics.jsonl, loss.png, checkpoints/")

    # Strategy.
    method: Literal["full", "lora", "freeze"] = _key(
        "lora", "full: every weight; lora: low-rank adapters; freeze: only train_layers"
    )
    lora_r: int = _key(16, "LoRA rank")
    lora_alpha: float = _key(32.0, "LoRA alpha: updates are scaled by alpha / r")
    lora_dropout: float = _key(0.05, "dropout on the LoRA input")
    lora_targets: list[str] = _list_key(ALL_LINEAR, "modules that get adapters (or 'all-linear')")
    train_layers: int | list[str] | None = _key(
        None,
        "freeze: train only the top N decoder layers (with the final norm and an untied lm_head), "
        "or a list of module names / globs (e.g. model.layers.*.mlp); lora: adapt only the top N layers",
    )
    unfreeze_every: int = _key(
        0,
        "gradual unfreezing: start with the top layer group, unfreeze one more every "
        "K steps or epochs (see unfreeze_unit); 0: off",
    )
    unfreeze_unit: Literal["steps", "epochs"] = _key("steps", "unit of unfreeze_every")
    unfreeze_group_size: int = _key(1, "decoder layers per unfreezing group")
    layer_lr_decay: float = _key(
        1.0,
        "layer-wise lr decay: lr x decay^depth, depth 0 for the top layer, "
        "the final norm and lm_head, L for the embeddings; 1: off",
    )

    # Optimization.
    optimizer: Literal["adamw", "adam", "sgd"] = _key("adamw", "optimizer (sgd uses momentum)")
    lr: float = _key(2e-4, "peak learning rate")
    weight_decay: float = _key(0.0, "weight decay (never on biases and norm weights)")
    momentum: float = _key(0.9, "SGD momentum")
    betas: list[float] = _list_key((0.9, 0.999), "Adam/AdamW betas")
    scheduler: Literal["cosine", "linear", "constant"] = _key("cosine", "learning-rate schedule after warmup")
    warmup_steps: int = _key(0, "linear warmup steps")
    max_steps: int = _key(0, "optimizer steps to run; 0: epochs x steps per epoch")
    epochs: int = _key(1, "passes over the training data, when max_steps is 0")
    batch_size: int = _key(4, "sequences per micro-batch on each process")
    grad_accum: int = _key(1, "micro-batches per optimizer step")
    max_grad_norm: float = _key(1.0, "gradient clipping norm; 0: no clipping")
    label_smoothing: float = _key(0.0, "label smoothing of the cross-entropy")
    max_seq_len: int = _key(2048, "tokens per sequence; longer rows are truncated (and counted)")
    packing: bool = _key(False, "pack several samples into each sequence (positions restart, no attention across)")
    grad_checkpointing: bool = _key(False, "recompute each block's activations in backward to save memory")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = _key(
        "auto",
        "fp32; bf16-mixed: fp32 weights, bf16 compute; bf16: bf16 base weights (LoRA/freeze keep their "
        "trained weights in fp32); auto: fp32 on CPU, bf16 for lora/freeze and bf16-mixed for full on GPU",
    )

    # Evaluation, checkpoints, runs.
    eval_every: int = _key(0, "evaluate the validation loss every N steps (and at the end); 0: only at the end")
    save_every: int = _key(0, "write a resumable checkpoint every N steps; 0: never")
    keep_last: int = _key(2, "resumable checkpoints to keep")
    checkpoint_format: Literal["auto", "full", "sharded"] = _key(
        "auto",
        "resumable checkpoints under FSDP: full (gathered on rank 0) or sharded (one file per rank, "
        "resumed with the same number of processes); auto: sharded when distributed",
    )
    early_stop_patience: int = _key(0, "stop after N evaluations without a better validation loss; 0: off")
    resume: bool = _key(False, "continue from the last checkpoint in output/checkpoints")
    seed: int = _key(0, "random seed: data order, validation split, adapter init, dropout")
    device: str = _key("auto", "cpu, cuda, cuda:N, or auto (the local GPU when there is one)")

    def __post_init__(self):
        validate(self)


KEYS = [f.name for f in dataclasses.fields(FinetuneConfig)]
TYPES = get_type_hints(FinetuneConfig)  # {key: its annotation}, the types values are coerced to
REQUIRED = ("model", "data", "output")


def check_keys(keys: Iterable, file: str | os.PathLike | None = None) -> None:
    """Raise a RecipeError for the first key that is not a recipe key, with the closest one as a hint.

    Args:
        keys: the keys given (in a YAML file, a mapping, or on the command line).
        file: the recipe file they come from, named in the error.
    """
    for k in keys:
        if k not in KEYS:
            close = difflib.get_close_matches(str(k), KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"unknown key '{k}'{hint}", file=file)


def _is_text(key: str) -> bool:
    """Whether a key's value is a plain string (`str`, `str | None` or a Literal of words)."""
    kind = TYPES[key]
    if kind is str or get_origin(kind) is Literal:
        return True
    options = [a for a in get_args(kind) if a is not type(None)]
    return get_origin(kind) in (Union, types.UnionType) and options == [str]


def parse_value(key: str, text: str) -> Any:
    """A value typed on a command line (`key=value` or `--key value`), read as YAML reads it
    (`[q_proj, v_proj]` is a list, `1.0e-3` a number), except that a key whose value is a string
    keeps the text as typed: a path named `no` or `1.5` is not a bool or a number. `validate` then
    coerces it to the key's type, as it does a YAML file's values.

    Args:
        key: a recipe key.
        text: its value as typed.
    """
    if _is_text(key):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _bad(key: str, why: str):
    raise RecipeError(f"key '{key}': {why}")


def _number(key: str, value: Any, kind: type) -> int | float:
    """`value` as an int or a float: a number (an integral float for an int) or its text; a bool
    is neither."""
    if not isinstance(value, bool):
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) or (kind is float and isinstance(value, float)):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
    _bad(key, f"must be {'an integer' if kind is int else 'a number'}; got {value!r}")


def _coerce(key: str, value: Any, kind) -> Any:
    """`value` as type `kind` (from the dataclass annotation), or a RecipeError naming the key."""
    origin, args = get_origin(kind), get_args(kind)
    if origin is Literal:
        if isinstance(value, str) and value.lower() in args:
            return value.lower()
        _bad(key, f"must be one of {', '.join(map(str, args))}; got {value!r}")
    if args and type(None) in args:  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        rest = [a for a in args if a is not type(None)]
        for a in rest:
            try:
                return _coerce(key, value, a)
            except RecipeError:
                pass
        _bad(key, f"got {value!r}; expected " + " or ".join(_type_name(a) for a in rest))
    if origin is list:
        (item,) = args
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            _bad(key, f"must be a list of {_type_name(item)}; got {value!r}")
        return [_coerce(key, v, item) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        _bad(key, f"must be true or false; got {value!r}")
    if kind in (int, float):
        return _number(key, value, kind)
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        _bad(key, f"must be a string; got {value!r}")
    raise TypeError(f"no coercion for {kind}")


def _type_name(kind) -> str:
    if get_origin(kind) is list:
        return f"a list of {_type_name(get_args(kind)[0])}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(kind, str(kind))


def validate(c: FinetuneConfig) -> None:
    """Coerce every field to its type and check its range; errors name the key."""
    for f in dataclasses.fields(c):
        setattr(c, f.name, _coerce(f.name, getattr(c, f.name), TYPES[f.name]))

    def positive(*keys):
        for k in keys:
            if getattr(c, k) <= 0:
                _bad(k, f"must be positive; got {getattr(c, k)!r}")

    def non_negative(*keys):
        for k in keys:
            if getattr(c, k) < 0:
                _bad(k, f"must be >= 0; got {getattr(c, k)!r}")

    positive(
        "lora_r",
        "lora_alpha",
        "lr",
        "batch_size",
        "grad_accum",
        "max_seq_len",
        "unfreeze_group_size",
        "epochs",
        "keep_last",
    )
    non_negative(
        "weight_decay",
        "warmup_steps",
        "max_steps",
        "max_grad_norm",
        "eval_every",
        "save_every",
        "early_stop_patience",
        "unfreeze_every",
        "momentum",
    )
    if not 0 <= c.val_fraction < 1:
        _bad("val_fraction", f"must be in [0, 1); got {c.val_fraction!r}")
    if not 0 <= c.lora_dropout < 1:
        _bad("lora_dropout", f"must be in [0, 1); got {c.lora_dropout!r}")
    if not 0 <= c.label_smoothing < 1:
        _bad("label_smoothing", f"must be in [0, 1); got {c.label_smoothing!r}")
    if not 0 < c.layer_lr_decay <= 1:
        _bad("layer_lr_decay", f"must be in (0, 1]; got {c.layer_lr_decay!r}")
    if len(c.betas) != 2 or not all(0 <= b < 1 for b in c.betas):
        _bad("betas", f"must be two numbers in [0, 1); got {c.betas!r}")
    if c.max_seq_len < 8:
        _bad("max_seq_len", f"must be at least 8 tokens; got {c.max_seq_len}")
    if is_gguf(c.model):  # quantized blocks are for inference: no QLoRA-style training
        _bad(
            "model",
            f"{c.model!r} is a GGUF file, whose quantized weights qwenkit runs for inference only; train on "
            "the full-precision checkpoint folder (or the folder `qwenkit convert gguf` writes from the file), "
            "then run the adapter on the GGUF file (qwenkit generate --model FILE.gguf --adapter OUTPUT)",
        )
    targets = c.lora_targets
    if not targets:
        _bad("lora_targets", "is empty")
    if targets != ["all-linear"]:
        unknown = [t for t in targets if t not in ALL_LINEAR]
        if unknown:
            extra = (
                " (the LM head is not adapted: the model computes it from output_weight())"
                if "lm_head" in unknown
                else ""
            )
            _bad(
                "lora_targets",
                f"unknown module {unknown[0]!r}; choose from {', '.join(ALL_LINEAR)} or all-linear{extra}",
            )
    tl = c.train_layers
    if isinstance(tl, int) and tl <= 0:
        _bad("train_layers", f"must be a positive number of layers, or module names; got {tl}")
    if isinstance(tl, list) and not tl:
        _bad("train_layers", "is an empty list")
    if c.method == "freeze" and tl is None:
        _bad("train_layers", "is required with method: freeze (the top N layers, or module names)")
    if c.method == "lora" and isinstance(tl, list):
        _bad("train_layers", "with method: lora must be a number of top layers to adapt, not module names")
    if c.method == "full" and tl is not None:
        _bad("train_layers", "is for method: freeze or lora; method: full trains every layer")
    if c.early_stop_patience and not (c.eval_every and (c.val_data or c.val_fraction)):
        _bad("early_stop_patience", "needs eval_every > 0 and validation data (val_data or val_fraction)")
    if c.eval_every and not (c.val_data or c.val_fraction):
        _bad("eval_every", "needs validation data: set val_data or val_fraction")


def check_required(c: FinetuneConfig) -> None:
    """The keys without which nothing can run (not checked by `validate`, so that partial recipes,
    e.g. a YAML that the command line completes, still load)."""
    for k in REQUIRED:
        if not getattr(c, k):
            _bad(k, f"is required (set it in the YAML, as {k}=..., or with --{k.replace('_', '-')})")


def build_config(values: dict[str, Any]) -> FinetuneConfig:
    """A FinetuneConfig from a mapping of keys; unknown keys and bad values raise RecipeError.

    Args:
        values: {key: value}, as read from YAML or the command line.
    """
    if not isinstance(values, dict):
        raise RecipeError(f"a recipe must be a mapping of keys to values, got {type(values).__name__}")
    check_keys(values)
    return FinetuneConfig(**values)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a recipe file; errors name the file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError("no such recipe file", file=p) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise RecipeError(f"not valid YAML ({getattr(e, 'problem', e)})", file=p, line=line) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping of keys to values, got {type(data).__name__}", file=p)
    return data


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """A recipe file plus overrides (the later win), validated.

    Args:
        path: a YAML recipe, or None.
        overrides: {key: value} applied on top (values may be strings, as typed on a command line).
    """
    values = read_yaml(path) if path else {}
    if path:
        # The file alone must be a valid (partial) recipe, so that its errors name the file.
        try:
            build_config(values)
        except RecipeError as e:
            raise RecipeError(e.message, file=path, line=e.line, field=e.field) from None
    values.update(overrides or {})
    return build_config(values)


def to_dict(c: FinetuneConfig) -> dict[str, Any]:
    return dataclasses.asdict(c)


__all__ = [
    "FinetuneConfig",
    "KEYS",
    "TYPES",
    "RecipeError",
    "build_config",
    "check_keys",
    "check_required",
    "load_config",
    "parse_value",
    "read_yaml",
    "to_dict",
    "validate",
]
