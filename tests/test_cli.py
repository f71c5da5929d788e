"""The `qwenkit` command: `new` writes a checkpoint transformers loads; `generate` matches
transformers end to end (chat template, tokenizer, greedy decoding); bad input gets a clear error."""

import subprocess
import sys

import pytest
import torch

import qwenkit
from qwenkit.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert main(["new", "--preset", "tiny", "--seed", "1", "--dtype", "float32", "--out", str(out)]) == 0
    return out


def test_new_writes_a_checkpoint_transformers_loads(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    } <= names
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(tiny_dir)
    ours = qwenkit.load_model(tiny_dir)
    ids = torch.tensor([hf_tok.encode("Hello, Qwen! 你好")])
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-4


def test_new_is_seeded(tmp_path):
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        main(["new", "--preset", "tiny", "--seed", str(seed), "--no-tokenizer", "--out", str(tmp_path / name)])
    read = lambda n: (tmp_path / n / "model.safetensors").read_bytes()
    assert read("a") == read("b") != read("c")


def test_generate_matches_transformers_end_to_end(tiny_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "What is the capital of France?"
    assert (
        main(["generate", "--model", str(tiny_dir), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"])
        == 0
    )
    printed = capsys.readouterr().out
    hf_tok = AutoTokenizer.from_pretrained(tiny_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    text = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([hf_tok.encode(text)])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert printed == hf_tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) + "\n"


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
    assert main(["new", "--preset", "tiny", "--vocab-size", "1000", "--out", str(tmp_path / "x")]) == 2
    assert "--no-tokenizer" in capsys.readouterr().err
    assert main(["new", "--preset", "qwen9", "--out", str(tmp_path / "y")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_help_lists_commands_without_importing_torch():
    code = (
        "import sys\nfrom qwenkit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "new" in result.stdout and "generate" in result.stdout
    result = subprocess.run([sys.executable, "-m", "qwenkit", "new", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--preset" in result.stdout and "(default: qwen2.5-0.5b)" in result.stdout
