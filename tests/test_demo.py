"""`qwenkit demo` runs end to end in its quick mode on the default model."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(default_model_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwenkit",
            "demo",
            "--quick",
            "--model",
            str(default_model_dir),
            "--out",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for step in ("1. The five applications", "2. A short LoRA fine-tune"):
        assert step in out
    for app in ("translate", "question answering", "sentiment", "code", "text generation"):
        assert app in out
    assert "held-out accuracy before" in out and "held-out accuracy after" in out
    assert (tmp_path / "demo" / "lora" / "adapter_model.safetensors").exists()
    assert (tmp_path / "demo" / "lora" / "loss.png").exists()
