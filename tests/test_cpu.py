"""qwenkit.cpu: the native kernels against PyTorch, their typed binding against csrc/qwenkit.h,
the streaming modules against the plain ones, and the decode stack against both."""

import re

import pytest
import torch
import torch.nn.functional as F

from qwenkit import cpu
from qwenkit.cache import KVCache
from qwenkit.cpu import build, ops
from qwenkit.cpu.layers import StreamingLinear
from qwenkit.cpu.stack import BlockTensors, DecodeStack, NativeDecoder
from qwenkit.model import QwenForCausalLM


@pytest.fixture
def fresh_build(monkeypatch):
    """Forget any loaded library, so the test builds (or fails to build) its own."""
    monkeypatch.setattr(build, "_lib", None)
    monkeypatch.setattr(build, "_tried", False)
    monkeypatch.setattr(ops, "_functions", {})


def test_the_kernel_builds_here():
    # CI and the dev machines have a C compiler: a silent fallback would hide a broken kernel.
    assert build.library() is not None


def _header() -> str:
    text = (build.CSRC / "qwenkit.h").read_text()
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)  # without comments


def test_the_binding_table_matches_the_c_header():
    """ctypes trusts ops.SIGNATURES; the header is what the C side compiles against."""
    kinds = {"long": ops._L, "int": ops._I, "float": ops._F}
    declared = {}
    for name, params in re.findall(r"\bint\s+(qwenkit_\w+)\s*\(([^)]*)\)\s*;", _header()):
        parsed = []
        for param in params.split(","):
            words = param.replace("*", " * ").split()
            kind = ops._P if "*" in words else kinds[words[-2]]
            parsed.append((words[-1], kind))
        declared[name] = tuple(parsed)
    assert set(declared) == set(ops.EXPORTS)  # every export bound, nothing bound that is not exported
    for export, name in ops.EXPORTS.items():
        assert declared[export] == ops.SIGNATURES[name], export


