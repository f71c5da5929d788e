"""Weights in GGUF's block formats: csrc/quant.c's kernels against the gguf package's dequantizers
on every build path, a GGUF file loaded in place against its dequantized conversion, the decode
stack over quantized blocks against the module-by-module path, and `qwenkit.quantize` in memory."""

import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from gguf_files import tiny_vocab, write_gguf
from reference import random_model, tiny_config

import qwenkit
from qwenkit import cpu
from qwenkit.cpu import build, ops
from qwenkit.cpu.stack import DecodeStack
from qwenkit.errors import GGUFError
from qwenkit.gguf import convert_gguf, load_gguf
from qwenkit.model import load_model
from qwenkit.quant import BLOCK_FORMATS, QuantEmbedding, QuantLinear, quantize

Q = gguf.GGMLQuantizationType
FORMATS = list(BLOCK_FORMATS)
# Each build of csrc: this machine's (AVX-512 VNNI here), AVX-VNNI, AVX2 and plain C.
VARIANTS = list(build.VARIANTS)


def random_blocks(qtype: str, rows: int, K: int, seed: int = 0) -> torch.Tensor:
    """Rows of random blocks: random quants and bits, small random fp16 scales (and mins)."""
    rng = np.random.default_rng(seed)
    _, size, nbytes = BLOCK_FORMATS[qtype]
    if qtype == "F16":
        return torch.from_numpy((rng.standard_normal((rows, K)) * 0.1).astype(np.float16).view(np.uint8).copy())
    raw = rng.integers(0, 256, size=(rows, K // size, nbytes), dtype=np.uint8)

    def halves(offset):
        h = (rng.standard_normal((rows, K // size)) * 2e-3).astype(np.float16)
        raw[:, :, offset : offset + 2] = h.view(np.uint8).reshape(rows, K // size, 2)

    offsets = {"Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
    for offset in offsets.get(qtype, (0,)):
        halves(offset)
    return torch.from_numpy(raw.reshape(rows, -1))


def width(qtype: str) -> int:
    # K-quants take whole super-blocks; the others a width with an odd count of 32s, so that a
    # row's last group of 256 is partial and ends on half a chunk of 64
    return 768 if qtype.endswith("_K") else 736


@pytest.fixture(scope="module", params=VARIANTS)
def kernels(request):
    return build.variant(request.param)


@pytest.mark.parametrize("qtype", FORMATS)
def test_each_format_dequantizes_as_the_gguf_package_does(kernels, qtype):
    K = width(qtype)
    blocks = random_blocks(qtype, 19, K)
    expected = gguf.quants.dequantize(blocks.numpy(), Q[qtype]).reshape(19, K)
    assert np.array_equal(ops.dequantize(blocks, qtype, K, lib=kernels).numpy(), expected)


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("rows", [1, 4, 7])
def test_each_product_equals_the_dequantized_product(kernels, qtype, rows):
    """The product of the blocks with x quantized to int8 (what the kernels compute) equals, in
    fp32 up to summation order, the gguf package's dequantized weights times the dequantized x."""
    K, N = width(qtype), 37
    blocks = random_blocks(qtype, N, K, seed=rows)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(N)
    y = ops.qgemv(x, blocks, qtype, bias, lib=kernels)
    if qtype == "F16":  # F16 weights take x as it is
        xq = x.double()
    else:
        q, d = ops.quantize_activations(x, lib=kernels)
        xq = (q.double().reshape(rows, -1, 32) * d.double()[..., None]).reshape(rows, K)
        assert (xq - x.double()).abs().max() <= x.abs().max() / 127 * 0.51  # round to nearest of absmax/127
    w = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), Q[qtype]).reshape(N, K)).double()
    expected = xq @ w.T + bias.double()
    assert ((y.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize("qtype", ops.PACKABLE)
@pytest.mark.parametrize("rows, K", [(1, None), (4, None), (13, None), (140, 1280)])
def test_each_packed_product_equals_the_dequantized_product(kernels, qtype, rows, K):
    """The blocks packed in tiles of 16 rows (37 rows: the last tile partial), any number of rows
    of x (prefill's too), against the gguf package's dequantized weights times the dequantized x.
    13 rows take the copies for 8, 4 and 1; 140 rows of 1280 pass quant.c's chunk of K (1024) and
    its block of 128 rows of x, each with a partial last one."""
    K, N = K or width(qtype), 37
    blocks = random_blocks(qtype, N, K, seed=rows)
    packed = ops.pack(blocks, qtype, lib=kernels)
    assert packed.shape == (3, 16 * blocks.shape[1])  # the file's bytes, in whole tiles
    chunks = []  # packed a tile at a time, each chunk's blocks handed on when done: the same tiles
    assert torch.equal(ops.pack(blocks, qtype, lib=kernels, done=chunks.append, chunk_rows=16), packed)
    assert [c.shape[0] for c in chunks] == [16, 16, 5] and torch.equal(torch.cat(chunks), blocks)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(N)
    y = ops.qgemv(x, packed, qtype, bias, lib=kernels, packed_rows=N)
    q, d = ops.quantize_activations(x, lib=kernels)
    xq = (q.double().reshape(rows, -1, 32) * d.double()[..., None]).reshape(rows, K)
    w = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), Q[qtype]).reshape(N, K)).double()
    expected = xq @ w.T + bias.double()
    assert ((y.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5
    for r in range(rows):  # a row's result does not depend on the rows beside it
        assert torch.equal(ops.qgemv(x[r : r + 1], packed, qtype, bias, lib=kernels, packed_rows=N), y[r : r + 1])


def test_formats_without_a_packed_layout_are_not_packed():
    assert ops.pack(random_blocks("F16", 4, 256), "F16") is None


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
def test_batched_rows_equal_rows_alone_bit_for_bit(qtype):
    K = width(qtype)
    blocks = random_blocks(qtype, 50, K)
    x = torch.randn(8, K, generator=torch.Generator().manual_seed(3))
    y = ops.qgemv(x, blocks, qtype)
    for r in range(8):
        assert torch.equal(ops.qgemv(x[r : r + 1], blocks, qtype), y[r : r + 1])


def test_the_kernels_decline_what_they_do_not_cover():
    blocks = random_blocks("Q4_K", 4, 256)
    assert ops.qgemv(torch.randn(9, 256), blocks, "Q4_K") is None  # more rows than MAX_ROWS: prefill
    assert ops.qgemv(torch.randn(1, 512), blocks, "Q4_K") is None  # rows of another width
    assert ops.dequantize(blocks, "Q4_K", 512) is None


# ------------------------------------------------------------------------------------------------
# A GGUF file in place

# A mix as llama.cpp's Q4_K_M writes one (Q4_K, Q6_K for v and down in some layers, the others of
# another width in Q5_0 / Q8_0), plus one of every other format, on a model wide enough for K-quants.
MIX = {
    "token_embd.weight": "Q4_K",
    "blk.0.attn_q.weight": "Q4_K",
    "blk.0.attn_k.weight": "Q5_K",
    "blk.0.attn_v.weight": "Q6_K",
    "blk.0.attn_output.weight": "Q8_0",
    "blk.0.ffn_gate.weight": "Q4_0",
    "blk.0.ffn_up.weight": "Q4_1",
    "blk.0.ffn_down.weight": "Q5_1",
    "blk.1.attn_q.weight": "Q5_0",
    "blk.1.attn_k.weight": "F16",
    "blk.1.ffn_down.weight": "Q6_K",
}


def wide_config(**changes):
    return tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, **changes)  # fmt: skip


def mixed_file(path, model, mix=MIX, vocab=None):
    """The model with the tensors of `mix` in random blocks of those formats, the others F32."""
    shapes = {
        "token_embd.weight": model.model.embed_tokens.weight.shape,
        **{
            f"blk.{i}.{n}.weight": getattr(getattr(model.model.layers[i], part), hf).weight.shape
            for i in range(model.config.num_hidden_layers)
            for n, part, hf in [
                ("attn_q", "self_attn", "q_proj"), ("attn_k", "self_attn", "k_proj"),
                ("attn_v", "self_attn", "v_proj"), ("attn_output", "self_attn", "o_proj"),
                ("ffn_gate", "mlp", "gate_proj"), ("ffn_up", "mlp", "up_proj"), ("ffn_down", "mlp", "down_proj"),
            ]
        },
    }  # fmt: skip
    raw = {}
    for i, (name, qtype) in enumerate(mix.items()):
        rows, K = shapes[name]
        raw[name] = (random_blocks(qtype, rows, K, seed=i).numpy(), Q[qtype])
    return write_gguf(path, model, vocab or tiny_vocab(model.config.vocab_size), raw=raw)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    model = random_model(wide_config())
    path = mixed_file(root / "mixed.gguf", model)
    return path, convert_gguf(path, root / "converted")


def test_a_gguf_loads_in_place_and_computes_its_dequantized_conversion(mixed):
    path, folder = mixed
    model = load_gguf(path)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and model.lm_head is model.model.embed_tokens.head
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 11 and layers["model.layers.0.self_attn.v_proj"].qtype == "Q6_K"
    # the blocks are the file's bytes, in a mapping of the file: not a copy
    mappings = [line.split()[0].split("-") for line in open("/proc/self/maps") if line.rstrip().endswith(str(path))]
    ranges = [(int(a, 16), int(b, 16)) for a, b in mappings]
    assert all(any(a <= m.blocks.data_ptr() < b for a, b in ranges) for m in layers.values())
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    on_disk = np.frombuffer(path.read_bytes(), np.uint8)[tensor.data_offset : tensor.data_offset + tensor.n_bytes]
    assert np.array_equal(layers["model.layers.0.self_attn.q_proj"].blocks.numpy().reshape(-1), on_disk)
    reference = load_model(folder)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_qwenkit_loads_a_gguf_and_its_tokenizer(mixed):
    path, folder = mixed
    model = qwenkit.load_model(str(path))
    assert type(model) is cpu.StreamingQwenForCausalLM
    tok = qwenkit.load_tokenizer(path)
    assert tok.encode("the the") == qwenkit.load_tokenizer(folder).encode("the the")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == qwenkit.load_tokenizer(
        folder
    ).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_the_stack_decodes_quantized_blocks_as_the_modules_do(mixed, monkeypatch):
    path, _ = mixed
    model = qwenkit.load_model(path)
    cache = qwenkit.KVCache(model.config, 2, 32)
    assert DecodeStack.build(model, cache) is not None  # every block runs in the one native call
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    fused = model.generate(ids, max_new_tokens=6, do_sample=False)
    monkeypatch.setattr(DecodeStack, "build", classmethod(lambda cls, *a: None))
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), fused)
    # and the decoded tokens are those of the plain model, whose products are fp32
    plain = load_gguf(path)
    with torch.no_grad():
        logits = plain(fused[:, :-1]).logits[:, ids.shape[1] - 1 :]
    assert (logits.argmax(-1) == fused[:, ids.shape[1] :]).float().mean() > 0.8


def test_an_unsupported_type_is_named_with_the_fallback(tmp_path):
    model = random_model(wide_config())
    rows, K = model.model.layers[0].mlp.up_proj.weight.shape
    blob = np.random.default_rng(0).integers(0, 256, (rows, K // 256 * 84), dtype=np.uint8)  # Q2_K: 84 bytes/256
    path = write_gguf(tmp_path / "q2k.gguf", model, tiny_vocab(512), raw={"blk.0.ffn_up.weight": (blob, Q.Q2_K)})
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_up\.weight.*Q2_K.*convert gguf"):
        load_gguf(path)


def test_a_wrong_shape_and_a_truncated_file_are_clear_errors(tmp_path):
    model = random_model(wide_config())
    blob = random_blocks("Q8_0", 100, 256).numpy()  # 100 rows where q_proj has 256
    path = write_gguf(tmp_path / "shape.gguf", model, tiny_vocab(512), raw={"blk.0.attn_q.weight": (blob, Q.Q8_0)})
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_q\.weight.*shape"):
        load_gguf(path)
    good = mixed_file(tmp_path / "good.gguf", model)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(GGUFError, match="truncated"):
        load_gguf(cut)


# ------------------------------------------------------------------------------------------------
# qwenkit.quantize


@pytest.mark.parametrize("qtype, tolerance", [("Q8_0", 0.02), ("Q4_0", 0.25)])
def test_quantize_in_memory_stays_close_and_shrinks(qtype, tolerance):
    model = random_model(replace(wide_config(), vocab_size=1024))
    q = cpu.accelerate(quantize(copy.deepcopy(model), qtype))
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    assert isinstance(q.lm_head, QuantLinear) and q.lm_head.qtype == qtype  # tied: the head gets its own copy
    bits = 8.5 if qtype == "Q8_0" else 4.5
    layer = q.model.layers[0].mlp.down_proj
    assert layer.blocks.numel() * 8 == layer.in_features * layer.out_features * bits
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids).logits, q(ids).logits
    assert ((a - b).norm() / a.norm()).item() < tolerance
    out = q.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 20)


def test_quantized_model_is_not_saved(tmp_path):
    q = quantize(random_model(tiny_config()))
    with pytest.raises(ValueError, match="quantized"):
        q.save_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------
# Everything runs on quantized weights


def test_the_server_batches_requests_on_a_quantized_file(mixed):
    import httpx
    from test_server import MODEL, running

    path, _ = mixed
    with running(path, api_key=None) as srv:
        assert isinstance(srv.model.model.layers[0].self_attn.q_proj, QuantLinear)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "the"}], "max_tokens": 4, "temperature": 0}
        with httpx.Client(base_url=srv.url, timeout=60) as client, ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda _: client.post("/v1/chat/completions", json=body), range(3)))
    assert all(r.status_code == 200 for r in replies)
    messages = [r.json()["choices"][0]["message"] for r in replies]
    assert messages[0] == messages[1] == messages[2]  # greedy: a row decodes as it would alone


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt", "the", "--max-new-tokens", "3"],
        ["sentiment", "the the"],
        ["qa", "the?", "--context", "the the", "--max-new-tokens", "3"],
    ],
)
def test_the_commands_run_on_a_quantized_file(mixed, command, capsys):
    from qwenkit.cli import main

    path, _ = mixed
    assert main([*command, "--model", str(path)]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_a_row_with_a_partial_last_group_reads_nothing_past_its_end(qtype):
    """Qwen2.5-0.5B's width 896 is 3.5 groups of 256: the last row's last group must not read the
    blocks it does not have. The tensor here ends at a page the process may not read."""
    import ctypes
    import mmap

    K, N = 896, 5
    blocks = random_blocks(qtype, N, K)
    page = mmap.PAGESIZE
    size = (blocks.numel() + page - 1) // page * page
    region = mmap.mmap(-1, size + page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(base + size), page, 0) == 0  # PROT_NONE: a read faults
    start = size - blocks.numel()
    view = torch.frombuffer(region, dtype=torch.uint8, count=blocks.numel(), offset=start).view(N, -1)
    view.copy_(blocks)
    x = torch.randn(3, K)
    assert torch.equal(ops.qgemv(x, view, qtype), ops.qgemv(x, blocks, qtype))
    assert torch.equal(ops.dequantize(view, qtype, K), ops.dequantize(blocks, qtype, K))
    del view
