"""Freeze, gradual unfreezing and layer-wise lr decay train exactly the parameters they should, at
exactly the learning rates they should: checked around every optimizer step, from the optimizer's
own parameter groups and from what each parameter's update actually was (plain SGD, so an update
is -lr x grad)."""

import fnmatch
import random
import re

import pytest
import torch
from reference import random_model, tiny_config, write_run_files

from qwenkit.finetune.config import load_config
from qwenkit.finetune.trainer import Trainer

LAYERS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_files(tmp_path_factory, tok_qwen):
    root = tmp_path_factory.mktemp("strategy")
    model = random_model(tiny_config(vocab_size=151936, num_hidden_layers=LAYERS), seed=1)
    rng = random.Random(0)
    rows = [
        {"instruction": f"Add {a} and {b}.", "output": f"{a + b}"}
        for a, b in ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(16))
    ]
    return write_run_files(root, model, tok_qwen, rows)


def depth(name):
    """Expected depth from the top, written out independently of the trainer's own rule."""
    m = re.search(r"layers\.(\d+)\.", name)
    if m:
        return LAYERS - 1 - int(m.group(1))
    return LAYERS if "embed_tokens" in name else 0


def lr_at(step, base, warmup, total):
    """The linear schedule with warmup, written out: (s+1)/W, then 1 - (s-W)/(T-W)."""
    return base * ((step + 1) / warmup if step < warmup else 1 - (step - warmup) / (total - warmup))


def run(run_files, tmp_path, **recipe):
    """Train with plain SGD and record, around each step, the groups' lrs and every parameter's update."""
    cfg = load_config(
        None,
        {
            "model": str(run_files / "model"),
            "data": str(run_files / "train.jsonl"),
            "output": str(tmp_path / "out"),
            "optimizer": "sgd",
            "momentum": 0,
            "lr": 0.5,
            "weight_decay": 0,
            "max_grad_norm": 0,
            "scheduler": "linear",
            "warmup_steps": 2,
            "batch_size": 2,
            "max_steps": 6,
            "lora_dropout": 0,
            **recipe,
        },
    )
    trainer = Trainer(cfg, progress=False).setup()
    params = dict(trainer.model.named_parameters())
    steps = []

    def before(optimizer, args, kwargs):
        steps.append(
            {
                "groups": [(g["param_names"], g["lr"], g["depth"]) for g in optimizer.param_groups],
                "before": {n: p.detach().clone() for n, p in params.items()},
                "grads": {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None},
            }
        )

    def after(optimizer, args, kwargs):
        steps[-1]["after"] = {n: p.detach().clone() for n, p in params.items()}

    trainer.optimizer.register_step_pre_hook(before)
    trainer.optimizer.register_step_post_hook(after)
    trainer.train()
    return trainer, steps


def check_steps(steps, trainable, unfrozen_depths, decay, total):
    """Every step: the groups hold exactly the trainable parameters, by depth, at lr x decay^depth x
    schedule; parameters that train now moved by exactly -lr x grad; all others did not move."""
    for s, rec in enumerate(steps):
        names_in_groups = [n for names, _, _ in rec["groups"] for n in names]
        assert sorted(names_in_groups) == sorted(trainable)
        for names, lr, d in rec["groups"]:
            assert {depth(n) for n in names} == {d}
            assert lr == pytest.approx(lr_at(s, 0.5, 2, total) * decay**d, rel=1e-12)
        lr_of = {n: lr for names, lr, _ in rec["groups"] for n in names}
        live = {n for n in trainable if depth(n) in unfrozen_depths(s)}
        assert set(rec["grads"]) == live, f"step {s}"
        moved = set()
        for n, before in rec["before"].items():
            after = rec["after"][n]
            if n in live:
                torch.testing.assert_close(after, before - lr_of[n] * rec["grads"][n], rtol=1e-6, atol=1e-9)
            else:
                assert torch.equal(after, before), f"step {s}: {n} moved"
            if not torch.equal(after, before):
                moved.add(n)
        # (A LoRA A matrix gets a zero gradient while its B is still zero, so not every live one moves.)
        assert moved and moved <= live


