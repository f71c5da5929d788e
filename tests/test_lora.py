"""LoRA: adapters that PEFT loads on transformers' Qwen2 give qwenkit's logits, PEFT's adapters load
into qwenkit, merged equals unmerged, and `merge_checkpoint` writes base + adapter as one checkpoint."""

import json

import pytest
import torch

from qwenkit.checkpoint import load_model
from qwenkit.lora import (ALL_LINEAR, AdapterError, LoRALinear, apply_lora, load_adapter, lora_state_dict,
                          merge_checkpoint, merge_lora, save_model_adapter)
from reference import random_model, tiny_config

IDS = torch.tensor([[5, 17, 301, 42, 7, 99, 3, 250, 11, 400, 8, 1]])


def _randomize_adapters(model, seed=0):
    # A fresh adapter has B = 0 and changes nothing; random B makes every adapter visible in the logits.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _adapted(seed=0, **lora):
    model = random_model(tiny_config(), seed=seed)
    apply_lora(model, **{"r": 4, "alpha": 8.0, **lora})
    _randomize_adapters(model, seed)
    return model.eval()


def test_fresh_adapter_changes_nothing_and_only_adapters_train():
    model = random_model(tiny_config())
    before = model(IDS).logits
    apply_lora(model, r=4, alpha=8.0)
    assert torch.equal(model(IDS).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == set(ALL_LINEAR)
    assert len(trainable) == 2 * len(ALL_LINEAR) * model.config.num_hidden_layers


def test_base_names_are_kept_so_the_checkpoint_still_loads():
    model = _adapted()
    names = {n for n, _ in model.named_parameters() if ".lora_" not in n}
    assert names == {n for n, _ in random_model(tiny_config()).named_parameters()}


def test_merged_equals_unmerged():
    model = _adapted()
    with torch.no_grad():
        unmerged = model(IDS).logits
        merge_lora(model)
        merged = model(IDS).logits
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)


def test_peft_loads_qwenkit_adapter_with_the_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = random_model(tiny_config())
    base.save_pretrained(tmp_path / "base")
    model = _adapted(targets=["q_proj", "v_proj", "down_proj", "gate_proj"], layers=[1])
    save_model_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["layers_to_transform"] == [1]

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = model(IDS).logits
        theirs = peft_model(IDS).logits
        without = random_model(tiny_config())(IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    # The adapter must actually change the output, or the comparison above proves nothing.
    assert (ours - without).abs().max() > 1e-3


def test_adapter_saved_by_peft_loads_into_qwenkit(tmp_path):
    from peft import LoraConfig, get_peft_model

    from reference import hf_twin

    base = random_model(tiny_config())
    hf = hf_twin(random_model(tiny_config()))
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"],
                                               use_rslora=True, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    load_adapter(base, tmp_path / "peft-adapter")
    with torch.no_grad():
        torch.testing.assert_close(base(IDS).logits, peft_model(IDS).logits, rtol=0, atol=1e-4)


def test_merge_checkpoint_equals_base_plus_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = random_model(tiny_config())
    base.save_pretrained(tmp_path / "base", dtype=torch.float32)
    model = _adapted()
    save_model_adapter(model, tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")

    merged = load_model(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)
        hf_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
        torch.testing.assert_close(hf_merged(IDS).logits, peft_model(IDS).logits, rtol=0, atol=1e-4)


def test_adapter_errors_name_the_problem(tmp_path):
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(random_model(tiny_config()), tmp_path)
    model = _adapted()
    save_model_adapter(model, tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(random_model(tiny_config()), tmp_path / "a")
    config_file.write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    with pytest.raises(AdapterError, match="matches no adapted layer"):
        load_adapter(random_model(tiny_config()), tmp_path / "a")
    with pytest.raises(AdapterError, match="match no linear layer"):
        apply_lora(random_model(tiny_config()), targets=["nonexistent"])
