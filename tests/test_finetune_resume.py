"""Kill and resume: a run SIGKILLed mid-training and resumed from its last checkpoint gives the same
losses, step for step and bit for bit, and the same final weights, as a run never interrupted: the
model, optimizer, scheduler, RNG (LoRA dropout draws from it) and data position are all restored."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from reference import random_model, run_flags, tiny_config, write_run_files

ROOT = Path(__file__).parent.parent
# Kills its own process at a given step, from inside the training loop: a real SIGKILL, mid-run.
KILLER = """
import os, signal, sys
from qwenkit.cli.finetune import config_from_args
from qwenkit.finetune.trainer import finetune
kill_at = int(sys.argv[1])
cfg, _ = config_from_args(sys.argv[2:])
def kill(trainer, record):
    if record["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
finetune(cfg, callbacks=[kill], progress=False)
"""


def _env():
    # One thread, in every run, so that the kernels (and their rounding) are the same in each.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r], [
        (r["step"], r["eval_loss"]) for r in records if "eval_loss" in r
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok_qwen):
    root = tmp_path_factory.mktemp("resume")
    model = random_model(tiny_config(vocab_size=151936, initializer_range=0.1), seed=5)
    rng = random.Random(2)
    rows = [
        {"conversations": [{"from": "human", "value": f"Spell {n}."}, {"from": "gpt", "value": " ".join(str(n))}]}
        for n in (rng.randint(10, 99999) for _ in range(30))
    ]
    return write_run_files(root, model, tok_qwen, rows)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_sigkill_and_resume_gives_identical_losses(files, tmp_path, method):
    # 24 training rows / (3 x 2) = 4 steps per epoch: the kill lands in the second epoch, between
    # checkpoints, with dropout drawing random numbers and the top layers still frozen.
    args = [
        *run_flags(files, method),
        "--lr",
        "3e-3",
        "--batch-size",
        "3",
        "--grad-accum",
        "2",
        "--max-steps",
        "10",
        "--save-every",
        "3",
        "--keep-last",
        "1",
        "--val-fraction",
        "0.2",
        "--eval-every",
        "4",
        "--lora-dropout",
        "0.1",
        "--unfreeze-every",
        "4",
        "--layer-lr-decay",
        "0.5",
        "--warmup-steps",
        "2",
        "--seed",
        "11",
    ]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = subprocess.run(
        [sys.executable, "-m", "qwenkit", "finetune", *args, "--output", str(whole), "--no-progress"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr

    killed = subprocess.run(
        [sys.executable, "-c", KILLER, "8", *args, "--output", str(broken)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [s for s, _ in _losses(broken)[0]] == list(range(1, 9))
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == ["step-00000006"]
    # A checkpoint whose writing was cut short is ignored.
    (broken / "checkpoints" / ".tmp-step-00000009").mkdir()

    resumed = subprocess.run(
        [sys.executable, "-m", "qwenkit", "finetune", *args, "--output", str(broken), "--resume", "--no-progress"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step 6" in resumed.stderr
    assert _losses(broken) == _losses(whole)
    assert [s for s, _ in _losses(whole)[0]] == list(range(1, 11))
    assert not (broken / "checkpoints" / ".tmp-step-00000009").exists()

    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (broken / weights).read_bytes() == (whole / weights).read_bytes()
