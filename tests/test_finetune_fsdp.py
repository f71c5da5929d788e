"""FSDP2 on CPU (gloo, 2 processes under torchrun) trains as one process does with the same global
batch: the same losses step for step and the same final weights. Slow: sharded checkpoints resume
after a kill, and full ones resume on a different number of processes."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import random_model, run_flags, tiny_config, write_run_files
from safetensors.torch import load_file

ROOT = Path(__file__).parent.parent


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(nproc, *args):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "qwenkit",
        "finetune",
        *args,
        "--no-progress",
    ]


def _single(*args):
    return [sys.executable, "-m", "qwenkit", "finetune", *args, "--no-progress"]


def _run(cmd, ok=True):
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _metrics(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in records if "loss" in r], [r["eval_loss"] for r in records if "eval_loss" in r])


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok_qwen):
    root = tmp_path_factory.mktemp("fsdp")
    model = random_model(tiny_config(vocab_size=151936, initializer_range=0.1), seed=6)
    rng = random.Random(3)
    # Rows of different lengths, so each process pads its own micro-batches differently.
    rows = [
        {"instruction": "Repeat: " + " ".join(["ab"] * rng.randint(1, 12)), "output": "ok " * rng.randint(1, 9)}
        for _ in range(40)
    ]
    return write_run_files(root, model, tok_qwen, rows)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_processes_match_one_with_the_same_global_batch(files, tmp_path, method):
    common = [
        *run_flags(files, method),
        "--lr",
        "2e-3",
        "--max-steps",
        "5",
        "--val-fraction",
        "0.2",
        "--eval-every",
        "5",
        "--lora-dropout",
        "0",
        "--seed",
        "4",
    ]
    _run(_single(*common, "--batch-size", "4", "--output", str(tmp_path / "one")))
    # 1 sequence x 2 micro-batches x 2 processes = the single run's 4.
    two = _run(_torchrun(2, *common, "--batch-size", "1", "--grad-accum", "2", "--output", str(tmp_path / "two")))
    assert "x 2 processes (FSDP)" in two.stderr

    one_losses, one_eval = _metrics(tmp_path / "one")
    two_losses, two_eval = _metrics(tmp_path / "two")
    assert len(one_losses) == len(two_losses) == 5 and one_losses[0] != one_losses[-1]
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(two_eval), torch.tensor(one_eval), rtol=1e-5, atol=0)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
    assert a.keys() == b.keys()
    for k in a:
        # Adam divides by the gradient's own scale, so rounding differences in near-zero gradients
        # (a LoRA A while B is ~0) show up at ~1e-5; an lr of 2e-3 over 5 steps moves weights ~1e-2.
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4)


KILLER = """
import os, signal, sys
from qwenkit.cli.finetune import config_from_args
from qwenkit.finetune.trainer import finetune
kill_at = int(sys.argv[1])
cfg, _ = config_from_args(sys.argv[2:])
def kill(trainer, record):
    if record["step"] == kill_at and trainer.dist.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
finetune(cfg, callbacks=[kill], progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["sharded", "full"])
def test_fsdp_checkpoints_resume_exactly(files, tmp_path, fmt):
    common = [
        *run_flags(files, "full"),
        "--lr",
        "2e-3",
        "--max-steps",
        "6",
        "--batch-size",
        "2",
        "--save-every",
        "3",
        "--seed",
        "8",
        "--checkpoint-format",
        fmt,
    ]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _run(_torchrun(2, *common, "--output", str(whole)))
    # One rank dies by SIGKILL at step 5; torchrun then stops the other.
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    died = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(killer),
            "5",
            *common,
            "--output",
            str(broken),
        ],
        ok=False,
    )
    assert died.returncode != 0 and "SIGKILL" in died.stderr
    if fmt == "sharded":
        _run(_torchrun(2, *common, "--output", str(broken), "--resume"))
    else:
        # A full checkpoint written by 2 processes resumes on 1, with the same global batch.
        _run(_single(*common, "--output", str(broken), "--resume", "--grad-accum", "2"))
    assert _metrics(broken)[0] == pytest.approx(_metrics(whole)[0], rel=1e-5 if fmt == "full" else 0)
