"""Native CPU kernels for decoding, built on first use with the machine's C compiler.

- `gemv` (and `gemv_int8`, for qwenkit.quant's int8 weights): the product of a few rows with a
  weight matrix, which is all that decoding does with its weights. PyTorch's CPU matmul runs a
  single-row product on one core at about half of the memory bandwidth (bf16 through oneDNN a
  little better); this kernel streams the weight on every core at close to the bandwidth
  (benchmarks/README.md has the figures).
- `decode_attention`: a layer's attention for one new token per row (RoPE, the cache write, the
  attention itself) in one call instead of about thirty small PyTorch ops.
- `rms_norm`: RMSNorm of a few rows in one call instead of about eight ops.
- `DecodeStack`: a whole decoding step through every block and the final norm in one call
  (decode.c), the threads in one parallel region; what QwenForCausalLM uses for plain blocks.
- `argmax`: greedy decoding's pick over the vocabulary.

The sources (*.c here, with common.h) are compiled once per machine with `$CC` (else cc, gcc or
clang) and `-O3 -march=native -fopenmp`, into qwenkit's cache folder, and loaded with ctypes: no
PyTorch headers, a build of about a second. Where there is no compiler, or the build fails, every
function here returns None after one warning and callers use PyTorch. `QWENKIT_KERNELS=0` turns
them off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from qwenkit.files import cache_dir

MAX_ROWS = 8  # rows of x per call; more rows are a matmul, where PyTorch is the better kernel
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_SOURCES = [
    Path(__file__).parent.parent / "cpu" / "csrc" / name
    for name in ("gemv.c", "attention.c", "norm.c", "decode.c", "argmax.c")
]
_HEADERS = [
    Path(__file__).parent.parent / "cpu" / "csrc" / "common.h"
]  # included by the sources: part of the build's key
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_gemv: dict = {}  # dtype -> the loaded ctypes function
_rms_norm: dict = {}
_tried = False


def enabled() -> bool:
    return os.environ.get("QWENKIT_KERNELS", "1") != "0"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _machine_key() -> str:
    """What -march=native depends on: the CPU's feature flags where Linux lists them."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def _build(cc: str) -> Path:
    parts = [p.read_bytes() for p in _SOURCES + _HEADERS] + [
        cc.encode(),
        " ".join(FLAGS).encode(),
        _machine_key().encode(),
    ]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"qwenkit-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [cc, *FLAGS, *map(str, _SOURCES), "-o", tmp], check=True, capture_output=True, text=True, timeout=120
        )
        os.replace(tmp, target)  # atomic: a concurrent build or a killed one never leaves half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        cc = _compiler()
        try:
            if cc is None:
                raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
            lib = ctypes.CDLL(str(_build(cc)))
            for suffix in _SUFFIX.values():
                fn = getattr(lib, f"qwenkit_gemv_{suffix}")
                fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3 + [ctypes.c_int]
                fn.restype = ctypes.c_int
                fn = getattr(lib, f"qwenkit_decode_attention_{suffix}")
                fn.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_long] * 5 + [ctypes.c_int]
                fn.restype = ctypes.c_int
                fn = getattr(lib, f"qwenkit_rms_norm_{suffix}")
                fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_float]
                fn.restype = ctypes.c_int
                fn = getattr(lib, f"qwenkit_argmax_{suffix}")
                fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_int]
                fn.restype = ctypes.c_int
                fn = getattr(lib, f"qwenkit_decode_layers_{suffix}")
                fn.argtypes = (
                    [ctypes.c_void_p, ctypes.c_long]
                    + [ctypes.c_void_p] * 6
                    + [ctypes.c_long] * 7
                    + [ctypes.c_float, ctypes.c_int]
                )
                fn.restype = ctypes.c_int
            lib.qwenkit_gemv_int8.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3 + [ctypes.c_int]
            lib.qwenkit_gemv_int8.restype = ctypes.c_int
            _gemv.update({dtype: getattr(lib, f"qwenkit_gemv_{suffix}") for dtype, suffix in _SUFFIX.items()})
            _rms_norm.update({dtype: getattr(lib, f"qwenkit_rms_norm_{suffix}") for dtype, suffix in _SUFFIX.items()})
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            warnings.warn(
                f"qwenkit: the native decoding kernel is unavailable, so decoding uses PyTorch's "
                f"matmul (slower on CPU): {detail.strip()[:500]}",
                RuntimeWarning,
                stacklevel=3,
            )
        _tried = True
        return _lib


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` for up to MAX_ROWS rows on CPU, or None where the kernel does not apply.

    It applies to fp32 and bf16 with every tensor in the same dtype and a contiguous weight. It
    records nothing for autograd: callers use it under no_grad only.
    """
    # This runs ~170 times per decoded token: the checks are the cheap ones, and the function is
    # looked up once (each microsecond here is about 1% of a small model's bf16 decode step).
    fn = (_lib if _tried else _load()) and _gemv.get(x.dtype)
    if not fn or not x.is_cpu or not weight.is_cpu or weight.dtype != x.dtype or not weight.is_contiguous():
        return None
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if not 0 < rows <= MAX_ROWS or (bias is not None and (bias.dtype != x.dtype or not bias.is_cpu)) or not enabled():
        return None
    x2 = x.contiguous()
    b = None if bias is None else bias.contiguous()
    y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)
    if fn(
        x2.data_ptr(),
        weight.data_ptr(),
        None,
        None if b is None else b.data_ptr(),
        y.data_ptr(),
        rows,
        out_features,
        in_features,
        torch.get_num_threads(),
    ):
        raise RuntimeError(f"qwenkit gemv rejected shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return y


def gemv_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """(x @ weight.T) * scale in fp32 for up to MAX_ROWS rows of x: int8 weights (out, in) with one
    bf16 scale per output row (qwenkit.quant's layout). None where the kernel does not apply."""
    lib = _lib if _tried else _load()
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if (
        not lib
        or not x.is_cpu
        or not weight.is_cpu
        or weight.dtype != torch.int8
        or not weight.is_contiguous()
        or scale.dtype != torch.bfloat16
        or scale.shape != (out_features,)
        or not scale.is_contiguous()
        or not 0 < rows <= MAX_ROWS
        or not enabled()
    ):
        return None
    x2 = x.float().contiguous()
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.float32)
    if lib.qwenkit_gemv_int8(
        x2.data_ptr(),
        weight.data_ptr(),
        scale.data_ptr(),
        None,
        y.data_ptr(),
        rows,
        out_features,
        in_features,
        torch.get_num_threads(),
    ):
        raise RuntimeError(f"qwenkit gemv_int8 rejected shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return y


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor | None:
    """One decoding step of a layer's attention, or None where the kernel does not apply.

    q (B, 1, H*D), k and v (B, 1, K*D): the projections of one new token per row, before RoPE;
    cos, sin (B, 1, D); k_cache, v_cache (B, K, S, D), written at `slots` (B,); valid (B, S), the
    slots holding real tokens (the new one's flag already set). A row attends to its valid slots
    before its new one, and to the new one. Returns (B, 1, H*D) in q's dtype.
    """
    suffix = _SUFFIX.get(q.dtype)
    B, K, S, D = k_cache.shape
    tensors = (q, k, v, cos, sin, k_cache, v_cache)
    if (
        suffix is None
        or not enabled()
        or any(t.device.type != "cpu" or t.dtype != q.dtype for t in tensors)
        or not all(t.is_contiguous() for t in (*tensors, slots, valid))
        or q.shape[:2] != (B, 1)
        or q.shape[-1] % D
        or k.shape != (B, 1, K * D)
        or v.shape != k.shape
        or cos.shape != (B, 1, D)
        or sin.shape != cos.shape
        or v_cache.shape != k_cache.shape
        or slots.dtype != torch.int64
        or slots.shape != (B,)
        or valid.dtype != torch.bool
        or valid.shape != (B, S)
    ):
        return None
    lib = _load()
    if lib is None:
        return None
    H = q.shape[-1] // D
    out = torch.empty_like(q)
    status = getattr(lib, f"qwenkit_decode_attention_{suffix}")(
        *(t.data_ptr() for t in (q, k, v, cos, sin, k_cache, v_cache, slots, valid, out)),
        B,
        H,
        K,
        S,
        D,
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(
            f"qwenkit decode_attention rejected its inputs (status {status}): q {tuple(q.shape)}, "
            f"cache {tuple(k_cache.shape)}, slots {slots.tolist()}"
        )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """qwenkit's RMSNorm for up to MAX_ROWS rows on CPU (fp32 or bf16), or None where it does not apply."""
    fn = (_lib if _tried else _load()) and _rms_norm.get(x.dtype)
    C = x.shape[-1]
    if (
        not fn
        or not x.is_cpu
        or not weight.is_cpu
        or weight.dtype != x.dtype
        or weight.shape != (C,)
        or not weight.is_contiguous()
        or not 0 < x.numel() <= MAX_ROWS * C
        or not enabled()
    ):
        return None
    x2 = x.contiguous()
    y = torch.empty_like(x2)
    if fn(x2.data_ptr(), weight.data_ptr(), y.data_ptr(), x2.numel() // C, C, eps):
        raise RuntimeError(f"qwenkit rms_norm rejected x {tuple(x.shape)}")
    return y


def argmax(logits: torch.Tensor) -> torch.Tensor | None:
    """torch.argmax(logits, -1) of (B, V) fp32 or bf16 logits on CPU (ties: the first; a NaN wins),
    as int64 (B,); or None where the kernel does not apply."""
    suffix = _SUFFIX.get(logits.dtype)
    lib = (_lib if _tried else _load()) if suffix else None
    if lib is None or logits.dim() != 2 or not logits.is_cpu or not logits.is_contiguous() or not enabled():
        return None
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    if getattr(lib, f"qwenkit_argmax_{suffix}")(
        logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr(), torch.get_num_threads()
    ):
        raise RuntimeError(f"qwenkit argmax rejected logits {tuple(logits.shape)}")
    return out


LAYER_TENSORS = (
    "input_layernorm",
    "q_proj",
    "q_bias",
    "k_proj",
    "k_bias",
    "v_proj",
    "v_bias",
    "o_proj",
    "post_attention_layernorm",
    "gate_proj",
    "up_proj",
    "down_proj",
    "k_cache",
    "v_cache",
)


class DecodeStack:
    """A stack of blocks checked once for decode.c, which runs a decoding step through all of them
    in one native call. Build with `DecodeStack.build`; call with each step's inputs."""

    def __init__(
        self, fn, layers: list[tuple], dtype: torch.dtype, dims: tuple[int, ...], final_norm: torch.Tensor | None = None
    ):
        self._fn, self.dtype, self._dims, self.final_norm = fn, dtype, dims, final_norm
        self._layers = layers  # what the pointers point into stays alive as long as the stack
        self._pointers = (ctypes.c_void_p * (len(layers) * len(LAYER_TENSORS)))(
            *(None if t is None else t.data_ptr() for layer in layers for t in layer)
        )

    @classmethod
    def build(cls, layers: list[tuple], final_norm: torch.Tensor | None = None) -> DecodeStack | None:
        """layers: per block, its tensors in LAYER_TENSORS' order: weights (out, in), the q/k/v
        biases or None, the caches (B, K, S, D); final_norm: the weight of an RMSNorm applied after
        the last block (with the same eps), or None. None where the kernel does not apply: every
        tensor must be on the CPU, contiguous, in one dtype (fp32 or bf16), at most MAX_ROWS cache
        rows."""
        if not layers or len(layers[0]) != len(LAYER_TENSORS) or not enabled():
            return None
        dtype, k_cache = layers[0][0].dtype, layers[0][12]
        suffix = _SUFFIX.get(dtype)
        if suffix is None or k_cache.dim() != 4 or layers[0][1].dim() != 2 or layers[0][9].dim() != 2:
            return None
        B, K, S, D = k_cache.shape
        (HD, C), I = layers[0][1].shape, layers[0][9].shape[0]
        shapes = (
            (C,),
            (HD, C),
            (HD,),
            (K * D, C),
            (K * D,),
            (K * D, C),
            (K * D,),
            (C, HD),
            (C,),
            (I, C),
            (I, C),
            (C, I),
            (B, K, S, D),
            (B, K, S, D),
        )
        required = (0, 1, 3, 5, 7, 8, 9, 10, 11, 12, 13)  # all but the biases
        for layer in layers:
            if len(layer) != len(shapes) or any(layer[i] is None for i in required):
                return None
            for t, shape in zip(layer, shapes):
                if t is not None and (t.shape != shape or t.dtype != dtype or not t.is_cpu or not t.is_contiguous()):
                    return None
        if final_norm is not None and (
            final_norm.shape != (C,)
            or final_norm.dtype != dtype
            or not final_norm.is_cpu
            or not final_norm.is_contiguous()
        ):
            return None
        lib = _load()
        if lib is None or not 0 < B <= MAX_ROWS or HD % D:
            return None
        return cls(
            getattr(lib, f"qwenkit_decode_layers_{suffix}"), layers, dtype, (B, C, HD // D, K, S, D, I), final_norm
        )

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        valid: torch.Tensor,
        eps: float,
    ) -> torch.Tensor | None:
        """x (B, 1, C): the new tokens' embeddings; cos, sin (B, 1, D): their rotary tables; slots
        (B,) and valid (B, S) as for decode_attention. Returns the last block's output (B, 1, C),
        through the final norm where the stack has one; None where these inputs do not fit it."""
        B, C, H, K, S, D, I = self._dims
        if (
            x.shape != (B, 1, C)
            or cos.shape != (B, 1, D)
            or sin.shape != cos.shape
            or slots.shape != (B,)
            or valid.shape != (B, S)
            or slots.dtype != torch.int64
            or valid.dtype != torch.bool
            or any(t.dtype != self.dtype for t in (x, cos, sin))
            or not all(t.is_cpu and t.is_contiguous() for t in (cos, sin, slots, valid))
        ):
            return None
        out = x.contiguous().clone()
        norm = None if self.final_norm is None else self.final_norm.data_ptr()
        status = self._fn(
            self._pointers,
            len(self._layers),
            norm,
            out.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            valid.data_ptr(),
            B,
            C,
            H,
            K,
            S,
            D,
            I,
            eps,
            torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError(
                f"qwenkit decode_layers rejected its inputs (status {status}): x {tuple(x.shape)}, "
                f"cache ({B}, {K}, {S}, {D}), slots {slots.tolist()}"
            )
        return out
