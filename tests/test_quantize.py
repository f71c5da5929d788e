"""Weight-only int8: the kernel is exact up to bf16 activations, the model stays close to fp32,
the weights shrink to a quarter, and a quantized model is never saved."""

import copy
from dataclasses import replace

import pytest
import torch
from reference import random_model, tiny_config

from qwenkit.config import PRESETS
from qwenkit.quant import Int8Linear, quantize


def test_int8_linear_equals_its_dequantized_weight():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True)
    q = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(3, 5, 96, generator=gen)
    reference = torch.nn.functional.linear(x.to(torch.bfloat16).float(), q.dequantized_weight(), linear.bias)
    assert (q(x) - reference).abs().max() < 0.02 * reference.abs().max()
    # Per-row absmax scaling: every weight within half a quantization step of the original.
    step = linear.weight.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantized_weight() - linear.weight).abs() <= step * 0.51 + 1e-3).all()


def test_quantized_model_stays_close_and_shrinks():
    model = random_model(replace(PRESETS["qwen2.5-0.5b"], num_hidden_layers=2))
    q = quantize(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    assert isinstance(q.lm_head, Int8Linear)  # tied: the head gets its own int8 matrix
    float_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    int8_bytes = sum(m.weight_int8.numel() for m in q.modules() if isinstance(m, Int8Linear) if m is not q.lm_head)
    assert int8_bytes * 4 == float_bytes
    ids = torch.randint(0, 5000, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids).logits, q(ids).logits
    assert (a - b).abs().mean() < 0.05 * a.std()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.75  # random logits are flat: a hard case


def test_quantized_model_is_not_saved(tmp_path):
    q = quantize(random_model(tiny_config()))
    with pytest.raises(ValueError, match="int8-quantized"):
        q.save_pretrained(tmp_path)
