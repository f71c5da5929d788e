"""LoRA: adapters that PEFT loads on transformers' Qwen2 give qwenkit's logits, PEFT's adapters load
into qwenkit, merged equals unmerged, and `merge_checkpoint` writes base + adapter as one checkpoint."""

import json

import pytest
import torch
from reference import random_model, tiny_config

from qwenkit.lora import (
    ALL_LINEAR,
    AdapterError,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_checkpoint,
    merge_lora,
    save_model_adapter,
)
from qwenkit.model import load_model

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


def test_adapter_gradients_equal_pefts(tmp_path):
    # One training step's loss and adapter gradients against PEFT on transformers' Qwen2, with the
    # same adapter weights (B nonzero, so that every path of the update carries a gradient).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = random_model(tiny_config())
    base.save_pretrained(tmp_path / "base")
    model = _adapted().train()
    save_model_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True).train()
    model(IDS, labels=IDS).loss.backward()
    peft_model(input_ids=IDS, labels=IDS).loss.backward()
    theirs = {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for n, p in peft_model.named_parameters()
        if p.requires_grad
    }
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and len(ours) == 2 * len(ALL_LINEAR) * model.config.num_hidden_layers
    for name, grad in ours.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_layer_equals_its_formula_in_value_and_gradient(dropout, bias):
    # y = W x + b + scaling * B A dropout(x), every gradient, against the plain ops in fp64.
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(12, 10, bias=bias, dtype=torch.float64), r=3, alpha=6.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 5, 10, dtype=torch.float64)
    torch.manual_seed(1)
    y = layer(x)
    (y * grad_y).sum().backward()
    ours = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    for t in (x, layer.lora_A.weight, layer.lora_B.weight):
        t.grad = None
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(x, dropout) if dropout else x
    a, b = layer.lora_A.weight, layer.lora_B.weight
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias) + 2.0 * dropped @ a.t() @ b.t()
    (ref * grad_y).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, [t.grad for t in (x, a, b)], rtol=1e-12, atol=1e-12)
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


def test_adapter_saved_by_peft_loads_into_qwenkit(tmp_path):
    from peft import LoraConfig, get_peft_model
    from reference import hf_twin

    base = random_model(tiny_config())
    hf = hf_twin(random_model(tiny_config()))
    peft_model = get_peft_model(
        hf,
        LoraConfig(
            r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=True, init_lora_weights=False
        ),
    )
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
