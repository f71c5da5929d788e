"""Building the native kernels: csrc/*.c compiled once per machine with its own C compiler.

The sources are compiled with `$CC` (else cc, gcc or clang) and `-O3 -march=native -fopenmp` into
qwenkit's cache folder, keyed by the sources, the compiler, the flags and the CPU's features, and
loaded with ctypes: no PyTorch headers, a build of about a second. Where there is no compiler or the
build fails, `library()` warns once and returns None, and qwenkit decodes with PyTorch.
`QWENKIT_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

from qwenkit.files import atomic_path, cache_dir

CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.c"))
HEADERS = sorted(CSRC.glob("*.h"))  # included by the sources: part of the build's key
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
# The instruction sets a build targets. qwenkit builds "native"; the others compile csrc's other
# paths (AVX-VNNI, AVX2, plain C), which the tests run on a machine that has AVX-512 too.
VARIANTS = {
    "native": ["-march=native"],
    "avx-vnni": ["-march=x86-64-v3", "-mavxvnni"],
    "avx2": ["-march=x86-64-v3"],
    "portable": ["-march=x86-64", "-O2"],  # -O3 takes a minute here: GCC lowers 64-byte vectors to SSE2
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_variants: dict[str, ctypes.CDLL] = {}


def enabled() -> bool:
    return os.environ.get("QWENKIT_KERNELS", "1") != "0"


def compiler() -> str | None:
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


def build(cc: str, variant: str = "native") -> Path:
    """The compiled library for this machine (or another VARIANTS target), built now unless the
    cache has it."""
    flags = [*FLAGS, *VARIANTS[variant]]
    parts = [p.read_bytes() for p in SOURCES + HEADERS] + [cc.encode(), " ".join(flags).encode()]
    key = hashlib.sha256(b"\0".join(parts + [_machine_key().encode()])).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"qwenkit-{key}.so"
    if not target.exists():
        # A concurrent build, or a killed one, never leaves half a library under the final name.
        with atomic_path(target) as tmp:
            command = [cc, *flags, *map(str, SOURCES), "-o", str(tmp)]
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (after one warning) where they cannot be built or are turned off."""
    global _lib, _tried
    if not enabled():
        return None
    if not _tried:
        with _lock:
            if not _tried:
                _lib, _tried = _load(), True
    return _lib


def variant(name: str) -> ctypes.CDLL:
    """A build of the kernels for another instruction set (VARIANTS), for the tests; it runs only
    on a CPU that has that set. Raises where it cannot be built."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    if name not in _variants:
        _variants[name] = ctypes.CDLL(str(build(cc, name)))
    return _variants[name]


def _load() -> ctypes.CDLL | None:
    cc = compiler()
    try:
        if cc is None:
            raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
        return ctypes.CDLL(str(build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        warnings.warn(
            "qwenkit: the native decoding kernels are unavailable, so decoding uses PyTorch "
            f"(slower on CPU): {detail.strip()[:500]}",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
