"""LoRA: low-rank adapters injected into a built model, merged back, and saved in PEFT's format.

`apply_lora(model, ...)` replaces the chosen `nn.Linear` layers (attention and MLP projections) by
`LoRALinear`, which keeps the frozen base `weight`/`bias` under their original names and adds
`lora_A`/`lora_B`; the output is `W x + b + (alpha / r) * B A dropout(x)`. Because the base names
do not move, a LoRA model still loads and saves plain checkpoints, and the adapter's own names are
exactly PEFT's (`...q_proj.lora_A.weight`), so `adapter_model.safetensors` needs no key map beyond
PEFT's `base_model.model.` prefix.

A model whose projections are in GGUF blocks (`qwenkit.quant.QuantLinear`: a .gguf file loaded
as it is, or `qwenkit.quantize`) gets `QuantLoRALinear` layers instead, for inference: the quantized
layer's own forward (the native kernels, once qwenkit.cpu retypes it) plus the fp32 adapter. The
adapter's names are the same, so an adapter trained on the full-precision model loads unchanged.

`merge_lora(model)` folds each adapter into its base weight and puts plain `nn.Linear` layers back
(not into quantized blocks: merge into the full-precision checkpoint, then quantize that).
`save_adapter`/`load_adapter` read and write `adapter_config.json` + `adapter_model.safetensors`
that `peft.PeftModel.from_pretrained` loads on transformers' Qwen2ForCausalLM, and
`merge_checkpoint` is `qwenkit convert merge-lora`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.checkpoint import resolve_model_path
from qwenkit.errors import AdapterError
from qwenkit.files import atomic_path, atomic_write
from qwenkit.model import load_model
from qwenkit.quant import QuantLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Every linear layer of a Qwen2 block; PEFT's "all-linear" means the same set (never lm_head).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A linear layer with a trainable low-rank update: `W x + b + scaling * B(A(dropout(x)))`.

    `weight` and `bias` are the base layer's own parameters (shared, not copied) and stay frozen.
    `lora_A` starts as PEFT's Kaiming-uniform init and `lora_B` at zero, so a fresh adapter leaves
    the outputs unchanged. The adapter is kept in fp32 when the base weight is bf16/fp16, so that
    its optimizer updates are not lost to rounding.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise AdapterError(f"LoRA rank r must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        device, dtype = self._hold_base(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.reset_lora_parameters()

    def _hold_base(self, base: nn.Linear) -> tuple[torch.device, torch.dtype]:
        """Take the base layer's weight and bias as this layer's own, frozen; returns the device
        and dtype of the adapters."""
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        return w.device, torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else w.dtype

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        if self.lora_A.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = self.lora_A.weight
        dropped = None if isinstance(self.lora_dropout, nn.Identity) or not self.training else self.lora_dropout(x)
        if (
            adapter.dtype == self.weight.dtype == x.dtype
            and not self.weight.requires_grad
            and (self.bias is None or not self.bias.requires_grad)
            and not torch.is_autocast_enabled(x.device.type)
        ):
            return _LoRALinearFunction.apply(
                x, dropped, self.weight, self.bias, adapter, self.lora_B.weight, self.scaling
            )
        # A bf16 base under fp32 adapters (or a base weight that trains): the update in the adapter's
        # dtype, rounded once, then added
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        a = self.lora_A((x if dropped is None else dropped).to(adapter.dtype))  # (..., r)
        return y + (self.lora_B(a) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A, computed in fp32 and returned in the base weight's dtype."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (out, in)
        return (self.weight.float() + self.scaling * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


class QuantLoRALinear(LoRALinear):
    """A LoRA layer over a layer in GGUF blocks (qwenkit.quant.QuantLinear), for inference:
    `base_layer(x) + scaling * B(A(x))`, the adapters in fp32.

    Unlike LoRALinear, which borrows a float base's `weight` and computes the sum in one fused
    product, this keeps the quantized layer whole as a child, `base_layer` (PEFT's name for the
    layer it wraps), and calls its forward: there is no float weight to borrow, and the blocks are
    multiplied where they are, so qwenkit.cpu's retyping (`stream`, which walks every submodule)
    makes `base_layer` a StreamingQuantLinear and the native kernels run the base product. The
    adapters keep LoRALinear's names (`q_proj.lora_A.weight`), which are PEFT's, so an adapter
    trained on the full-precision model loads unchanged. The adapters' gradients are right (the base
    product is differentiable in x), but training is the full-precision model's (see qwenkit.finetune).
    """

    def _hold_base(self, base: QuantLinear) -> tuple[torch.device, torch.dtype]:
        self.base_layer = base
        for p in base.parameters():  # the bias
            p.requires_grad_(False)
        return base.blocks.device, torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out), in x's dtype
        a = self.lora_A(self.lora_dropout(x).to(torch.float32))  # (..., r)
        return y + (self.lora_B(a) * self.scaling).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        raise AdapterError(_quantized_merge_message(self.base_layer.qtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", base {self.base_layer.qtype}"


def _quantized_merge_message(qtype: str, name: str = "") -> str:
    return (
        f"{name + ': ' if name else ''}the base layer is quantized ({qtype} GGUF blocks), so the adapter cannot be "
        "merged into it without quantizing the merged weights again, which rounds every weight anew. "
        "Merge into the full-precision checkpoint instead (qwenkit convert merge-lora --model BASE --adapter "
        "ADAPTER --out MERGED), then quantize that (qwenkit quantize --model MERGED --out MERGED.gguf); or run "
        "the quantized model with the adapter unmerged, as it is"
    )


class _LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (x' A^T) B^T, with the base W, b frozen and x' = dropout(x) (None: x itself).

    Autograd over the plain ops keeps (N, out) temporaries for the product, the scaling and the sum,
    and, since x feeds both the base and the adapter, adds two (N, in) gradients for it. Here the
    update goes into the base product's output with one addmm, and d x = dy W + s (dy B) A is one
    product and one addmm into it: fewer temporaries and one pass less over the activations.
    """

    @staticmethod
    def forward(ctx, x, dropped, weight, bias, lora_a, lora_b, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        d2 = x2 if dropped is None else dropped.reshape(x2.shape)  # (N, in), the adapter's input
        a = d2 @ lora_a.t()  # (N, r)
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (N, out)
        y.addmm_(a, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(d2, a, weight, lora_a, lora_b)
        ctx.scaling, ctx.shared, ctx.shape = scaling, dropped is None, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        d2, a, weight, lora_a, lora_b = ctx.saved_tensors
        s, need = ctx.scaling, ctx.needs_input_grad
        dy = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
        dyb = dy @ lora_b  # (N, r)
        grad_x = grad_dropped = None
        if need[0]:
            grad_x = dy @ weight  # (N, in)
            if ctx.shared:
                grad_x.addmm_(dyb, lora_a, alpha=s)
            grad_x = grad_x.view(ctx.shape)
        if need[1]:
            grad_dropped = (dyb @ lora_a).mul_(s).view(ctx.shape)  # (N, in)
        grad_a = (dyb.t() @ d2).mul_(s) if need[4] else None  # (r, in)
        grad_b = (dy.t() @ a).mul_(s) if need[5] else None  # (out, r)
        return grad_x, grad_dropped, None, None, grad_a, grad_b, None


@dataclass
class LoraSettings:
    """What an adapter is: PEFT's LoraConfig fields that qwenkit implements.

    Args:
        r: the rank.
        alpha: the scale numerator (`lora_alpha`): updates are scaled by alpha / r.
        dropout: dropout on the adapter's input, in training.
        targets: module names (matched as PEFT does: the name, or its last components), or
            "all-linear" for every attention and MLP projection.
        layers: indices of the decoder layers to adapt (None: all), PEFT's `layers_to_transform`.
        use_rslora: scale by alpha / sqrt(r) (rank-stabilized LoRA).
        rank_pattern: {regex of a module name: r} exceptions, as PEFT writes them.
        alpha_pattern: {regex of a module name: alpha} exceptions.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: Sequence[str] | str = ALL_LINEAR
    layers: Sequence[int] | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def to_peft_config(self, base_model: str | None = None) -> dict:
        targets = sorted(ALL_LINEAR) if _is_all_linear(self.targets) else self.targets
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets if isinstance(targets, str) else sorted(set(targets)),
            "layers_to_transform": list(self.layers) if self.layers is not None else None,
            "layers_pattern": None,
            "use_rslora": self.use_rslora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "use_dora": False,
            "revision": None,
        }

    @classmethod
    def from_peft_config(cls, config: Mapping, where: str = ADAPTER_CONFIG) -> LoraSettings:
        def bad(key: str, why: str):
            raise AdapterError(f"{where}: '{key}' {why}")

        if config.get("peft_type", "LORA") != "LORA":
            bad("peft_type", f"is {config.get('peft_type')!r}; qwenkit loads LORA adapters")
        # Variants that change the forward pass: refuse them rather than load something else.
        if config.get("use_dora"):
            bad("use_dora", "is true; DoRA adapters are not supported")
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            bad("bias", f"is {config.get('bias')!r}; only adapters without trained biases are supported")
        if config.get("modules_to_save"):
            bad("modules_to_save", f"is {config['modules_to_save']!r}; fully trained extra modules are not supported")
        if config.get("fan_in_fan_out"):
            bad("fan_in_fan_out", "is true; that is for GPT-2 style Conv1D layers, not Qwen2")
        if config.get("layer_replication"):
            bad("layer_replication", "is set; not supported")
        for key in ("r", "lora_alpha", "target_modules"):
            if config.get(key) is None:
                bad(key, "is missing")
        layers = config.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        if config.get("layers_pattern") not in (None, "layers", ["layers"]):
            bad("layers_pattern", f"is {config['layers_pattern']!r}; Qwen2's decoder layers are 'layers'")
        return cls(
            r=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout") or 0.0),
            targets=config["target_modules"],
            layers=layers,
            use_rslora=bool(config.get("use_rslora")),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
        )


def _is_all_linear(targets) -> bool:
    return isinstance(targets, str) and targets.lower() in ("all-linear", "all_linear")


def _targeted(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's rule: a string is a regex over the full name; a list entry matches the name or its tail."""
    if _is_all_linear(targets):
        return name.rsplit(".", 1)[-1] in ALL_LINEAR
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _layer_index(name: str) -> int | None:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _pattern_value(name: str, patterns: Mapping[str, float], default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    targets: Sequence[str] | str = ALL_LINEAR,
    layers: Sequence[int] | None = None,
    use_rslora: bool = False,
    settings: LoraSettings | None = None,
) -> nn.Module:
    """Inject LoRA adapters into `model` in place, freeze every other parameter, and return it.

    Args:
        model: a QwenForCausalLM (or any module with Qwen2's layer names); its projections may
            be quantized (QuantLinear), for inference.
        r: the adapters' rank.
        alpha: scale numerator; updates are scaled by alpha / r.
        dropout: dropout probability on the adapters' input.
        targets: module names such as ["q_proj", "v_proj"], or "all-linear" (every attention and
            MLP projection; the LM head is never adapted, as in PEFT).
        layers: decoder layer indices to adapt (None: all).
        use_rslora: scale by alpha / sqrt(r) instead.
        settings: a LoraSettings, instead of the arguments above (as read from an adapter).
    """
    s = settings or LoraSettings(
        r=r, alpha=alpha, dropout=dropout, targets=targets, layers=layers, use_rslora=use_rslora
    )
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | QuantLinear)
        and _targeted(n, s.targets)
        and (s.layers is None or _layer_index(n) in set(s.layers))
    ]
    # Never the LM head, as in PEFT (nor the tied one that a quantized embedding holds).
    names = [n for n in names if not n.endswith("lm_head") and not n.startswith("model.embed_tokens.")]
    if not names:
        raise AdapterError(
            f"LoRA targets {s.targets!r} match no linear layer of the model"
            + (f" in layers {list(s.layers)}" if s.layers is not None else "")
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        rank = int(_pattern_value(name, s.rank_pattern, s.r))
        alpha_ = float(_pattern_value(name, s.alpha_pattern, s.alpha))
        base = getattr(parent, child)
        layer = QuantLoRALinear if isinstance(base, QuantLinear) else LoRALinear
        setattr(parent, child, layer(base, rank, alpha_, s.dropout, s.use_rslora))
    model.lora_settings = s
    return model


def lora_layers(model: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back (in place).

    Args:
        model: a model with LoRALinear layers; returned with none left. Layers over quantized
            blocks (QuantLoRALinear) are an AdapterError, raised before anything is merged.
    """
    quantized = [(name, layer) for name, layer in lora_layers(model) if isinstance(layer, QuantLoRALinear)]
    if quantized:
        name, layer = quantized[0]
        raise AdapterError(_quantized_merge_message(layer.base_layer.qtype, name))
    for name, layer in list(lora_layers(model)):
        parent_name, _, child = name.rpartition(".")
        w = layer.weight
        linear = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=w.dtype
        )
        linear.weight = nn.Parameter(layer.merged_weight(), requires_grad=False)
        if layer.bias is not None:
            linear.bias = layer.bias
        setattr(model.get_submodule(parent_name), child, linear)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


def initial_lora_weights(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """PEFT's initialization (A Kaiming-uniform, B zero) for every adapter, drawn from a generator
    seeded by `seed` and the layer's name: the same start on one process or many, whatever order
    the layers are built in, and on a model built on the meta device.

    Args:
        model: a model with LoRALinear layers.
        seed: the run's seed.
    """
    out = {}
    for name, layer in lora_layers(model):
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) weight
        out[f"{name}.lora_A.weight"] = torch.empty(layer.lora_A.weight.shape).uniform_(-bound, bound, generator=g)
        out[f"{name}.lora_B.weight"] = torch.zeros(layer.lora_B.weight.shape)
    return out


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under qwenkit's (= PEFT's in-file, unprefixed) names."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def save_adapter(
    out_dir: str | os.PathLike, state: Mapping[str, torch.Tensor], settings: LoraSettings, base_model: str | None = None
) -> Path:
    """Write adapter_config.json and adapter_model.safetensors as PEFT does.

    Args:
        out_dir: the folder (created if needed).
        state: the adapters' weights, from `lora_state_dict` (names without PEFT's prefix).
        settings: the LoraSettings the adapters were made with.
        base_model: recorded as `base_model_name_or_path`.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(out / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    _write_json(out / ADAPTER_CONFIG, settings.to_peft_config(base_model))
    return out


def save_model_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """`save_adapter` for a model that `apply_lora` adapted."""
    if not hasattr(model, "lora_settings"):
        raise AdapterError("the model has no LoRA adapters (apply_lora was not called on it)")
    return save_adapter(out_dir, lora_state_dict(model), model.lora_settings, base_model)


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
    """An adapter folder's settings and weights (names without PEFT's prefix)."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_file.exists():
        raise AdapterError(f"{folder}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
    if not weights_file.exists():
        pickled = (folder / "adapter_model.bin").exists()
        hint = " (adapter_model.bin is a pickle: convert it to safetensors)" if pickled else ""
        raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_file}: not valid JSON (line {e.lineno}: {e.msg})") from None
    settings = LoraSettings.from_peft_config(config, str(config_file))
    state = {}
    for key, tensor in load_file(str(weights_file)).items():
        name = key.removeprefix(PEFT_PREFIX)
        # PEFT writes plain names, but some exporters keep the adapter name ("lora_A.default.weight").
        name = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)
        state[name] = tensor
    return settings, state


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Apply the adapter of a PEFT folder to `model` (in place) and return it.

    Args:
        model: a QwenForCausalLM without adapters, full-precision or quantized (a .gguf file as
            loaded, or `qwenkit.quantize`d).
        adapter_dir: a folder with adapter_config.json and adapter_model.safetensors.
    """
    settings, state = read_adapter(adapter_dir)
    apply_lora(model, settings=settings)
    params = dict(model.named_parameters())
    weights_file = Path(adapter_dir) / ADAPTER_WEIGHTS
    expected = set(lora_state_dict(model))
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise AdapterError(f"{weights_file}: tensor '{unexpected[0]}' matches no adapted layer of this model")
    missing = sorted(expected - set(state))
    if missing:
        raise AdapterError(f"{weights_file}: no tensor for '{missing[0]}' ({len(missing)} missing)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise AdapterError(
                f"{weights_file}: tensor '{name}' has shape {list(tensor.shape)}, "
                f"the model needs {list(params[name].shape)}"
            )
        params[name].copy_(tensor)
    return model


def merge_checkpoint(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a Hugging Face checkpoint whose outputs equal the base model plus the adapter.

    Args:
        model_dir: the base checkpoint folder.
        adapter_dir: a PEFT LoRA adapter folder.
        out_dir: the merged checkpoint folder to write (weights in the base's dtype; tokenizer files
            copied from the base when it has them).
        dtype: the merged weights' dtype; default: the base checkpoint's `torch_dtype`.
    """
    base = resolve_model_path(model_dir)
    # Merge in fp32 and save in the checkpoint's own dtype, so the merge adds no rounding of its own.
    model = load_model(base, dtype=torch.float32)
    load_adapter(model, adapter_dir)
    merge_lora(model)
    save_dtype = dtype or getattr(torch, model.config.torch_dtype, torch.float32)
    model.save_pretrained(out_dir, dtype=save_dtype)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "added_tokens.json",
    ):
        if (base / name).exists():
            shutil.copyfile(base / name, Path(out_dir) / name)
    return Path(out_dir)


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


__all__ = [
    "ALL_LINEAR",
    "AdapterError",
    "LoRALinear",
    "LoraSettings",
    "QuantLoRALinear",
    "apply_lora",
    "load_adapter",
    "initial_lora_weights",
    "lora_state_dict",
    "merge_checkpoint",
    "merge_lora",
    "read_adapter",
    "save_adapter",
    "save_model_adapter",
]
