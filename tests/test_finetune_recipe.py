"""Recipes and the `qwenkit finetune` command line: every YAML in configs/ is a valid recipe; unknown
keys and bad values are errors naming the key; YAML, key=value and --flags combine in that order;
--help lists every key with its default; user errors are one line and exit status 2."""

from pathlib import Path

import pytest

from qwenkit.cli import main
from qwenkit.cli.finetune import build_parser, config_from_args
from qwenkit.finetune.config import KEYS, FinetuneConfig, RecipeError, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_recipes_for_the_7b_and_the_tiny_cpu_run():
    names = {p.name for p in CONFIGS}
    assert {"qwen2.5-7b-instruct-lora.yaml", "qwen2.5-7b-instruct-full-fsdp.yaml", "tiny-cpu-lora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_in_configs_is_valid(path):
    cfg = load_config(path)
    assert isinstance(cfg, FinetuneConfig)
    assert cfg.model and cfg.data and cfg.output
    # Every value is of its key's type after loading (YAML reads `2.0e-4` as a float, `2e-4` as text).
    assert isinstance(cfg.lr, float) and cfg.lr > 0


def test_the_7b_recipes_say_what_they_are_for():
    lora = load_config(Path(CONFIGS[0]).parent / "qwen2.5-7b-instruct-lora.yaml")
    assert lora.method == "lora" and lora.precision == "bf16" and lora.grad_checkpointing
    full = load_config(Path(CONFIGS[0]).parent / "qwen2.5-7b-instruct-full-fsdp.yaml")
    assert full.method == "full" and full.precision == "bf16-mixed" and full.checkpoint_format == "sharded"


@pytest.mark.parametrize(
    "values,message",
    [
        ({"learning_rate": 1e-4}, "unknown key 'learning_rate'"),
        ({"lrr": 1e-4}, "did you mean 'lr'"),
        ({"lr": "fast"}, "key 'lr': must be a number"),
        ({"lr": -1}, "key 'lr': must be positive"),
        ({"method": "qlora"}, "key 'method': must be one of full, lora, freeze"),
        ({"batch_size": 2.5}, "key 'batch_size': must be an integer"),
        ({"packing": "maybe"}, "key 'packing': must be true or false"),
        ({"val_fraction": 1.5}, "key 'val_fraction'"),
        ({"layer_lr_decay": 0}, "key 'layer_lr_decay'"),
        ({"lora_targets": ["q_proj", "lm_head"]}, "key 'lora_targets': unknown module 'lm_head'"),
        ({"method": "freeze"}, "key 'train_layers': is required"),
        ({"method": "full", "train_layers": 2}, "key 'train_layers'"),
        ({"eval_every": 10}, "key 'eval_every': needs validation data"),
        ({"early_stop_patience": 2}, "key 'early_stop_patience'"),
        ({"model": "qwen2.5-7b-instruct-Q4_K_M.GGUF"}, "key 'model': .* is a GGUF file"),
    ],
)
def test_unknown_keys_and_bad_values_name_the_key(values, message):
    with pytest.raises(RecipeError, match=message):
        load_config(None, values)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nlr: [1\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    bad.write_text("model: m\nbatchsize: 4\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: unknown key 'batchsize' \(did you mean 'batch_size'\?\)"):
        load_config(bad)
    bad.write_text("epochs: two\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: key 'epochs': must be an integer"):
        load_config(bad)


def test_an_unknown_key_reads_the_same_from_yaml_a_mapping_and_the_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lrr: 1.0e-3\n")
    errors = []
    for load in (
        lambda: load_config(recipe),
        lambda: load_config(None, {"lrr": 1e-3}),
        lambda: config_from_args(["lrr=1e-3"]),
    ):
        with pytest.raises(RecipeError) as err:
            load()
        errors.append(err.value)
    assert {e.message for e in errors} == {"unknown key 'lrr' (did you mean 'lr'?)"}
    assert [e.file for e in errors] == [recipe, None, None]


def test_yaml_then_key_values_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: base\ndata: d.jsonl\noutput: out\nlr: 1.0e-3\nbatch_size: 8\nmethod: full\n")
    cfg, _ = config_from_args(
        [
            str(recipe),
            "lr=2e-4",
            "lora_targets=[q_proj,v_proj]",
            "method=lora",
            "--batch-size",
            "2",
            "--max-steps",
            "7",
            "--packing",
            "--train-layers",
            "3",
            "--lora-dropout",
            "0",
        ]
    )
    assert (cfg.lr, cfg.batch_size, cfg.max_steps, cfg.packing, cfg.method) == (2e-4, 2, 7, True, "lora")
    assert cfg.lora_targets == ["q_proj", "v_proj"] and cfg.train_layers == 3 and cfg.lora_dropout == 0.0
    cfg, _ = config_from_args(
        [
            "--model",
            "m",
            "--data",
            "d",
            "--output",
            "o",
            "--train-layers",
            "model.norm,lm_head",
            "--method",
            "freeze",
            "--no-packing",
            "--seed",
            "5",
        ]
    )
    assert cfg.train_layers == ["model.norm", "lm_head"] and cfg.packing is False and cfg.seed == 5
    # A path that YAML would read as a bool or a number stays text.
    cfg, _ = config_from_args(["model=no", "data=1.5", "output=o"])
    assert (cfg.model, cfg.data) == ("no", "1.5")


@pytest.mark.parametrize(
    "key,text,value",
    [
        ("lora_targets", "q_proj,v_proj", ["q_proj", "v_proj"]),
        ("betas", "0.8,0.95", [0.8, 0.95]),
        ("betas", "[0.8, 0.95]", [0.8, 0.95]),
        ("method", "FULL", "full"),
        ("train_layers", "2", 2),
        ("val_data", "none", None),
        ("model", "no", "no"),
        ("lr", "1.0e-3", 1e-3),
    ],
)
def test_a_flag_reads_as_the_same_key_value(key, text, value):
    base = ["model=m", "data=d", "output=o"]
    as_item, _ = config_from_args([*base, f"{key}={text}"])
    as_flag, _ = config_from_args([*base, "--" + key.replace("_", "-"), text])
    assert as_flag == as_item and getattr(as_flag, key) == value


def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for key in KEYS:
        assert "--" + key.replace("_", "-") in text, key
    assert "(default: 0.0002)" in text and "(default: lora)" in text and "torchrun" in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "m", "--data", "d", "--output", "o", "--lr", "abc"], "key 'lr': must be a number"),
        (["--model", "m", "--data", "d", "--output", "o", "--method", "qlora"], "key 'method': must be one of"),
        (["colour=blue"], "unknown key 'colour'"),
        (["--data", "d", "--output", "o"], "key 'model': is required"),
        (["missing.yaml"], "missing.yaml: no such recipe file"),
    ],
)
def test_user_errors_are_one_line_and_status_2(argv, message, capsys):
    assert main(["finetune", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qwenkit finetune: error: ") and message in err and "\n" not in err


def test_missing_data_file_is_a_user_error(tmp_path, capsys):
    from reference import random_model, tiny_config

    random_model(tiny_config(vocab_size=151936)).save_pretrained(tmp_path / "m")
    assert (
        main(
            [
                "finetune",
                "--model",
                str(tmp_path / "m"),
                "--data",
                str(tmp_path / "nope.jsonl"),
                "--output",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "nope.jsonl: no such data file" in capsys.readouterr().err


def test_dry_run_prints_the_resolved_recipe(capsys):
    assert main(["finetune", str(CONFIGS[0]), "lr=3e-4", "--dry-run"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lr"] == 3e-4 and set(printed) == set(KEYS)
