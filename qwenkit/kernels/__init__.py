"""Native CPU kernels, built on first use with the machine's C compiler.

One kernel so far, `gemv`: the product of a few rows with a weight matrix, which is all that
decoding does with its weights. PyTorch's CPU matmul runs a single-row product on one core at
about half of the memory bandwidth (bf16 through oneDNN a little better); this kernel streams the
weight on every core at close to the bandwidth (benchmarks/README.md has the figures).

The source (gemv.c) is compiled once per machine with `$CC` (else cc, gcc or clang) and
`-O3 -march=native -fopenmp`, into qwenkit's cache folder, and loaded with ctypes: no PyTorch
headers, a build of under a second. Where there is no compiler, or the build fails, `gemv` returns
None after one warning and callers use PyTorch. `QWENKIT_KERNELS=0` turns the kernels off.
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

MAX_ROWS = 8  # rows of x per call; more rows are a matmul, where PyTorch is the better kernel
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_SOURCE = Path(__file__).with_name("gemv.c")
_FUNCTIONS = {torch.float32: "qwenkit_gemv_f32", torch.bfloat16: "qwenkit_gemv_bf16"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
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
    from qwenkit.tokenizer import cache_dir

    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(FLAGS).encode(), _machine_key().encode()]))
    target = cache_dir() / "kernels" / f"gemv-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
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
            for name in _FUNCTIONS.values():
                fn = getattr(lib, name)
                fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
                fn.restype = ctypes.c_int
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            warnings.warn(f"qwenkit: the native decoding kernel is unavailable, so decoding uses PyTorch's "
                          f"matmul (slower on CPU): {detail.strip()[:500]}", RuntimeWarning, stacklevel=3)
        _tried = True
        return _lib


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` for up to MAX_ROWS rows on CPU, or None where the kernel does not apply.

    It applies to fp32 and bf16 with every tensor in the same dtype and a contiguous weight. It
    records nothing for autograd: callers use it under no_grad only.
    """
    name = _FUNCTIONS.get(x.dtype)
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if (name is None or not enabled() or not 0 < rows <= MAX_ROWS or x.device.type != "cpu"
            or weight.device.type != "cpu" or weight.dtype != x.dtype or not weight.is_contiguous()
            or (bias is not None and (bias.dtype != x.dtype or bias.device.type != "cpu"))):
        return None
    lib = _load()
    if lib is None:
        return None
    x2 = x.reshape(rows, in_features).contiguous()
    b = None if bias is None else bias.contiguous()
    y = torch.empty(rows, out_features, dtype=x.dtype)
    status = getattr(lib, name)(x2.data_ptr(), weight.data_ptr(), None if b is None else b.data_ptr(),
                                y.data_ptr(), rows, out_features, in_features, torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"qwenkit gemv rejected shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return y.view(*x.shape[:-1], out_features)
