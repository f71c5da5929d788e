"""The training loop end to end on a tiny Qwen2.5-structured model with the real tokenizer: LoRA and
full runs lower the validation loss, and leave a PEFT adapter or a checkpoint that transformers
loads with the same outputs; metrics, loss.png, checkpoints; early stopping keeps the best model;
the loss is the same however a batch is split into micro-batches; the fused loss equals the model's."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import random_model, tiny_config, write_jsonl, write_run_files
from safetensors.torch import load_file, save_file

from qwenkit.cli import main
from qwenkit.errors import CheckpointError
from qwenkit.finetune.config import RecipeError, load_config
from qwenkit.finetune.loss import CausalLMLoss, fused_linear_cross_entropy
from qwenkit.finetune.trainer import Trainer

TINY_RECIPE = Path(__file__).parent.parent / "configs" / "tiny-cpu-lora.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok_qwen):
    root = tmp_path_factory.mktemp("train")
    # Embeddings at std 0.1 rather than 0.02: with the head tied to them, logits of a tiny random
    # model could otherwise hardly move, whatever LoRA learns.
    model = random_model(tiny_config(vocab_size=151936, initializer_range=0.1), seed=2)
    rng = random.Random(1)
    rows = []
    for _ in range(40):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                ]
            }
        )
    write_run_files(root, model, tok_qwen, rows[:32])
    write_jsonl(root / "val.jsonl", rows[32:])
    return root


def recipe(files, out, **changes):
    return load_config(
        None,
        {
            "model": str(files / "model"),
            "data": str(files / "train.jsonl"),
            "val_data": str(files / "val.jsonl"),
            "output": str(out),
            "batch_size": 4,
            "max_seq_len": 96,
            **changes,
        },
    )


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_lowers_validation_loss_and_writes_a_peft_adapter(files, tmp_path, tok_qwen):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # The repository's tiny CPU recipe, pointed at this test's model and data.
    cfg = load_config(
        TINY_RECIPE,
        {
            "model": str(files / "model"),
            "data": str(files / "train.jsonl"),
            "output": str(tmp_path / "lora"),
            "max_steps": 24,
            "save_every": 0,
        },
    )
    trainer = Trainer(cfg, progress=False).setup()
    before = trainer.evaluate()
    summary = trainer.train()
    assert summary["eval_loss"] < before - 1.0, (before, summary)

    out = tmp_path / "lora"
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "best"} <= {
        p.name for p in out.iterdir()
    }
    records = metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 25))
    assert all({"loss", "lr", "tokens_per_s", "epoch"} <= set(r) for r in steps)
    assert [r["step"] for r in records if "eval_loss" in r] == [10, 20, 24]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # PEFT on transformers, with the adapter the run wrote, gives the run's own logits.
    ids = torch.tensor(
        [tok_qwen.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True)]
    )
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(files / "model", dtype=torch.float32), out
    ).eval()
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, trainer.model(ids).logits, rtol=0, atol=1e-4)


def test_full_run_lowers_validation_loss_and_writes_a_checkpoint(files, tmp_path, tok_qwen):
    from transformers import AutoModelForCausalLM

    cfg = recipe(files, tmp_path / "full", method="full", lr=2e-3, max_steps=12, warmup_steps=1, eval_every=6)
    trainer = Trainer(cfg, progress=False).setup()
    before = trainer.evaluate()
    summary = trainer.train()
    assert summary["eval_loss"] < before - 1.0, (before, summary)

    out = tmp_path / "full"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    ids = torch.tensor(
        [tok_qwen.apply_chat_template([{"role": "user", "content": "What is 4 plus 4?"}], add_generation_prompt=True)]
    )
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trainer.model(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_each_parameter_gets_the_checkpoint_in_its_own_dtype(files, tmp_path, method):
    # bf16 frozen weights; trained ones (a frozen run's top layer) read exactly in fp32.
    train_layers = 1 if method == "freeze" else None
    cfg = recipe(files, tmp_path / "out", method=method, precision="bf16", train_layers=train_layers)
    trainer = Trainer(cfg, progress=False).setup()
    params = dict(trainer.model.named_parameters())
    saved = load_file(files / "model" / "model.safetensors")
    assert set(saved) == set(params) - {n for n in params if ".lora_" in n}
    for name, tensor in saved.items():
        assert params[name].dtype == (torch.float32 if name in trainer.trained else torch.bfloat16), name
        assert torch.equal(params[name].detach(), tensor.to(params[name].dtype)), name


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda w: w.pop("model.norm.weight"), "missing tensors model.norm.weight"),
        (
            lambda w: w.update({"model.norm.weight": w["model.norm.weight"][:-1]}),
            "tensor 'model.norm.weight' has shape",
        ),
        (
            lambda w: w.update({"model.extra.weight": w["model.norm.weight"].clone()}),
            "unexpected tensor 'model.extra.weight'",
        ),
    ],
)
def test_a_checkpoint_that_does_not_fit_the_config_is_refused(files, tmp_path, change, message):
    model = tmp_path / "model"
    shutil.copytree(files / "model", model)
    weights = load_file(model / "model.safetensors")
    change(weights)
    save_file(weights, model / "model.safetensors")
    with pytest.raises(CheckpointError, match=message) as err:
        Trainer(recipe(files, tmp_path / "out", model=str(model)), progress=False).setup()
    assert str(model) in str(err.value)


def test_early_stopping_keeps_the_best_model(files, tmp_path):
    # A constant, high lr on 32 rows: the validation loss falls, then overfitting makes it climb.
    cfg = recipe(
        files,
        tmp_path / "es",
        method="full",
        lr=1e-2,
        scheduler="constant",
        max_steps=60,
        eval_every=2,
        early_stop_patience=2,
    )
    trainer = Trainer(cfg, progress=False).setup()
    summary = trainer.train()
    evals = [(r["step"], r["eval_loss"]) for r in metrics(tmp_path / "es") if "eval_loss" in r]
    losses = [loss for _, loss in evals]
    best_i = min(range(len(losses)), key=lambda i: (losses[i], i))
    assert summary["stopped_early"] and summary["steps"] < 60 and best_i > 0
    # It stopped at the second evaluation in a row without improvement, and kept the best one.
    assert len(evals) == best_i + 3 and all(not loss < losses[best_i] for loss in losses[best_i + 1 :])
    assert summary["best_step"] == evals[best_i][0] and summary["best_eval_loss"] == losses[best_i]
    best = Trainer(
        recipe(files, tmp_path / "check", model=str(tmp_path / "es" / "best"), method="full"), progress=False
    ).setup()
    assert best.evaluate() == pytest.approx(losses[best_i], rel=1e-5)


def test_micro_batches_and_checkpointing_do_not_change_the_losses(files, tmp_path):
    a = recipe(files, tmp_path / "a", method="full", lr=1e-3, max_steps=4, batch_size=4, grad_accum=1)
    b = recipe(
        files, tmp_path / "b", method="full", lr=1e-3, max_steps=4, batch_size=2, grad_accum=2, grad_checkpointing=True
    )
    Trainer(a, progress=False).setup().train()
    Trainer(b, progress=False).setup().train()
    la = [r["loss"] for r in metrics(tmp_path / "a") if "loss" in r]
    lb = [r["loss"] for r in metrics(tmp_path / "b") if "loss" in r]
    assert len(la) == 4 and la[0] != la[-1]
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=0)


def test_checkpoints_keep_the_last_k_and_a_finished_run_is_not_overwritten(files, tmp_path, capsys):
    out = tmp_path / "ck"
    argv = [
        "finetune",
        "--model",
        str(files / "model"),
        "--data",
        str(files / "train.jsonl"),
        "--output",
        str(out),
        "--max-steps",
        "5",
        "--save-every",
        "2",
        "--keep-last",
        "2",
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--seed",
        "3",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    # Resuming a finished run from its last checkpoint redoes step 5 only.
    assert main(argv + ["--resume"]) == 0
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4, 5]


def test_resume_refuses_a_changed_recipe(files, tmp_path):
    cfg = recipe(files, tmp_path / "r", max_steps=2, save_every=2)
    Trainer(cfg, progress=False).setup().train()
    with pytest.raises(RecipeError, match="key 'lr'"):
        Trainer(recipe(files, tmp_path / "r", max_steps=4, save_every=2, lr=1e-3, resume=True), progress=False).setup()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("head_trains", [True, False])
def test_fused_loss_equals_cross_entropy_in_value_and_gradient(smoothing, head_trains):
    # A frozen head takes the vocabulary in tiles (37 columns: the last tile is partial) with an
    # online softmax; a trained one whole chunks of rows.
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64, requires_grad=head_trains)
    w.data[:, 0] += torch.linspace(-30, 30, 300, dtype=torch.float64)  # the row maximum moves between tiles
    targets = torch.randint(0, 300, (37,))
    ours = fused_linear_cross_entropy(h, w, targets, smoothing, chunk_rows=8, vocab_tile=37)
    (2.5 * ours).backward()
    grads = h.grad.clone(), (w.grad.clone() if head_trains else None)
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), targets, reduction="sum", label_smoothing=smoothing)
    (2.5 * ref).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(grads, (h.grad, w.grad), rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(
            fused_linear_cross_entropy(h, w, targets, smoothing, vocab_tile=37), ref, rtol=1e-12, atol=1e-10
        )


def test_loss_head_equals_the_models_own_loss():
    model = random_model(tiny_config(), seed=4)
    ids = torch.randint(0, 512, (3, 20))
    labels = ids.clone()
    labels[:, :7] = -100
    labels[1, 15:] = -100
    mask = torch.ones_like(ids)
    mask[2, 17:] = 0
    labels[2, 17:] = -100
    loss_sum, count = CausalLMLoss(model)(ids, labels, attention_mask=mask)
    expected = model(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss_sum / count, expected, rtol=1e-5, atol=1e-6)
