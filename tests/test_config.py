"""QwenConfig: presets, reading config.json (Qwen2, Llama, YaRN, transformers 5's layout), bad input."""

import json
from dataclasses import FrozenInstanceError, replace

import pytest
from reference import hf_config

from qwenkit.config import PRESETS, ConfigError, QwenConfig, YarnScaling, from_hf_config, get_preset

QWEN25_7B_INSTRUCT = {  # the shape of the published config.json
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}


def write(tmp_path, d):
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


def test_published_7b_config_reads_as_the_preset(tmp_path):
    config = from_hf_config(write(tmp_path, QWEN25_7B_INSTRUCT))
    assert config == PRESETS["qwen2.5-7b"]
    assert config.dim_per_head == 128 and config.attention_bias and not config.tie_word_embeddings


def test_presets_cover_the_family():
    # The model cards' parameter counts (rounded there, hence the 2% tolerance).
    sizes = {"0.5b": 0.49e9, "1.5b": 1.54e9, "3b": 3.09e9, "7b": 7.61e9, "14b": 14.7e9, "32b": 32.5e9, "72b": 72.7e9}
    for size, params in sizes.items():
        c = get_preset(f"Qwen2.5-{size.upper()}-Instruct")
        n = _count(c)
        assert abs(n - params) / params < 0.02, (size, n)
        assert c.tie_word_embeddings == (size in ("0.5b", "1.5b", "3b"))
        assert c.rope_theta == 1e6 and c.rms_norm_eps == 1e-6
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("qwen2.5-8b")


def _count(c: QwenConfig) -> int:
    """Parameters from the shapes alone: the model card's published totals are the check."""
    C, I, D = c.hidden_size, c.intermediate_size, c.dim_per_head
    attn = C * c.num_attention_heads * D * 2 + C * c.num_key_value_heads * D * 2
    attn += (c.num_attention_heads + 2 * c.num_key_value_heads) * D
    layer = attn + 3 * C * I + 2 * C
    head = 0 if c.tie_word_embeddings else c.vocab_size * C
    return c.vocab_size * C + c.num_hidden_layers * layer + C + head


def test_config_is_frozen_and_replaceable():
    c = PRESETS["tiny"]
    with pytest.raises(FrozenInstanceError):
        c.hidden_size = 1
    assert replace(c, num_hidden_layers=5).num_hidden_layers == 5


def test_round_trip_through_hf_dict(tmp_path):
    for config in (
        PRESETS["qwen2.5-0.5b"],
        PRESETS["qwen2.5-72b"],
        replace(PRESETS["tiny"], rope_scaling=YarnScaling(), head_dim=32),
    ):
        assert from_hf_config(write(tmp_path, config.to_hf_dict())) == config
        theirs = hf_config(config)  # transformers accepts what we write
        assert theirs.num_key_value_heads == config.num_key_value_heads


def test_yarn_in_both_layouts(tmp_path):
    legacy = {
        **QWEN25_7B_INSTRUCT,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    }
    v5 = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    a, b = from_hf_config(legacy), from_hf_config(v5)
    assert a == b
    assert a.rope_scaling == YarnScaling(factor=4.0, original_max_position_embeddings=32768)
    assert a.rope_theta == 1e6


def test_llama_config_is_the_same_network_without_qkv_bias():
    llama = {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rope_theta": 100000,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "head_dim": 64,
    }
    c = from_hf_config(llama)
    assert not c.attention_bias and c.model_type == "llama" and c.dim_per_head == 64
    assert c.head_dim is None  # equal to the default, so a saved config matches the original
    assert c.to_hf_dict()["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "t5"}, "model_type"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_attention_heads": 27}, "num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"num_hidden_layers": "28"}, "num_hidden_layers"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, change, field):
    d = {**QWEN25_7B_INSTRUCT, **change}
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ConfigError) as err:
        from_hf_config(write(tmp_path, d))
    assert str(tmp_path / "config.json") in str(err.value)
    assert f"'{field}'" in str(err.value)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2",\n  oops}')
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(line 2"):
        from_hf_config(tmp_path)
