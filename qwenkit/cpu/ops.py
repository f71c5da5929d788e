"""The native kernels' Python side: one table of C signatures, and a function per kernel.

Each function takes and returns torch tensors, and returns None where its kernel does not apply
(another dtype, a strided tensor, more rows than MAX_ROWS, no library), so that a caller falls
back to PyTorch. None of them records anything for autograd: callers use them under no_grad.
Shapes: M rows of x, N output features, K input features; B rows, H heads, K kv heads, S slots,
D head dim.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from qwenkit.cpu import build
from qwenkit.quant import BLOCK_FORMATS, row_bytes

MAX_ROWS = 8  # rows of x per call (csrc's MAX_ROWS); more rows are a matmul, where PyTorch is the better kernel

_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
# Every exported function of csrc/, its parameters in C order: the one place the binding is typed.
# csrc/qwenkit.h declares the same, and tests/test_cpu.py reads the header and checks the two agree:
# ctypes trusts this table, and a mismatch would corrupt memory, not raise.
SIGNATURES: dict[str, tuple[tuple[str, type], ...]] = {
    "gemv": (("x", _P), ("w", _P), ("scale", _P), ("b", _P), ("y", _P), ("M", _L), ("N", _L), ("K", _L),
             ("threads", _I)),
    "decode_attention": (("q", _P), ("k", _P), ("v", _P), ("cos", _P), ("sin", _P), ("kc", _P), ("vc", _P),
                         ("slot", _P), ("valid", _P), ("out", _P), ("B", _L), ("H", _L), ("K", _L), ("S", _L),
                         ("D", _L), ("threads", _I)),
    "rms_norm": (("x", _P), ("w", _P), ("y", _P), ("rows", _L), ("C", _L), ("eps", _F)),
    "decode_layers": (("p", _P), ("types", _P), ("L", _L), ("final_norm", _P), ("x", _P), ("cos", _P), ("sin", _P),
                      ("slot", _P), ("valid", _P), ("B", _L), ("C", _L), ("H", _L), ("K", _L), ("S", _L), ("D", _L),
                      ("I", _L), ("eps", _F), ("threads", _I)),
    "qgemv": (("x", _P), ("w", _P), ("wtype", _I), ("b", _P), ("y", _P), ("M", _L), ("N", _L), ("K", _L),
              ("threads", _I)),
    "pack": (("w", _P), ("wtype", _I), ("N", _L), ("K", _L), ("out", _P), ("threads", _I)),
    "dequantize": (("w", _P), ("wtype", _I), ("rows", _L), ("K", _L), ("out", _P), ("threads", _I)),
    "quantize_activations": (("x", _P), ("M", _L), ("K", _L), ("q", _P), ("d", _P)),
}  # fmt: skip
# The first four kernels are compiled once per dtype; the block formats' (csrc/quant.c) take the
# format as an argument.
SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_TYPED = ("gemv", "decode_attention", "rms_norm", "decode_layers")
EXPORTS = {f"qwenkit_{name}_{suffix}": name for name in _TYPED for suffix in SUFFIXES.values()}
EXPORTS.update({f"qwenkit_{name}": name for name in SIGNATURES if name not in _TYPED})

_functions: dict[str, ctypes._CFuncPtr] = {}


def function(name: str, dtype: torch.dtype | None = None, lib: ctypes.CDLL | None = None):
    """The typed ctypes function `qwenkit_{name}_{dtype}` (or the exact export name), or None
    where the library is unavailable or there is no variant for this dtype. `lib`: another build
    of the kernels (build.variant's) instead of this machine's."""
    if lib is None:
        lib = build.library()
    if lib is None:
        return None
    export = name if dtype is None else f"qwenkit_{name}_{SUFFIXES.get(dtype, '')}"
    fn = _functions.get((id(lib), export))
    if fn is None and export in EXPORTS:
        fn = getattr(lib, export)
        fn.argtypes = [kind for _, kind in SIGNATURES[EXPORTS[export]]]
        fn.restype = ctypes.c_int
        _functions[(id(lib), export)] = fn
    return fn


def available() -> bool:
    return build.library() is not None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"qwenkit's {what} kernel rejected its inputs (status {status})")


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` for up to MAX_ROWS rows of x (..., K), or None where the kernel
    does not apply: fp32 or bf16, every tensor in one dtype on the CPU, a contiguous weight (N, K)."""
    N, K = weight.shape
    M = x.numel() // K if K else 0
    if not 0 < M <= MAX_ROWS or not x.is_cpu or not weight.is_cpu or weight.dtype != x.dtype:
        return None
    if not weight.is_contiguous() or (bias is not None and (bias.dtype != x.dtype or not bias.is_cpu)):
        return None
    fn = function("gemv", x.dtype)
    if fn is None:
        return None
    x = x.contiguous()
    b = None if bias is None else bias.contiguous().data_ptr()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
    _check(fn(x.data_ptr(), weight.data_ptr(), None, b, y.data_ptr(), M, N, K, torch.get_num_threads()), "gemv")
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """qwenkit.model.RMSNorm of up to MAX_ROWS rows of x (..., C), fp32 or bf16, or None where the
    kernel does not apply."""
    C = x.shape[-1]
    if not 0 < x.numel() <= MAX_ROWS * C or not x.is_cpu or not weight.is_cpu or weight.dtype != x.dtype:
        return None
    if weight.shape != (C,) or not weight.is_contiguous():
        return None
    fn = function("rms_norm", x.dtype)
    if fn is None:
        return None
    x = x.contiguous()
    y = torch.empty_like(x)
    _check(fn(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // C, C, eps), "rms_norm")
    return y


def decode_attention(q, k, v, cos, sin, k_cache, v_cache, slots, valid) -> torch.Tensor | None:
    """One decoding step of a layer's attention (RoPE, the cache write, attention), or None where
    the kernel does not apply.

    q (B, 1, H*D), k and v (B, 1, K*D): the projections of one new token per row, before RoPE;
    cos, sin (B, 1, D); k_cache, v_cache (B, K, S, D), written at `slots` (B,); valid (B, S), the
    slots holding real tokens (the new one's flag already set). A row attends to its valid slots
    before its new one, and to the new one. Returns (B, 1, H*D) in q's dtype.
    """
    B, K, S, D = k_cache.shape
    tensors = (q, k, v, cos, sin, k_cache, v_cache)
    if q.dtype not in SUFFIXES or any(not t.is_cpu or t.dtype != q.dtype for t in tensors):
        return None
    if not all(t.is_contiguous() for t in (*tensors, slots, valid)) or q.shape[:2] != (B, 1) or q.shape[-1] % D:
        return None
    if k.shape != (B, 1, K * D) or v.shape != k.shape or cos.shape != (B, 1, D) or sin.shape != cos.shape:
        return None
    if v_cache.shape != k_cache.shape or slots.dtype != torch.int64 or slots.shape != (B,):
        return None
    if valid.dtype != torch.bool or valid.shape != (B, S):
        return None
    fn = function("decode_attention", q.dtype)
    if fn is None:
        return None
    out = torch.empty_like(q)
    pointers = (t.data_ptr() for t in (q, k, v, cos, sin, k_cache, v_cache, slots, valid, out))
    _check(fn(*pointers, B, q.shape[-1] // D, K, S, D, torch.get_num_threads()), "decode_attention")
    return out


# Formats that quant.c can repack in tiles of PACK_ROWS rows, whose lanes are rows (its "Packed
# tiles"): the products then read them several times faster. A packed format's number is its own
# plus PACKED.
PACKABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
PACKED, PACK_ROWS = 64, 16


def packed_shape(rows: int, row_bytes: int) -> tuple[int, int]:
    """The shape of `rows` rows of `row_bytes` bytes in packed tiles: (tiles, bytes of a tile)."""
    return -(-rows // PACK_ROWS), PACK_ROWS * row_bytes


def pack(blocks: torch.Tensor, qtype: str, lib=None, done: Callable[[torch.Tensor], object] | None = None,
         chunk_rows: int = 4096) -> torch.Tensor | None:  # fmt: skip
    """`blocks` (N, row bytes) of a PACKABLE format in quant.c's tiles: uint8 (ceil(N / 16),
    16 * row bytes), for qgemv's `packed_rows=N`; None where the format has no packed layout or the
    library is unavailable. Packed `chunk_rows` rows (a multiple of 16) at a time, `done` called
    with each chunk's blocks once they are packed (to give back their pages as it goes)."""
    if qtype not in PACKABLE or blocks.dtype != torch.uint8 or blocks.dim() != 2 or not blocks.is_contiguous():
        return None
    fn = function("qwenkit_pack", lib=lib)
    if fn is None:
        return None
    N, rb = blocks.shape
    K = rb // BLOCK_FORMATS[qtype][2] * BLOCK_FORMATS[qtype][1]
    out = torch.empty(packed_shape(N, rb), dtype=torch.uint8)
    step = max(chunk_rows // PACK_ROWS, 1) * PACK_ROWS  # whole tiles: chunk n's are out's rows n0 / 16 on
    for n0 in range(0, N, step):
        chunk = blocks[n0 : n0 + step]
        tiles = out[n0 // PACK_ROWS :]
        _check(fn(chunk.data_ptr(), BLOCK_FORMATS[qtype][0], chunk.shape[0], K, tiles.data_ptr(),
                  torch.get_num_threads()), "pack")  # fmt: skip
        if done is not None:
            done(chunk)
    return out


def qgemv(x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None = None, lib=None,
          packed_rows: int | None = None) -> torch.Tensor | None:  # fmt: skip
    """`x @ W.T (+ bias)` in fp32 for rows of x (..., K), W the weights in `blocks` (N, row bytes)
    uint8 of a block format (BLOCK_FORMATS), or as `pack` packed them for N = packed_rows; x is
    quantized to int8 in blocks of 32 first (not for F16). At most MAX_ROWS rows, any number where
    packed. None where the kernel does not apply."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    rb = row_bytes(qtype, K)
    if packed_rows is None:
        N, shape, limit, wtype = blocks.shape[0], (blocks.shape[0], rb), MAX_ROWS, BLOCK_FORMATS[qtype][0]
    else:
        N, limit, wtype = packed_rows, None, BLOCK_FORMATS[qtype][0] + PACKED
        shape = packed_shape(N, rb)
    if M == 0 or (limit is not None and M > limit) or not x.is_cpu or not blocks.is_cpu:
        return None
    if blocks.dtype != torch.uint8 or blocks.shape != shape or not blocks.is_contiguous() or rb == 0:
        return None
    if bias is not None and (bias.shape != (N,) or bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    fn = function("qwenkit_qgemv", lib=lib)
    if fn is None:
        return None
    x = x.float().contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    b = None if bias is None else bias.data_ptr()
    _check(fn(x.data_ptr(), blocks.data_ptr(), wtype, b, y.data_ptr(), M, N, K, torch.get_num_threads()), "qgemv")
    return y


def dequantize(blocks: torch.Tensor, qtype: str, K: int, lib=None) -> torch.Tensor | None:
    """The fp32 weights (rows, K) of `blocks` (rows, row bytes) uint8 in a block format, or None
    where the kernel is unavailable."""
    if blocks.dtype != torch.uint8 or blocks.shape[-1:] != (row_bytes(qtype, K),) or not blocks.is_contiguous():
        return None
    fn = function("qwenkit_dequantize", lib=lib)
    if fn is None:
        return None
    rows = blocks.numel() // blocks.shape[-1] if blocks.shape[-1] else 0
    out = torch.empty(*blocks.shape[:-1], K, dtype=torch.float32)
    _check(fn(blocks.data_ptr(), BLOCK_FORMATS[qtype][0], rows, K, out.data_ptr(), torch.get_num_threads()),
           "dequantize")  # fmt: skip
    return out


def quantize_activations(x: torch.Tensor, lib=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x (M, K) as qgemv quantizes it: int8 q (M, K) and an fp32 scale per 32 values, d (M, K / 32),
    so that q * d (per block) is what the products use. None where the kernel is unavailable."""
    fn = function("qwenkit_quantize_activations", lib=lib)
    if fn is None:
        return None
    M, K = x.shape
    x = x.float().contiguous()
    q, d = torch.empty(M, K, dtype=torch.int8), torch.empty(M, K // 32, dtype=torch.float32)
    _check(fn(x.data_ptr(), M, K, q.data_ptr(), d.data_ptr()), "quantize_activations")
    return q, d
