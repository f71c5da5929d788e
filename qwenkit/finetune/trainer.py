"""The one training loop, for every strategy: full, LoRA, freeze, gradual unfreezing, layer-wise lr.

`Trainer(cfg).setup().train()` (or `finetune(cfg)`) runs a recipe: set-up (process group, data,
model, which parameters train, optimizer, schedule, resume), then steps of gradient accumulation,
clipping and an optimizer update, with evaluation, early stopping, checkpoints and metrics. The
strategies differ only in `strategy.py`'s answer to "which parameters, at what lr, from when".

The model is built on the meta device and its weights read straight into their final place (into
each process's shard under FSDP), so a 7B checkpoint never sits in memory whole on every rank. The
loss is token-weighted over the whole global batch: each micro-batch's summed loss is divided by the
number of target tokens of the step on all processes, so any split of a batch over micro-batches and
processes gives the same gradient.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from qwenkit.checkpoint import iter_tensors, read_generation_config, resolve_model_path
from qwenkit.config import from_hf_config
from qwenkit.errors import DataError, RecipeError
from qwenkit.files import atomic_write
from qwenkit.finetune import resume
from qwenkit.finetune.batches import StepBatches, eval_batches, pack, tokenize
from qwenkit.finetune.config import FinetuneConfig, check_required, to_dict
from qwenkit.finetune.data import DataStats, load_conversations, split_validation
from qwenkit.finetune.distributed import (
    all_reduce_sum,
    assign_full,
    barrier,
    full_tensor,
    init_distributed,
    shard,
    shutdown,
)
from qwenkit.finetune.loss import CausalLMLoss
from qwenkit.finetune.plot import plot_losses, read_metrics
from qwenkit.finetune.strategy import (
    build_optimizer,
    build_scheduler,
    drop_locked_grads,
    lora_layer_indices,
    param_groups,
    set_unfrozen,
    trainable_names,
    unfrozen_groups,
)
from qwenkit.lora import apply_lora, initial_lora_weights, save_adapter
from qwenkit.model import IGNORE_INDEX, QwenForCausalLM, shift_labels
from qwenkit.tokenizer import load_tokenizer

METRICS = "metrics.jsonl"
# Keys that change the course of a run: resuming with any of them changed is refused. (The global
# batch, batch_size x grad_accum x processes, is checked as one number, so a run may resume on
# another number of processes from a full checkpoint.)
_TRAJECTORY_KEYS = (
    "model",
    "data",
    "val_data",
    "val_fraction",
    "format",
    "method",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "train_layers",
    "unfreeze_every",
    "unfreeze_unit",
    "unfreeze_group_size",
    "layer_lr_decay",
    "optimizer",
    "lr",
    "weight_decay",
    "momentum",
    "betas",
    "scheduler",
    "warmup_steps",
    "max_grad_norm",
    "label_smoothing",
    "max_seq_len",
    "packing",
    "precision",
    "seed",
)

Callback = Callable[["Trainer", dict], None]


class Trainer:
    """Runs one fine-tuning recipe. After `setup()`: `model`, `root` (model + loss), `optimizer`,
    `scheduler`, `batches`, `trained` (names), `step`; `train()` returns a summary dict.

    Args:
        cfg: the recipe.
        callbacks: called as `callback(trainer, record)` after every optimizer step, with the step's
            metrics record.
        progress: show a progress bar (rank 0 only).
    """

    def __init__(self, cfg: FinetuneConfig, callbacks: Sequence[Callback] = (), progress: bool = True):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.progress = progress
        self.step = 0
        self.best_eval: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.last_eval: float | None = None
        self.last_eval_step: int | None = None
        self.stopped_early = False
        self._bar = None

    # ---- set-up ------------------------------------------------------------------------------------

    def setup(self) -> Trainer:
        cfg = self.cfg
        check_required(cfg)
        self.dist = init_distributed(cfg.device)
        self.output = Path(cfg.output)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self._resolve_precision()
        self._setup_data()
        self._setup_model()
        groups = param_groups(self.model, self.trained, cfg)
        # Fused kernels: one pass over all parameters; not for FSDP's DTensors.
        fused = not self.dist.distributed and cfg.optimizer in ("adamw", "adam")
        self.optimizer = build_optimizer(groups, cfg, fused=fused)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self._prepare_output()
        return self

    def _resolve_precision(self) -> None:
        cfg, device = self.cfg, self.dist.device
        p = cfg.precision
        if p == "auto":
            p = "fp32" if device.type == "cpu" else ("bf16-mixed" if cfg.method == "full" else "bf16")
        self.precision = p
        self.frozen_dtype = torch.bfloat16 if p == "bf16" else torch.float32
        low = p in ("bf16", "bf16-mixed")
        # Under FSDP the gathered parameters are cast once per layer instead of autocasting each op.
        self.param_dtype = torch.bfloat16 if low and self.dist.distributed else None
        self.autocast = low and not self.dist.distributed

    def _tokenizer(self, folder: Path):
        if (folder / "tokenizer.json").exists():
            return load_tokenizer(folder)
        self.log(f"{folder} has no tokenizer.json: using the built-in Qwen2.5 tokenizer")
        return load_tokenizer()

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.model_dir = resolve_model_path(cfg.model)
        self.tok = self._tokenizer(self.model_dir)
        train_conv, tstats = load_conversations(cfg.data, cfg.format, cfg.skip_bad_rows, split=("train",))
        val_conv, vstats = [], None
        if cfg.val_data:
            val_conv, vstats = load_conversations(
                cfg.val_data, cfg.format, cfg.skip_bad_rows, split=("validation", "test", "train")
            )
        elif cfg.val_fraction:
            train_conv, val_conv = split_validation(train_conv, cfg.val_fraction, cfg.seed)
            tstats.rows = len(train_conv)
            vstats = DataStats(rows=len(val_conv), format=tstats.format)
        train = tokenize(self.tok, train_conv, cfg.max_seq_len, tstats)
        self.val_samples = tokenize(self.tok, val_conv, cfg.max_seq_len, vstats) if val_conv else []
        if not train:
            raise DataError(f"{cfg.data}: no training row has an assistant token within max_seq_len {cfg.max_seq_len}")
        if val_conv and not self.val_samples:
            raise DataError(
                f"{cfg.val_data or cfg.data}: no validation row has an assistant token within "
                f"max_seq_len {cfg.max_seq_len}"
            )
        self.log(tstats.summary("train"))
        if vstats is not None:
            self.log(vstats.summary("validation"))
        if cfg.packing:
            n = len(train)
            train = pack(train, cfg.max_seq_len, cfg.seed)
            self.log(f"packed {n} samples into {len(train)} sequences of at most {cfg.max_seq_len} tokens")
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.pad_id = pad
        self.batches = StepBatches(
            train, cfg.batch_size, cfg.grad_accum, self.dist.world_size, self.dist.rank, cfg.seed, pad
        )
        self.total_steps = cfg.max_steps or cfg.epochs * self.batches.steps_per_epoch

    def _setup_model(self) -> None:
        cfg, device = self.cfg, self.dist.device
        config = from_hf_config(self.model_dir)
        if config.vocab_size < len(self.tok):
            raise RecipeError(
                f"key 'model': the embedding has {config.vocab_size} rows, fewer than the tokenizer's "
                f"{len(self.tok)} tokens"
            )
        with torch.device("meta"):
            model = QwenForCausalLM(config)
        if cfg.method == "lora":
            apply_lora(
                model,
                r=cfg.lora_r,
                alpha=cfg.lora_alpha,
                dropout=cfg.lora_dropout,
                targets="all-linear" if cfg.lora_targets == ["all-linear"] else cfg.lora_targets,
                layers=lora_layer_indices(cfg, config.num_hidden_layers),
            )
        self.trained = trainable_names(model, cfg)
        if not self.trained:
            raise RecipeError("the recipe trains no parameter (check method and train_layers)")
        trained = set(self.trained)
        # Trained weights stay fp32 (an optimizer update below bf16's resolution would be lost).
        for module_name, module in model.named_modules():
            for pname, p in list(module._parameters.items()):
                if p is None:
                    continue
                full = f"{module_name}.{pname}" if module_name else pname
                dtype = torch.float32 if full in trained else self.frozen_dtype
                module._parameters[pname] = nn.Parameter(
                    torch.empty_like(p, dtype=dtype), requires_grad=full in trained
                )
        model.gradient_checkpointing = cfg.grad_checkpointing
        self.model = model
        self.root = CausalLMLoss(model, cfg.label_smoothing)
        if self.dist.distributed:
            shard(self.root, model.model.layers, self.param_dtype)
        self.root.to_empty(device=device)
        self._load_weights()
        model.model.rotary_emb.reset_buffers(device)
        model.generation_config = read_generation_config(self.model_dir)
        self.root.train()
        n_trained = sum(p.numel() for n, p in model.named_parameters() if n in trained)
        n_all = sum(p.numel() for p in model.parameters())
        self.log(
            f"model: {n_all / 1e6:.1f}M parameters, training {n_trained / 1e6:.2f}M ({cfg.method}); "
            f"{self.precision} on {device}"
            + (f" x {self.dist.world_size} processes (FSDP)" if self.dist.distributed else "")
        )

    @torch.no_grad()
    def _load_weights(self) -> None:
        """Read the base checkpoint into the (possibly sharded) parameters, then the adapters' init."""
        params = dict(self.model.named_parameters())
        lora = initial_lora_weights(self.model, self.cfg.seed)  # the adapters are not in the checkpoint
        expected = {name: p.shape for name, p in params.items() if name not in lora}
        # Read in fp32 where any parameter read is fp32 (so a trained weight is exact whatever the
        # checkpoint's dtype); in the frozen dtype where none is (LoRA in bf16: no fp32 copy).
        dtype = torch.float32 if any(params[n].dtype == torch.float32 for n in expected) else self.frozen_dtype
        for name, tensor in iter_tensors(self.model_dir, expected, dtype, self.model.config.tie_word_embeddings):
            assign_full(params[name], tensor)
        for name, tensor in lora.items():
            assign_full(params[name], tensor)

    def _prepare_output(self) -> None:
        cfg = self.cfg
        if self.dist.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            resume.remove_partial(self.output)
        barrier()
        found = resume.checkpoint_dirs(self.output)
        metrics = self.output / METRICS
        if cfg.resume and found:
            meta = resume.load_checkpoint(found[-1], self.model, self.optimizer, self.scheduler, self.dist)
            changed = [k for k in _TRAJECTORY_KEYS if meta["recipe"].get(k) != to_dict(cfg).get(k)]
            if changed:
                k = changed[0]
                raise RecipeError(
                    f"key '{k}': is {to_dict(cfg)[k]!r} but the run being resumed used "
                    f"{meta['recipe'][k]!r}; resume with the same value, or start a new output"
                )
            if meta.get("global_batch") != self.batches.global_batch:
                raise RecipeError(
                    f"key 'batch_size': the global batch (batch_size x grad_accum x processes) is "
                    f"{self.batches.global_batch}, the run being resumed used {meta.get('global_batch')}"
                )
            if meta["trained"] != self.trained:
                raise RecipeError(f"{found[-1]}: trains other parameters than this recipe")
            self.step = meta["step"]
            self.best_eval, self.best_step = meta.get("best_eval"), meta.get("best_step")
            self.bad_evals, self.last_eval = meta.get("bad_evals", 0), meta.get("last_eval")
            self.log(f"resumed from {found[-1]} (step {self.step} of {self.total_steps})")
        elif cfg.resume:
            self.log(f"resume: no checkpoint in {self.output / resume.CHECKPOINTS}, starting at step 0")
        elif found or metrics.exists():
            raise RecipeError(
                f"key 'output': {self.output} already holds a run ({METRICS} or {resume.CHECKPOINTS}/); "
                "set resume: true to continue it, or choose another output folder"
            )
        barrier()  # every rank has looked at the folder before rank 0 writes to it
        if self.dist.is_main:
            # Lines written after the checkpoint by the run that was killed are replaced by this one's.
            kept = [r for r in read_metrics(metrics) if r.get("step", 0) <= self.step]
            atomic_write(metrics, "".join(json.dumps(r) + "\n" for r in kept))

    # ---- the loop ----------------------------------------------------------------------------------

    def train(self) -> dict:
        """Run to max_steps (or the epochs), early stopping, or the end; write the outputs."""
        cfg = self.cfg
        if self.dist.is_main and self.progress:
            self._bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                unit="step",
                dynamic_ncols=True,
                desc="finetune",
                file=sys.stderr,
            )
        last = {}
        try:
            while self.step < self.total_steps and not self.stopped_early:
                last = self.train_step()
                for cb in self.callbacks:
                    cb(self, last)
                if cfg.eval_every and self.val_samples and self.step % cfg.eval_every == 0:
                    self._evaluate_and_track()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
            if self.val_samples and (self.last_eval_step != self.step):
                self._evaluate_and_track()
            self.save_output(self.output)
        finally:
            if self._bar is not None:
                self._bar.close()
        plotted = False
        if self.dist.is_main:
            plotted = plot_losses(self.output / METRICS, self.output / "loss.png")
            if not plotted:
                self.log("loss.png not drawn: matplotlib is not installed (pip install 'qwenkit[plot]')")
        summary = {
            "steps": self.step,
            "loss": last.get("loss"),
            "eval_loss": self.last_eval,
            "best_eval_loss": self.best_eval,
            "best_step": self.best_step,
            "stopped_early": self.stopped_early,
            "output": str(self.output),
            "loss_png": plotted,
        }
        evaluated = f", eval loss {self.last_eval:.4f}" if self.last_eval is not None else ""
        self.log(
            f"done: {self.step} steps{evaluated}"
            + (" (stopped early)" if self.stopped_early else "")
            + f"; output in {self.output}"
        )
        return summary

    def train_step(self) -> dict:
        """One optimizer step (grad_accum micro-batches on every process); returns its metrics record."""
        cfg, dist = self.cfg, self.dist
        epoch, _ = self.batches.position(self.step)
        set_unfrozen(self.optimizer, unfrozen_groups(cfg, self.step, epoch), toggle_requires_grad=not dist.distributed)
        t0 = time.perf_counter()
        micro = [self._to_device(b) for b in self.batches.micro_batches(self.step)]
        counts = torch.tensor(
            [
                float(sum((shift_labels(b["labels"]) != IGNORE_INDEX).sum() for b in micro)),
                float(sum(b["attention_mask"].sum() for b in micro)),
            ],
            dtype=torch.float64,
        )
        n_targets, n_tokens = all_reduce_sum(counts).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
        for i, batch in enumerate(micro):
            if dist.distributed:
                self.root.set_requires_gradient_sync(i == len(micro) - 1)
            with self._autocast():
                loss, _ = self.root(**batch)
            if loss.requires_grad:
                # Global token mean; FSDP averages gradients over processes, hence the world size.
                (loss * (dist.world_size / n_targets)).backward()
            loss_sum += loss.detach().double()
        loss_value = all_reduce_sum(loss_sum.cpu()).item() / n_targets
        drop_locked_grads(self.optimizer)
        grad_norm = self._clip()
        self.optimizer.step()
        top_lr = min(self.optimizer.param_groups, key=lambda g: g["depth"])["lr"]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        seconds = time.perf_counter() - t0
        record = {
            "step": self.step,
            "epoch": round(self.step / self.batches.steps_per_epoch, 4),
            "loss": loss_value,
            "lr": top_lr,
            "grad_norm": grad_norm,
            "tokens": int(n_tokens),
            "tokens_per_s": round(n_tokens / seconds, 1),
        }
        self._write_metrics(record)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{top_lr:.2e}", tok_s=f"{n_tokens / seconds:.0f}")
            self._bar.update(1)
        return record

    def _clip(self) -> float | None:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return None
        max_norm = self.cfg.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=not self.dist.distributed or None)
        return float(full_tensor(norm))

    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}

    # ---- evaluation, checkpoints, outputs ------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """The validation loss: mean cross-entropy over every validation target token."""
        self.root.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for batch in eval_batches(
            self.val_samples, self.cfg.batch_size, self.dist.world_size, self.dist.rank, self.pad_id
        ):
            with self._autocast():
                loss, n = self.root(**self._to_device(batch))
            total += torch.tensor([loss.item(), n.item()], dtype=torch.float64)
        self.root.train()
        loss_sum, count = all_reduce_sum(total).tolist()
        return loss_sum / max(count, 1)

    def _evaluate_and_track(self) -> None:
        loss = self.evaluate()
        self.last_eval, self.last_eval_step = loss, self.step
        improved = self.best_eval is None or loss < self.best_eval
        record = {"step": self.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 700))}
        self._write_metrics(record)
        self.log(
            f"step {self.step}: eval loss {loss:.4f} (ppl {record['eval_ppl']:.4g})"
            + (" best" if improved and self.best_eval is not None else "")
        )
        if improved:
            self.best_eval, self.best_step, self.bad_evals = loss, self.step, 0
            if self.cfg.eval_every:
                self.save_output(self.output / "best")
        else:
            self.bad_evals += 1
            if self.cfg.early_stop_patience and self.bad_evals >= self.cfg.early_stop_patience:
                self.stopped_early = True
                self.log(
                    f"early stop: {self.bad_evals} evaluations without improvement; best eval loss "
                    f"{self.best_eval:.4f} at step {self.best_step}, in {self.output / 'best'}"
                )

    def save_checkpoint(self) -> Path:
        """A resumable checkpoint of the current step (all ranks call this)."""
        fmt = self.cfg.checkpoint_format
        sharded = fmt == "sharded" or (fmt == "auto" and self.dist.distributed)
        info = {
            "best_eval": self.best_eval,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "last_eval": self.last_eval,
            "recipe": to_dict(self.cfg),
            "global_batch": self.batches.global_batch,
        }
        return resume.save_checkpoint(
            self.output,
            self.step,
            self.model,
            self.trained,
            self.optimizer,
            self.scheduler,
            info,
            self.dist,
            sharded,
            self.cfg.keep_last,
        )

    def save_output(self, folder: Path) -> None:
        """The run's result: the LoRA adapter (PEFT format), or a complete HF checkpoint with the
        tokenizer. Collective under FSDP (each tensor is gathered), written by rank 0."""
        params = dict(self.model.named_parameters())
        if self.cfg.method == "lora":
            state = {n: full_tensor(params[n]).detach().cpu() for n in self.trained}
            if self.dist.is_main:
                save_adapter(folder, state, self.model.lora_settings, base_model=str(self.cfg.model))
            barrier()
            return
        config = self.model.config
        dtype = getattr(torch, config.torch_dtype, torch.float32)
        if not self.dist.distributed:
            self.model.save_pretrained(folder, dtype=dtype)
        else:
            state = {}
            for name, p in params.items():
                t = full_tensor(p).detach()
                if self.dist.is_main:
                    state[name] = t.to("cpu", dtype)
            if self.dist.is_main:
                with torch.device("meta"):
                    copy = QwenForCausalLM(config)
                copy.load_state_dict(state, strict=False, assign=True)
                copy.generation_config = self.model.generation_config
                copy.save_pretrained(folder, dtype=dtype)
        if self.dist.is_main:
            self.tok.save_pretrained(folder)
        barrier()

    def _write_metrics(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.output / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def log(self, message: str) -> None:
        if getattr(self, "dist", None) is not None and not self.dist.is_main:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)


def finetune(cfg: FinetuneConfig, callbacks: Sequence[Callback] = (), progress: bool = True) -> dict:
    """Run a recipe from set-up to outputs; returns the summary of `Trainer.train`.

    Args:
        cfg: the recipe.
        callbacks: called as `callback(trainer, record)` after each optimizer step.
        progress: show the progress bar.
    """
    trainer = Trainer(cfg, callbacks, progress)
    try:
        return trainer.setup().train()
    finally:
        shutdown()


__all__ = ["METRICS", "Trainer", "finetune"]
