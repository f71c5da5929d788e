"""The native decoding kernel (qwenkit.kernels.gemv) against F.linear, and its fallbacks."""

import pytest
import torch
import torch.nn.functional as F

from qwenkit import kernels
from qwenkit.model import QwenForCausalLM, linear


@pytest.fixture
def fresh_build(monkeypatch):
    """Forget any loaded library, so the test builds (or fails to build) its own."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)


def test_the_kernel_builds_here():
    # CI and the dev machines have a C compiler: a silent fallback would hide a broken kernel.
    assert kernels._load() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("out_features, in_features", [(64, 896), (131, 77), (1000, 4864)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_equals_linear(dtype, rows, out_features, in_features, bias):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    y = kernels.gemv(x, w, b)
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.dtype == dtype and y.shape == (rows, out_features)
    # fp32: summation order only; bf16: one rounding of the fp32 sum, as PyTorch's bf16 matmul.
    tol = 1e-5 * in_features**0.5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_rows_equal_rows_alone_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 896, generator=g).to(dtype)  # (B, T, C): any leading shape
    w = torch.randn(300, 896, generator=g).to(dtype)
    y = kernels.gemv(x, w)
    assert y.shape == (2, 4, 300)
    for b in range(2):
        for t in range(4):
            assert torch.equal(y[b, t], kernels.gemv(x[b, t], w))


def test_gemv_declines_what_it_does_not_cover():
    w = torch.randn(16, 32)
    assert kernels.gemv(torch.randn(kernels.MAX_ROWS + 1, 32), w) is None  # a matmul
    assert kernels.gemv(torch.randn(1, 32).half(), w.half()) is None  # no fp16 kernel
    assert kernels.gemv(torch.randn(1, 32), w.bfloat16()) is None  # mixed dtypes
    assert kernels.gemv(torch.randn(1, 32), torch.randn(32, 16).t()) is None  # strided weight


def test_linear_uses_the_kernel_for_inference_only(monkeypatch):
    calls = []
    real = kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(1, 64), torch.randn(32, 64, requires_grad=True)
    y = linear(x, w)  # autograd on: F.linear, differentiable
    y.sum().backward()
    assert not calls and w.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w), F.linear(x, w))
    assert calls == [1]


def test_no_compiler_falls_back_with_one_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    x, w = torch.randn(1, 64), torch.randn(32, 64)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert kernels.gemv(x, w) is None
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w), F.linear(x, w))  # PyTorch's path, no second warning


def test_a_failed_build_names_the_compiler_error(fresh_build, monkeypatch, tmp_path, qwenkit_cache):
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(kernels, "_SOURCES", [bad])
    with pytest.warns(RuntimeWarning, match="broken.c.*error"):
        assert kernels.gemv(torch.randn(1, 64), torch.randn(32, 64)) is None
    assert all(p.name.startswith("qwenkit-") for p in (qwenkit_cache / "kernels").glob("*"))  # no temp file left


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("QWENKIT_KERNELS", "0")
    assert kernels.gemv(torch.randn(1, 64), torch.randn(32, 64)) is None


def test_the_build_is_cached_per_machine(fresh_build, qwenkit_cache):
    assert kernels._load() is not None
    built = sorted((qwenkit_cache / "kernels").glob("qwenkit-*.so"))
    assert len(built) == 1
    kernels._tried = False
    kernels._load()
    assert sorted((qwenkit_cache / "kernels").glob("*")) == built  # reused, no second build or temp file


def _decode(model, ids, mask, steps, dtype):
    """Prefill a left-padded batch, then greedy decode steps; the logits and the cache."""
    from qwenkit.model import KVCache

    cache = KVCache(model.config, ids.shape[0], ids.shape[1] + steps + 3, dtype=dtype)
    with torch.inference_mode():
        logits = [model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]]
        for _ in range(steps):
            logits.append(model(logits[-1].argmax(-1)[:, None], cache=cache, logits_to_keep=1).logits[:, -1])
    return torch.stack(logits, 1).float(), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 32: RoPE sixteen lanes at a time (half a head a multiple of 16); 16 and 12: one lane at a time,
# and 12 not a multiple of the kernel's 16 lanes anywhere
@pytest.mark.parametrize("head_dim", [32, 16, 12])
def test_decode_attention_equals_the_pytorch_path(monkeypatch, dtype, head_dim):
    from dataclasses import replace

    from reference import random_model, tiny_config

    config = replace(tiny_config(), hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2)
    model = random_model(config).to(dtype)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # rows of different lengths: per-row slots and positions
    mask[2, :1] = 0
    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(QwenForCausalLM, "_decode_natively", lambda *a: None)  # one module at a time
    native, native_cache = _decode(model, ids, mask, 6, dtype)
    assert len(calls) == 6 * config.num_hidden_layers
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: None)
    torch_path, torch_cache = _decode(model, ids, mask, 6, dtype)
    # The first layer's cache sees the same inputs either way: RoPE rounds as PyTorch does, exactly.
    assert torch.equal(native_cache.k[0], torch_cache.k[0]) and torch.equal(native_cache.v[0], torch_cache.v[0])
    assert torch.equal(native_cache.lengths, torch_cache.lengths)
    tol = 1e-5 if dtype == torch.float32 else 0.1  # bf16: the attention output's rounding flows on
    torch.testing.assert_close(native, torch_path, rtol=tol, atol=tol)


def test_decode_attention_declines_what_it_does_not_cover():
    B, H, K, S, D = 1, 4, 2, 8, 16
    q, kv = torch.randn(B, 1, H * D), torch.randn(B, 1, K * D)
    cos = sin = torch.randn(B, 1, D)
    cache = torch.zeros(B, K, S, D)
    slots, valid = torch.zeros(B, dtype=torch.long), torch.ones(B, S, dtype=torch.bool)
    assert kernels.decode_attention(q, kv, kv, cos, sin, cache, cache.clone(), slots, valid) is not None
    assert kernels.decode_attention(q.half(), kv, kv, cos, sin, cache, cache, slots, valid) is None
    assert kernels.decode_attention(q, kv, kv, cos, sin, cache.transpose(1, 2), cache, slots, valid) is None
    assert kernels.decode_attention(q, kv, kv, cos, sin, cache, cache, slots.int(), valid) is None
    with pytest.raises(RuntimeError, match="slots"):  # a slot outside the cache is refused, not written
        kernels.decode_attention(q, kv, kv, cos, sin, cache, cache, slots + S, valid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [896, 100])  # 100: a tail after the 16-lane blocks
def test_rms_norm_equals_the_pytorch_norm(dtype, dim):
    from qwenkit.model import RMSNorm

    g = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim, eps=1e-6)
    norm.weight.data = torch.randn(dim, generator=g)
    norm = norm.to(dtype)
    x = (torch.randn(3, 1, dim, generator=g) * 3).to(dtype)
    native = kernels.rms_norm(x, norm.weight, norm.eps)
    reference = norm(x).detach()  # autograd on: the PyTorch path
    assert native.shape == x.shape and native.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(native, reference, rtol=1e-6, atol=1e-6)
    else:  # the same roundings; only a last-bit difference in the fp32 statistics can flip one
        differ = native != reference
        assert differ.float().mean() < 0.01
        torch.testing.assert_close(native[differ].float(), reference[differ].float(), rtol=2**-7, atol=0)
    with torch.no_grad():
        assert torch.equal(norm(x), native)  # inference goes through the kernel


def _count_stack_calls(monkeypatch) -> list:
    calls = []
    real = kernels.DecodeStack.__call__
    monkeypatch.setattr(kernels.DecodeStack, "__call__", lambda *a: calls.append(1) or real(*a))
    return calls


def _padded_batch(seed=3, rows=3, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # rows of different lengths: per-row slots and positions
    mask[-1, :1] = 0
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 16, 12])
def test_the_whole_stack_in_one_call_equals_the_other_paths(monkeypatch, dtype, head_dim):
    from dataclasses import replace

    from reference import random_model, tiny_config

    config = replace(
        tiny_config(), hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, intermediate_size=72
    )  # 72: SwiGLU's sixteen-column blocks end partial
    model = random_model(config).to(dtype)
    ids, mask = _padded_batch()
    calls = _count_stack_calls(monkeypatch)
    fused, fused_cache = _decode(model, ids, mask, 6, dtype)
    assert len(calls) == 6  # one native call per decoding step
    monkeypatch.setattr(QwenForCausalLM, "_decode_natively", lambda *a: None)
    op_by_op, op_cache = _decode(model, ids, mask, 6, dtype)  # a kernel call per module
    monkeypatch.setenv("QWENKIT_KERNELS", "0")
    torch_path, _ = _decode(model, ids, mask, 6, dtype)
    # The same norm, products and RoPE feed the first layer's cache: equal, bit for bit. After it,
    # only SiLU's exp differs from PyTorch's (by an ulp or so).
    assert torch.equal(fused_cache.k[0], op_cache.k[0]) and torch.equal(fused_cache.v[0], op_cache.v[0])
    assert torch.equal(fused_cache.lengths, op_cache.lengths)
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(fused, op_by_op, rtol=tol, atol=tol)
    torch.testing.assert_close(fused, torch_path, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stack_decodes_batched_rows_as_rows_alone_bit_for_bit(dtype):
    from reference import random_model, tiny_config

    model = random_model(tiny_config()).to(dtype)
    # One-token prompts, so that every step is the stack's (a prefill's matmul blocks by batch size)
    ids = torch.randint(0, 512, (3, 1), generator=torch.Generator().manual_seed(5))
    batched, _ = _decode(model, ids, None, 6, dtype)
    for r in range(3):
        alone, _ = _decode(model, ids[r : r + 1], None, 6, dtype)
        assert torch.equal(alone[0], batched[r])


def test_the_stack_steps_aside_for_lora_int8_and_hooks(monkeypatch):
    from reference import random_model, tiny_config

    from qwenkit.lora import apply_lora
    from qwenkit.model import KVCache
    from qwenkit.quant import quantize

    ids, mask = _padded_batch()
    calls = _count_stack_calls(monkeypatch)
    model = random_model(tiny_config())
    _decode(model, ids, mask, 2, torch.float32)
    assert len(calls) == 2

    for module in (model.model.layers[1].mlp, model.model.norm):
        hooked = []
        handle = module.register_forward_hook(lambda *a: hooked.append(1))
        calls.clear()
        _decode(model, ids, mask, 2, torch.float32)  # a new generation (a new cache) checks again
        assert calls == [] and len(hooked) == 3  # the prefill and both steps ran the hooked module
        handle.remove()

    for transform in (lambda m: apply_lora(m, r=4), quantize):
        model = random_model(tiny_config())
        cache = KVCache(model.config, 3, 16)
        with torch.inference_mode():
            token = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
            model(token[:, None], cache=cache)  # the stack is checked and kept with this cache...
            calls.clear()
            transform(model)  # ...then the model changes in place, mid-generation
            model(token[:, None], cache=cache)
        assert calls == []  # the changed blocks run module by module


def test_the_stack_follows_a_model_moved_to_another_dtype(monkeypatch):
    from reference import random_model, tiny_config

    ids, mask = _padded_batch()
    calls = _count_stack_calls(monkeypatch)
    model = random_model(tiny_config())
    _decode(model, ids, mask, 2, torch.float32)
    model.to(torch.bfloat16)  # new storage for every weight
    native, _ = _decode(model, ids, mask, 3, torch.bfloat16)
    assert len(calls) == 2 + 3
    monkeypatch.setattr(QwenForCausalLM, "_decode_natively", lambda *a: None)
    expected, _ = _decode(model, ids, mask, 3, torch.bfloat16)
    torch.testing.assert_close(native, expected, rtol=0.1, atol=0.1)


def test_the_stack_declines_what_it_does_not_cover():
    from reference import random_model, tiny_config

    from qwenkit.model import KVCache
    from qwenkit.native import plain_block_tensors

    model = random_model(tiny_config())
    cache = KVCache(model.config, 2, 16)
    layers = [(*plain_block_tensors(b), cache.k[i], cache.v[i]) for i, b in enumerate(model.model.layers)]
    assert kernels.DecodeStack.build(layers) is not None
    assert kernels.DecodeStack.build([(*layers[0][:1], layers[0][1].t(), *layers[0][2:])]) is None  # strided
    assert kernels.DecodeStack.build([tuple(t if t is None else t.half() for t in layers[0])]) is None  # fp16
    big = KVCache(model.config, kernels.MAX_ROWS + 1, 16)
    assert kernels.DecodeStack.build([(*layers[0][:12], big.k[0], big.v[0])]) is None  # too many rows
    stack = kernels.DecodeStack.build(layers)
    C, D = model.config.hidden_size, model.config.dim_per_head
    x, cos = torch.randn(2, 1, C), torch.randn(2, 1, D)
    assert stack(x[:1], cos[:1], cos[:1], cache.lengths[:1], cache.valid[:1], 1e-6) is None  # rows differ
    assert stack(x.bfloat16(), cos, cos, cache.lengths, cache.valid, 1e-6) is None  # dtype differs
    with pytest.raises(RuntimeError, match="slots"):  # a slot past the cache's end
        stack(x, cos, cos, cache.lengths + 16, cache.valid, 1e-6)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("in_features", [896, 77])
def test_gemv_int8_equals_the_dequantized_product(rows, in_features):
    from qwenkit.quant import Int8Linear

    g = torch.Generator().manual_seed(rows + in_features)
    layer = Int8Linear(torch.randn(300, in_features, generator=g) * 0.05, None)
    x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
    y = kernels.gemv_int8(x, layer.weight_int8, layer.scale)
    expected = x.double() @ layer.dequantized_weight().double().t()
    assert y.dtype == torch.float32 and y.shape == (rows, 300)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    if in_features % 16 == 0:  # torch's kernel takes no other widths (see Int8Linear.forward)
        torch_kernel = torch._weight_int8pack_mm(x, layer.weight_int8, layer.scale)  # bf16 out
        torch.testing.assert_close(y.to(torch.bfloat16), torch_kernel, rtol=2**-7, atol=1e-3)
    for r in range(rows):  # rows alone equal the batch, bit for bit
        assert torch.equal(kernels.gemv_int8(x[r : r + 1], layer.weight_int8, layer.scale), y[r : r + 1])


def test_int8_layers_decode_through_the_kernel(monkeypatch):
    from qwenkit.quant import Int8Linear

    calls = []
    real = kernels.gemv_int8
    monkeypatch.setattr(kernels, "gemv_int8", lambda *a: calls.append(1) or real(*a))
    layer = Int8Linear(torch.randn(64, 32), torch.randn(64))
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        native = layer(x)
        monkeypatch.setattr(kernels, "gemv_int8", lambda *a: None)
        reference = layer(x)  # torch's int8 kernel
    assert calls == [1] and native.shape == (2, 1, 64)
    torch.testing.assert_close(native, reference, rtol=2**-7, atol=1e-2)


def test_int8_layers_of_any_width_run_in_every_path():
    from qwenkit.quant import Int8Linear

    layer = Int8Linear(torch.randn(64, 77), None)  # 77: a width torch's int8 kernel crashes on
    for rows in (1, 12):  # the native kernel, then a product too large for it
        x = torch.randn(rows, 77)
        with torch.no_grad():
            y = layer(x)
        expected = x.to(torch.bfloat16).float() @ layer.dequantized_weight().t()
        torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)
