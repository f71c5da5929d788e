"""The native decoding kernel (qwenkit.kernels.gemv) against F.linear, and its fallbacks."""

import pytest
import torch
import torch.nn.functional as F

from qwenkit import kernels
from qwenkit.model import linear


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
    tol = 1e-5 * in_features ** 0.5 if dtype == torch.float32 else 2 ** -7
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
@pytest.mark.parametrize("head_dim", [16, 12])  # 12: not a multiple of the kernel's 16 lanes
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
        torch.testing.assert_close(native[differ].float(), reference[differ].float(), rtol=2 ** -7, atol=0)
    with torch.no_grad():
        assert torch.equal(norm(x), native)  # inference goes through the kernel


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
        torch.testing.assert_close(y.to(torch.bfloat16), torch_kernel, rtol=2 ** -7, atol=1e-3)
    for r in range(rows):  # rows alone equal the batch, bit for bit
        assert torch.equal(kernels.gemv_int8(x[r:r + 1], layer.weight_int8, layer.scale), y[r:r + 1])


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
    torch.testing.assert_close(native, reference, rtol=2 ** -7, atol=1e-2)


def test_int8_layers_of_any_width_run_in_every_path():
    from qwenkit.quant import Int8Linear

    layer = Int8Linear(torch.randn(64, 77), None)  # 77: a width torch's int8 kernel crashes on
    for rows in (1, 12):  # the native kernel, then a product too large for it
        x = torch.randn(rows, 77)
        with torch.no_grad():
            y = layer(x)
        expected = x.to(torch.bfloat16).float() @ layer.dequantized_weight().t()
        torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)