def test_freeze_top_layers_with_gradual_unfreezing_and_lr_decay(run_files, tmp_path):
    trainer, steps = run(run_files, tmp_path, method="freeze", train_layers=2, unfreeze_every=2, layer_lr_decay=0.5)
    names = [n for n, _ in trainer.model.named_parameters()]
    trainable = [n for n in names if depth(n) < 2]
    assert {depth(n) for n in trainable} == {0, 1} and "model.norm.weight" in trainable
    # Steps 0-1: the top layer (and final norm); from step 2 the next one; train_layers caps it there.
    check_steps(steps, trainable, lambda s: set(range(1 + s // 2)), decay=0.5, total=6)


def test_full_with_groups_of_two_layers_unfrozen_each_step(run_files, tmp_path):
    trainer, steps = run(
        run_files, tmp_path, method="full", unfreeze_every=1, unfreeze_group_size=2, layer_lr_decay=0.8, max_steps=4
    )
    names = [n for n, _ in trainer.model.named_parameters()]
    # Group g holds depths 2g and 2g+1; the embeddings (depth 4) form the last group.
    check_steps(steps, names, lambda s: {d for d in range(LAYERS + 1) if d // 2 <= s}, decay=0.8, total=4)


def test_lora_with_per_epoch_unfreezing_and_lr_decay(run_files, tmp_path):
    # 16 rows, batch 2 x 4 accumulation: 2 steps per epoch, so one more layer every 2 steps.
    trainer, steps = run(
        run_files,
        tmp_path,
        method="lora",
        lora_r=2,
        unfreeze_every=1,
        unfreeze_unit="epochs",
        layer_lr_decay=0.7,
        grad_accum=4,
        max_steps=6,
    )
    names = [n for n, _ in trainer.model.named_parameters()]
    trainable = [n for n in names if ".lora_" in n]
    assert len(trainable) == 2 * 7 * LAYERS
    check_steps(steps, trainable, lambda s: set(range(1 + s // 2)), decay=0.7, total=6)


def test_freeze_named_modules(run_files, tmp_path):
    patterns = ["model.layers.*.mlp.down_proj", "model.norm"]
    trainer, steps = run(run_files, tmp_path, method="freeze", train_layers=patterns, max_steps=3)
    names = [n for n, _ in trainer.model.named_parameters()]
    trainable = [n for n in names if n == "model.norm.weight" or fnmatch.fnmatch(n, "model.layers.*.mlp.down_proj.*")]
    assert len(trainable) == LAYERS + 1
    check_steps(steps, trainable, lambda s: set(range(LAYERS + 1)), decay=1.0, total=3)


def test_lora_on_top_layers_only(run_files, tmp_path):
    trainer, steps = run(
        run_files, tmp_path, method="lora", lora_r=2, train_layers=1, lora_targets="q_proj,v_proj", max_steps=2
    )
    trainable = [n for n, _ in trainer.model.named_parameters() if ".lora_" in n]
    assert sorted(trainable) == sorted(
        f"model.layers.{LAYERS - 1}.self_attn.{m}.lora_{ab}.weight" for m in ("q_proj", "v_proj") for ab in "AB"
    )
    check_steps(steps, trainable, lambda s: set(range(LAYERS + 1)), decay=1.0, total=2)


def test_optimizers_and_schedules_are_built_from_the_recipe(run_files, tmp_path):
    for optimizer, kind in (("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)):
        cfg = load_config(
            None,
            {
                "model": str(run_files / "model"),
                "data": str(run_files / "train.jsonl"),
                "output": str(tmp_path / optimizer),
                "optimizer": optimizer,
                "lr": 1e-3,
                "method": "full",
                "scheduler": "cosine",
                "warmup_steps": 1,
                "max_steps": 5,
                "weight_decay": 0.1,
            },
        )
        trainer = Trainer(cfg, progress=False).setup()
        assert type(trainer.optimizer) is kind
        decays = {n: g["weight_decay"] for g in trainer.optimizer.param_groups for n in g["param_names"]}
        # Decay on matrices only: biases and norm weights are never decayed.
        assert len(decays) == len(list(trainer.model.parameters()))
        assert all((v == 0.1) == (not n.endswith("bias") and "norm" not in n) for n, v in decays.items())
        lrs = []
        for _ in range(5):
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
            trainer.optimizer.step()  # no gradients: moves nothing, keeps the scheduler's order check quiet
            trainer.scheduler.step()
        assert lrs[0] == pytest.approx(1e-3) and lrs[1] == pytest.approx(1e-3)  # warmup 1 step, then cosine from 1
        assert lrs[1] > lrs[2] > lrs[3] > lrs[4] > 0
