"""LoRA: adapters that PEFT loads on transformers' Qwen2 give qwenkit's logits, PEFT's adapters load
into qwenkit, merged equals unmerged, and `merge_checkpoint` writes base + adapter as one checkpoint;
on a quantized base (GGUF blocks) an adapter gives the dequantized float model's outputs, through
the native decoder too."""

import copy
import json

import pytest
import torch
from gguf_files import Q as GGUFType
from gguf_files import tiny_vocab, write_gguf
from reference import random_model, tiny_config

import qwenkit
from qwenkit import cpu
from qwenkit.cpu import ops
from qwenkit.cpu.layers import StreamingQuantLinear
from qwenkit.cpu.stack import NativeDecoder
from qwenkit.gguf import convert_gguf, load_gguf
from qwenkit.lora import (
    ALL_LINEAR,
    AdapterError,
    LoRALinear,
    QuantLoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_checkpoint,
    merge_lora,
    save_model_adapter,
)
from qwenkit.model import load_model
from qwenkit.quant import QuantLinear, quantize

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


# ------------------------------------------------------------------------------------------------
# Adapters on a quantized base (GGUF blocks), for inference


def _dequantized_twin(model, quantized):
    """`model` with each weight that `quantized` holds in blocks replaced by those blocks' fp32 values."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in quantized.named_modules():
            if isinstance(layer, QuantLinear):
                twin.get_submodule(name).weight.copy_(layer.dequantized_weight())
    return twin


def _gguf_file(tmp_path, model):
    """`model` written as a Q8_0 GGUF file as llama.cpp does (embedding and tied head in blocks too),
    and the folder of its dequantized conversion."""
    path = write_gguf(tmp_path / "tiny.q8_0.gguf", model, tiny_vocab(512), qtype=GGUFType.Q8_0)
    return path, convert_gguf(path, tmp_path / "converted")


def _save_random_adapter(twin, folder):
    apply_lora(twin, r=4, alpha=8.0)
    _randomize_adapters(twin)
    save_model_adapter(twin, folder)
    return twin.eval(), folder


@pytest.fixture(params=["quantize", "gguf"])
def quantized_and_twin(request, tmp_path):
    """(a model in Q8_0 blocks with QuantLinear's reference products, the same as qwenkit.load_model
    gives it (streaming: quant.c's products), its dequantized float twin with a random non-zero
    adapter, that adapter's folder): from `quantize` in memory, or from a GGUF file and its conversion."""
    model = random_model(tiny_config())
    if request.param == "quantize":
        plain = quantize(copy.deepcopy(model), "Q8_0", head=False)
        quantized = cpu.accelerate(copy.deepcopy(plain))
        twin = _dequantized_twin(model, plain)
    else:
        path, folder = _gguf_file(tmp_path, model)
        plain, quantized, twin = load_gguf(path), qwenkit.load_model(path), load_model(folder)
    return plain, quantized, *_save_random_adapter(twin, tmp_path / "adapter")


def test_an_adapter_on_a_quantized_base_equals_it_on_the_dequantized_weights(quantized_and_twin):
    plain, quantized, twin, adapter = quantized_and_twin
    with torch.no_grad():
        without = quantized(IDS).logits
    for m in (plain, quantized):
        load_adapter(m, adapter)
        assert len(dict(lora_layers(m))) == len(ALL_LINEAR) * m.config.num_hidden_layers
    assert all(type(m.base_layer) is QuantLinear for _, m in lora_layers(plain))
    assert all(type(m.base_layer) is StreamingQuantLinear for _, m in lora_layers(quantized))
    # the adapter's names are PEFT's, the same as on the full-precision model; it is kept in fp32
    assert lora_state_dict(quantized).keys() == lora_state_dict(twin).keys()
    assert all(p.dtype == torch.float32 for p in lora_state_dict(quantized).values())
    with torch.no_grad():
        reference, ours, theirs = plain(IDS).logits, quantized(IDS).logits, twin(IDS).logits
    # QuantLinear's own products (dequantized tiles, fp32) are the float model's up to summation order
    torch.testing.assert_close(reference, theirs, rtol=0, atol=1e-5)
    # quant.c's products quantize x to int8 in blocks of 32 first: close, not equal
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-2
    assert ((ours - without).norm() / theirs.norm()).item() > 0.05  # the adapter is really applied


@pytest.mark.parametrize("rows", [1, 12])
def test_a_lora_layer_on_quantized_blocks_adds_the_update_to_the_blocks_own_product(rows):
    # base(x) + scaling * B A x, the base being the streaming layer's own product (quant.c), the
    # update in fp32 (its small products stream too: only the summation order differs)
    torch.manual_seed(0)
    base = quantize(torch.nn.Sequential(torch.nn.Linear(64, 48)), "Q8_0")[0]
    layer = QuantLoRALinear(base, r=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    cpu.stream(layer)
    assert type(layer.base_layer) is StreamingQuantLinear
    x = torch.randn(rows, 64)
    with torch.no_grad():
        expected = layer.base_layer(x) + 2.0 * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-5)


def test_greedy_generation_with_an_adapter_on_a_quantized_base_is_the_float_models(quantized_and_twin, monkeypatch):
    _, quantized, twin, adapter = quantized_and_twin
    load_adapter(quantized, adapter)
    cache = qwenkit.KVCache(quantized.config, 2, 32)
    decoder = quantized.decoder(cache)
    # the LoRA layers keep the blocks out of the one-call stack: the native decoder runs the blocks
    # module by module, each base product through quant.c's kernel (counted here)
    assert isinstance(decoder, NativeDecoder) and decoder.stack is None
    calls = []
    qgemv = ops.qgemv
    monkeypatch.setattr(ops, "qgemv", lambda *a, **k: calls.append(1) or qgemv(*a, **k))
    ids = torch.tensor([[5, 17, 301, 42, 7, 99], [3, 250, 11, 400, 8, 1]])
    ours = quantized.generate(ids, max_new_tokens=8, do_sample=False)
    assert len(calls) >= 7 * len(ALL_LINEAR) * quantized.config.num_hidden_layers
    assert torch.equal(ours, twin.generate(ids, max_new_tokens=8, do_sample=False))
    # and not the quantized model's own tokens without the adapter
    merged_away = copy.deepcopy(quantized)
    for name, layer in list(lora_layers(merged_away)):
        parent, _, child = name.rpartition(".")
        setattr(merged_away.get_submodule(parent), child, layer.base_layer)
    assert not torch.equal(ours, merged_away.generate(ids, max_new_tokens=8, do_sample=False))


def test_merging_into_a_quantized_base_is_a_clear_error(quantized_and_twin):
    _, quantized, _, adapter = quantized_and_twin
    load_adapter(quantized, adapter)
    with pytest.raises(AdapterError, match=r"q_proj: the base layer is quantized \(Q8_0.*convert merge-lora.*quantize"):
        merge_lora(quantized)
    assert len(dict(lora_layers(quantized))) == len(ALL_LINEAR) * quantized.config.num_hidden_layers  # untouched


def test_adapter_gradients_on_a_quantized_base_are_the_float_models():
    # Not a supported way to train (the trainer refuses a GGUF base), but never silently wrong.
    model = random_model(tiny_config())
    quantized = cpu.accelerate(quantize(copy.deepcopy(model), "Q8_0", head=False))
    twin = _dequantized_twin(model, quantized)
    for m in (quantized, twin):
        apply_lora(m, r=4, alpha=8.0)
        _randomize_adapters(m)
        m(IDS, labels=IDS).loss.backward()
    theirs = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in quantized.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fine_tuning_a_gguf_base_is_refused_with_the_way_to_do_it():
    from qwenkit.errors import RecipeError
    from qwenkit.finetune.config import load_config

    with pytest.raises(RecipeError, match=r"key 'model'.*GGUF file.*inference only.*full-precision checkpoint"):
        load_config(None, {"model": "qwen2.5-7b-instruct-q4_k_m.gguf", "data": "train.jsonl", "output": "runs/x"})


def test_generate_command_runs_a_gguf_file_with_an_adapter(tmp_path, capsys):
    from qwenkit.cli import main
    from qwenkit.generate import SamplingParams
    from qwenkit.text import complete

    path, folder = _gguf_file(tmp_path, random_model(tiny_config()))
    twin, adapter = _save_random_adapter(load_model(folder), tmp_path / "adapter")
    command = ["generate", "--model", str(path), "--raw", "--prompt", "the the", "--max-new-tokens", "6"]
    outputs = []
    for flags in ([], ["--adapter", str(adapter)]):
        assert main([*command, "--temperature", "0", *flags]) == 0
        outputs.append(capsys.readouterr().out.strip())
    tok = qwenkit.load_tokenizer(path)
    params = SamplingParams.from_model(twin, max_new_tokens=6, do_sample=False)
    assert outputs[1] == complete(twin, tok, ["the the"], params, chat=False)[0].text.strip()
    assert outputs[1] != outputs[0]  # the flag really applies the adapter


def test_the_applications_run_a_gguf_file_with_an_adapter(tmp_path, capsys, monkeypatch):
    import qwenkit.lora
    from qwenkit.cli import main
    from qwenkit.tasks import write

    path, folder = _gguf_file(tmp_path, random_model(tiny_config()))
    _, adapter = _save_random_adapter(load_model(folder), tmp_path / "adapter")
    assert main(["write", "the the", "--model", str(path), "--temperature", "0", "--max-new-tokens", "6",
                 "--adapter", str(adapter)]) == 0  # fmt: skip
    tuned, tok = load_adapter(qwenkit.load_model(path), adapter), qwenkit.load_tokenizer(path)
    params = write.TASK.sampling(tuned, 6, 0.0, None)
    expected = write.join("the the", write.write(tuned, tok, ["the the"], params, "continue")[0])
    assert capsys.readouterr().out.strip() == expected.strip()
    applied = []  # every application loads the adapter onto the quantized model it runs
    monkeypatch.setattr(qwenkit.lora, "load_adapter", lambda m, a: applied.append(a) or load_adapter(m, a))
    short = ["--max-new-tokens", "2"]
    for app in (["qa", "why?", *short], ["translate", "hello", "--to", "French", *short], ["sentiment", "good"],
                ["code", "add", *short]):  # fmt: skip
        # (code exits 1 when the reply holds no code, as a random model's does not)
        assert main([*app, "--model", str(path), "--adapter", str(adapter)]) in (0, 1), app
        assert applied.pop() == str(adapter) and isinstance(capsys.readouterr().out, str)
    assert main(["eval", "sentiment", "--predictions", str(tmp_path / "p.jsonl"), "--adapter", str(adapter)]) == 2
    assert "--adapter goes on a --model" in capsys.readouterr().err