def test_the_block_layout_matches_the_c_enum():
    enum = re.search(r"enum\s+block_tensor\s*\{([^}]*)\}", _header()).group(1)
    names = [n.strip() for n in enum.split(",") if n.strip()]
    assert names == [f.upper() for f in BlockTensors._fields] + ["BLOCK_TENSORS"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("out_features, in_features", [(64, 896), (131, 77), (1000, 4864)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_equals_linear(dtype, rows, out_features, in_features, bias):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    y = ops.gemv(x, w, b)
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
    y = ops.gemv(x, w)
    assert y.shape == (2, 4, 300)
    for b in range(2):
        for t in range(4):
            assert torch.equal(y[b, t], ops.gemv(x[b, t], w))


def test_gemv_declines_what_it_does_not_cover():
    w = torch.randn(16, 32)
    assert ops.gemv(torch.randn(ops.MAX_ROWS + 1, 32), w) is None  # a matmul
    assert ops.gemv(torch.randn(1, 32).half(), w.half()) is None  # no fp16 kernel
    assert ops.gemv(torch.randn(1, 32), w.bfloat16()) is None  # mixed dtypes
    assert ops.gemv(torch.randn(1, 32), torch.randn(32, 16).t()) is None  # strided weight


def _streaming_linear(in_features: int, out_features: int) -> StreamingLinear:
    layer = torch.nn.Linear(in_features, out_features, bias=False)
    layer.__class__ = StreamingLinear  # as cpu.accelerate retypes it
    return layer


def test_linear_uses_the_kernel_for_inference_only(monkeypatch):
    calls = []
    real = ops.gemv
    monkeypatch.setattr(ops, "gemv", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 64)
    layer = _streaming_linear(64, 32)
    y = layer(x)  # autograd on: F.linear, differentiable
    y.sum().backward()
    assert not calls and layer.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    assert calls == [1]


def test_no_compiler_falls_back_with_one_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    x, w = torch.randn(1, 64), torch.randn(32, 64)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert ops.gemv(x, w) is None
    layer = _streaming_linear(64, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))  # PyTorch's path, no second warning


def test_a_failed_build_names_the_compiler_error(fresh_build, monkeypatch, tmp_path, qwenkit_cache):
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(build, "SOURCES", [bad])
    with pytest.warns(RuntimeWarning, match="broken.c.*error"):
        assert ops.gemv(torch.randn(1, 64), torch.randn(32, 64)) is None
    assert all(p.name.startswith("qwenkit-") for p in (qwenkit_cache / "kernels").glob("*"))  # no temp file left


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("QWENKIT_KERNELS", "0")
    assert ops.gemv(torch.randn(1, 64), torch.randn(32, 64)) is None


def test_the_build_is_cached_per_machine(fresh_build, qwenkit_cache):
    assert build.library() is not None
    built = sorted((qwenkit_cache / "kernels").glob("*"))
    # this machine's build under its key, and no temporary file; other variants (test_quant's
    # builds, in the shared cache) may sit beside it
    assert build.build(build.compiler()) in built and not [p for p in built if p.name.startswith(".")]
    build._tried = False
    build.library()
    assert sorted((qwenkit_cache / "kernels").glob("*")) == built  # reused, no second build or temp file


def _decode(model, ids, mask, steps, dtype):
    """Prefill a left-padded batch, then greedy decode steps through the model's decoder (what
    qwenkit.generate runs); the logits and the cache."""
    cache = KVCache(model.config, ids.shape[0], ids.shape[1] + steps + 3, dtype=dtype)
    with torch.inference_mode():
        logits = [model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]]
        step = model.decoder(cache)
        for _ in range(steps):
            logits.append(step(logits[-1].argmax(-1)))
    return torch.stack(logits, 1).float(), cache


def _accelerated(config, dtype=torch.float32):
    from reference import random_model

    return cpu.accelerate(random_model(config).to(dtype))


def _module_by_module(monkeypatch):
    """The accelerated model's decoder without the stack: every module on its own kernel."""
    monkeypatch.setattr(DecodeStack, "build", classmethod(lambda cls, model, cache: None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 32: RoPE sixteen lanes at a time (half a head a multiple of 16); 16 and 12: one lane at a time,
# and 12 not a multiple of the kernel's 16 lanes anywhere
@pytest.mark.parametrize("head_dim", [32, 16, 12])
def test_decode_attention_equals_the_pytorch_path(monkeypatch, dtype, head_dim):
    from dataclasses import replace

    from reference import tiny_config

    config = replace(tiny_config(), hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2)
    model = _accelerated(config, dtype)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # rows of different lengths: per-row slots and positions
    mask[2, :1] = 0
    calls = []
    real = ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a: calls.append(1) or real(*a))
    _module_by_module(monkeypatch)
    native, native_cache = _decode(model, ids, mask, 6, dtype)
    assert len(calls) == 6 * config.num_hidden_layers
    monkeypatch.setattr(ops, "decode_attention", lambda *a: None)
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
    assert ops.decode_attention(q, kv, kv, cos, sin, cache, cache.clone(), slots, valid) is not None
    assert ops.decode_attention(q.half(), kv, kv, cos, sin, cache, cache, slots, valid) is None
    assert ops.decode_attention(q, kv, kv, cos, sin, cache.transpose(1, 2), cache, slots, valid) is None
    assert ops.decode_attention(q, kv, kv, cos, sin, cache, cache, slots.int(), valid) is None
    with pytest.raises(RuntimeError, match="decode_attention"):  # a slot outside the cache is refused, not written
        ops.decode_attention(q, kv, kv, cos, sin, cache, cache, slots + S, valid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [896, 100])  # 100: a tail after the 16-lane blocks
def test_rms_norm_equals_the_pytorch_norm(dtype, dim):
    from qwenkit.cpu.layers import StreamingRMSNorm
    from qwenkit.model import RMSNorm

    g = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim, eps=1e-6)
    norm.weight.data = torch.randn(dim, generator=g)
    norm = norm.to(dtype)
    x = (torch.randn(3, 1, dim, generator=g) * 3).to(dtype)
    native = ops.rms_norm(x, norm.weight, norm.eps)
    reference = norm(x).detach()  # the plain module
    assert native.shape == x.shape and native.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(native, reference, rtol=1e-6, atol=1e-6)
    else:  # the same roundings; only a last-bit difference in the fp32 statistics can flip one
        differ = native != reference
        assert differ.float().mean() < 0.01
        torch.testing.assert_close(native[differ].float(), reference[differ].float(), rtol=2**-7, atol=0)
    norm.__class__ = StreamingRMSNorm
    with torch.no_grad():
        assert torch.equal(norm(x), native)  # inference goes through the kernel
    assert torch.equal(norm(x).detach(), reference)  # autograd on: the plain path


def _count_stack_calls(monkeypatch) -> list:
    calls = []
    real = DecodeStack.__call__
    monkeypatch.setattr(DecodeStack, "__call__", lambda *a: calls.append(1) or real(*a))
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
    plain = random_model(config).to(dtype)
    model = _accelerated(config, dtype)
    model.load_state_dict(plain.state_dict())
    ids, mask = _padded_batch()
    calls = _count_stack_calls(monkeypatch)
    fused, fused_cache = _decode(model, ids, mask, 6, dtype)
    assert len(calls) == 6  # one native call per decoding step
    _module_by_module(monkeypatch)
    op_by_op, op_cache = _decode(model, ids, mask, 6, dtype)  # a kernel call per module
    torch_path, _ = _decode(plain, ids, mask, 6, dtype)  # the reference model
    # The same norm, products and RoPE feed the first layer's cache: equal, bit for bit. After it,
    # only SiLU's exp differs from PyTorch's (by an ulp or so).
    assert torch.equal(fused_cache.k[0], op_cache.k[0]) and torch.equal(fused_cache.v[0], op_cache.v[0])
    assert torch.equal(fused_cache.lengths, op_cache.lengths)
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(fused, op_by_op, rtol=tol, atol=tol)
    torch.testing.assert_close(fused, torch_path, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stack_decodes_batched_rows_as_rows_alone_bit_for_bit(dtype):
    from reference import tiny_config

    model = _accelerated(tiny_config(), dtype)
    # One-token prompts, so that every step is the stack's (a prefill's matmul blocks by batch size)
    ids = torch.randint(0, 512, (3, 1), generator=torch.Generator().manual_seed(5))
    batched, _ = _decode(model, ids, None, 6, dtype)
    for r in range(3):
        alone, _ = _decode(model, ids[r : r + 1], None, 6, dtype)
        assert torch.equal(alone[0], batched[r])


def test_the_stack_steps_aside_for_lora_and_hooks_and_takes_quantized_blocks(monkeypatch):
    from reference import tiny_config

    from qwenkit.lora import apply_lora
    from qwenkit.quant import quantize

    ids, mask = _padded_batch()
    calls = _count_stack_calls(monkeypatch)
    model = _accelerated(tiny_config())
    _decode(model, ids, mask, 2, torch.float32)
    assert len(calls) == 2

    for module in (model.model.layers[1].mlp, model.model.norm):
        hooked = []
        handle = module.register_forward_hook(lambda *a, hooked=hooked: hooked.append(1))
        calls.clear()
        _decode(model, ids, mask, 2, torch.float32)  # a new generation (a new cache) checks again
        assert calls == [] and len(hooked) == 3  # the prefill and both steps ran the hooked module
        handle.remove()

    model = _accelerated(tiny_config())
    _decode(model, ids, mask, 2, torch.float32)
    calls.clear()
    apply_lora(model, r=4)  # the model changes in place between two generations...
    steps, _ = _decode(model, ids, mask, 2, torch.float32)
    assert calls == []  # ...and the next one runs the changed blocks module by module
    assert torch.isfinite(steps).all()

    model = _accelerated(tiny_config(hidden_size=64, intermediate_size=128))
    calls.clear()
    quantize(model)  # Q8_0 blocks: decode.c runs them in the same one call
    steps, _ = _decode(model, ids, mask, 2, torch.float32)
    assert len(calls) == 2 and torch.isfinite(steps).all()


def test_the_stack_follows_a_model_moved_to_another_dtype(monkeypatch):
    from reference import tiny_config

    ids, mask = _padded_batch()
    calls = _count_stack_calls(monkeypatch)
    model = _accelerated(tiny_config())
    _decode(model, ids, mask, 2, torch.float32)
    model.to(torch.bfloat16)  # new storage for every weight
    native, _ = _decode(model, ids, mask, 3, torch.bfloat16)
    assert len(calls) == 2 + 3
    _module_by_module(monkeypatch)
    expected, _ = _decode(model, ids, mask, 3, torch.bfloat16)
    torch.testing.assert_close(native, expected, rtol=0.1, atol=0.1)


def test_the_stack_declines_what_it_does_not_cover():
    from reference import tiny_config

    model = _accelerated(tiny_config())
    cache = KVCache(model.config, 2, 16)
    assert DecodeStack.build(model, cache) is not None
    assert DecodeStack.build(model, KVCache(model.config, ops.MAX_ROWS + 1, 16)) is None  # too many rows
    assert DecodeStack.build(model, KVCache(model.config, 2, 16, dtype=torch.bfloat16)) is None  # dtypes differ
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight.data = q_proj.weight.data.t().contiguous().t()  # strided
    assert DecodeStack.build(model, cache) is None
    model = _accelerated(tiny_config())
    model.model.layers[1].mlp.up_proj.bias = torch.nn.Parameter(torch.zeros(model.config.intermediate_size))
    assert DecodeStack.build(model, cache) is None  # a bias Qwen2 does not have
    model = _accelerated(tiny_config())
    stack = DecodeStack.build(model, cache)
    C, D = model.config.hidden_size, model.config.dim_per_head
    x, cos = torch.randn(2, 1, C), torch.randn(2, 1, D)
    with pytest.raises(ValueError, match="built for x"):  # rows differ: refused before any pointer is read
        stack(x[:1], cos[:1], cos[:1], cache.lengths[:1], cache.valid[:1])
    with pytest.raises(ValueError, match="built for x"):  # dtype differs
        stack(x.bfloat16(), cos, cos, cache.lengths, cache.valid)
    with pytest.raises(RuntimeError, match="slots"):  # a slot past the cache's end
        stack(x, cos, cos, cache.lengths + 16, cache.valid)


def test_accelerate_keeps_names_and_leaves_a_plain_model_where_kernels_are_off(monkeypatch):
    from reference import random_model, tiny_config

    model = random_model(tiny_config())
    names = [n for n, _ in model.named_parameters()]
    assert cpu.accelerate(model) is model
    assert [n for n, _ in model.named_parameters()] == names  # the same parameters, under the same names
    assert type(model.model.layers[0].self_attn.q_proj) is StreamingLinear
    assert isinstance(model.decoder(KVCache(model.config, 1, 8)), NativeDecoder)
    monkeypatch.setenv("QWENKIT_KERNELS", "0")
    plain = cpu.accelerate(random_model(tiny_config()))
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(plain) is QwenForCausalLM  # its own plain decoder


def test_the_model_module_imports_no_kernel_code():
    """model.py is the reference: importing it loads nothing of qwenkit.cpu."""
    import subprocess
    import sys

    code = "import sys, qwenkit.model; print(sorted(m for m in sys.modules if m.startswith('qwenkit.cpu')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
