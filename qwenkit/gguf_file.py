"""GGUF's container read in one pass: the header, the metadata, the tensor table, and every tensor
as a numpy view of one memory map of the file.

The format (ggml's docs/gguf.md): magic "GGUF", version (2 or 3), tensor count, metadata count;
then the metadata as (key, value type, value) with arrays as (item type, count, items) and strings
as (uint64 length, UTF-8 bytes); then per tensor (name, dims, dims fastest first, ggml type,
offset); then the data, from the first multiple of general.alignment (32 by default).

Why not the `gguf` package's GGUFReader, which qwenkit used before: it makes numpy views for every
item of every array, which a Qwen2.5 vocabulary (151,665 tokens and 151,387 merges) turns into
about 7 s and 500 MB at every load (benchmarks/bench_gguf_read.py measures both readers). Here the
same values come out 50x sooner, in 0.13 s and 36 MB: numeric arrays as one numpy read, strings in one
loop. The test holds this reader's metadata and tensors equal to GGUFReader's on every file the
tests make. The gguf package still names the tensor types and their block sizes.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import struct
import sys
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from qwenkit.errors import GGUFError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
STRING, ARRAY, UINT64 = 8, 9, 10
# GGUF's scalar value types: type number -> numpy dtype (little-endian, as every file is).
SCALARS = {
    0: np.dtype("<u1"),
    1: np.dtype("<i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    7: np.dtype("?"),
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
# Tensor types read as elements, not blocks (the others are uint8 rows of blocks).
_ELEMENTS = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
             "I32": np.int32, "I64": np.int64}  # fmt: skip
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class _Corrupt(Exception):
    """What is wrong at a byte of the file; GGUFFile turns it into the one GGUFError."""

    def __init__(self, offset: int, what: str):
        super().__init__(offset, what)
        self.offset, self.what = offset, what


class Tensor(NamedTuple):
    """One tensor of the file: as the gguf package's ReaderTensor, less its `field`."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # uint64 dims, fastest first (ggml's order: torch's reversed)
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    data: np.ndarray  # a view of the map: elements in torch's order, or (..., row bytes) uint8 blocks


class GGUFFile:
    """A GGUF file's `metadata` ({key: value}, values as GGUFReader's `contents()` gives them:
    int, float, bool, str, or lists of them; the header's own GGUF.version, GGUF.tensor_count and
    GGUF.kv_count included), `tensors` (list of Tensor, in file order) and `alignment`.

    Args:
        path: the file.
        mode: numpy.memmap's mode: "r" read-only, "c" copy on write (the file never changes).
    """

    def __init__(self, path: str | PathLike, mode: str = "r"):
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 24:  # numpy cannot map an empty file; no header is this short
            raise self._error(0, f"{size} bytes, shorter than GGUF's header (truncated download?)")
        self.data = np.memmap(self.path, mode=mode)
        self._view = memoryview(self.data)
        self._within = ""  # the metadata key or tensor being read, for the error
        try:
            self._read()
        except _Corrupt as e:
            raise self._error(e.offset, self._within + e.what) from None

    def _read(self) -> None:
        import gguf  # the type names and block sizes

        if bytes(self._view[:4]) != MAGIC:
            raise _Corrupt(0, f"does not start with GGUF's magic (starts {bytes(self._view[:4])!r})")
        version = self._u32(4)
        if version not in VERSIONS:
            swapped = version and not version & 0xFFFF  # a big-endian file: its version reads as N << 24
            what = "a big-endian GGUF, which qwenkit does not read" if swapped else f"GGUF version {version}"
            raise _Corrupt(4, f"is {what} (qwenkit reads versions {' and '.join(map(str, VERSIONS))})")
        n_tensors, n_kv = self._u64(8), self._u64(16)
        self.metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
        offset = 24
        for _ in range(n_kv):
            key, offset = self._string(offset)
            self._within = f"metadata key '{key}': "
            value_type, offset = self._u32(offset), offset + 4
            self.metadata[key], offset = self._value(value_type, offset)
            self._within = ""
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise _Corrupt(offset, f"general.alignment is {alignment!r}, not a power of two")
        self.alignment = alignment
        table = []
        for _ in range(n_tensors):
            start = offset
            name, offset = self._string(offset)
            n_dims, offset = self._u32(offset), offset + 4
            dims, offset = self._array(UINT64, n_dims, offset)
            kind, offset = self._u32(offset), offset + 4
            relative, offset = self._u64(offset), offset + 8
            try:
                tensor_type = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise _Corrupt(start, f"tensor '{name}' has type number {kind}, which is no ggml type") from None
            table.append((name, tensor_type, np.array(dims, dtype=np.uint64), relative))
        base = -(-offset // alignment) * alignment
        self.tensors: list[Tensor] = []
        names = set()
        for name, tensor_type, dims, relative in table:
            if name in names:
                raise _Corrupt(base, f"tensor '{name}' appears twice")
            names.add(name)
            block, size = gguf.GGML_QUANT_SIZES[tensor_type]
            n = int(np.prod(dims, dtype=np.uint64))
            shape = tuple(int(d) for d in reversed(dims.tolist()))
            if n % block or (shape and shape[-1] % block):
                raise _Corrupt(
                    base, f"tensor '{name}' has {shape[-1]} columns, not whole {tensor_type.name} blocks of {block}"
                )
            n_bytes, start = n // block * size, base + relative
            if start + n_bytes > len(self.data):
                raise _Corrupt(start, f"tensor '{name}' runs past the end of the file (truncated download?)")
            dtype = _ELEMENTS.get(tensor_type.name)
            if dtype is None:  # blocks: (..., row bytes)
                shape = (*shape[:-1], shape[-1] // block * size) if shape else (n_bytes,)
                dtype = np.uint8
            data = self.data[start : start + n_bytes].view(dtype).reshape(shape)
            self.tensors.append(Tensor(name, tensor_type, dims, n, n_bytes, start, data))

    # -- reading, each call with the offset just after what it read ---------------------------

    def _error(self, offset: int, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: not a readable GGUF file (truncated or corrupt?): at byte {offset}, {what}")

    def _need(self, offset: int, n: int) -> None:
        if offset + n > len(self._view):
            raise _Corrupt(offset, f"{n} bytes needed, the file ends at {len(self._view)} (truncated download?)")

    def _u32(self, offset: int) -> int:
        self._need(offset, 4)
        return _U32.unpack_from(self._view, offset)[0]

    def _u64(self, offset: int) -> int:
        self._need(offset, 8)
        return _U64.unpack_from(self._view, offset)[0]

    def _string(self, offset: int) -> tuple[str, int]:
        n = self._u64(offset)
        self._need(offset + 8, n)
        try:
            return str(self._view[offset + 8 : offset + 8 + n], "utf-8"), offset + 8 + n
        except UnicodeDecodeError as e:
            raise _Corrupt(offset, f"a string that is not UTF-8 ({e})") from None

    def _value(self, value_type: int, offset: int) -> tuple[Any, int]:
        if value_type == STRING:
            return self._string(offset)
        if value_type == ARRAY:
            item_type, count = self._u32(offset), self._u64(offset + 4)
            return self._array(item_type, count, offset + 12)
        dtype = SCALARS.get(value_type)
        if dtype is None:
            raise _Corrupt(offset, f"value type {value_type}, which is no GGUF type")
        self._need(offset, dtype.itemsize)
        return np.frombuffer(self._view, dtype, 1, offset).item(), offset + dtype.itemsize

    def _array(self, item_type: int, count: int, offset: int) -> tuple[list, int]:
        dtype = SCALARS.get(item_type)
        if dtype is not None:  # numbers: one read
            self._need(offset, count * dtype.itemsize)
            return np.frombuffer(self._view, dtype, count, offset).tolist(), offset + count * dtype.itemsize
        if item_type == STRING:  # the vocabulary and the merges: one loop, no arrays
            view, items, unpack = self._view, [], _U64.unpack_from
            end = len(view)
            try:
                for _ in range(count):
                    n = unpack(view, offset)[0]
                    if offset + 8 + n > end:
                        raise struct.error
                    items.append(str(view[offset + 8 : offset + 8 + n], "utf-8"))
                    offset += 8 + n
            except struct.error:
                raise _Corrupt(
                    offset, "an array of strings runs past the end of the file (truncated download?)"
                ) from None
            except UnicodeDecodeError as e:
                raise _Corrupt(offset, f"a string that is not UTF-8 ({e})") from None
            return items, offset
        items = []  # arrays of arrays (GGUF allows them; no Qwen file has one)
        for _ in range(count):
            value, offset = self._value(item_type, offset)
            items.append(value)
        return items, offset


# -- giving back a view's pages ----------------------------------------------------------------

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux's number


def drop_pages(address: int, nbytes: int) -> bool:
    """Take the resident pages of [address, address + nbytes) out of this process, where the range
    lies inside one file mapping (a GGUFFile's, say) that nothing wrote to: the kernel reads them
    again from the page cache or the file if they are touched later, so the values never change,
    but they stop counting in the process's memory. For weights copied once into another layout
    (quant.c's packed tiles), this keeps them from being held twice. Only whole pages inside the
    range; False (nothing done) where the range is not file-mapped or off Linux.

    A copy-on-write page that was written would lose the write: call it only on views that are
    read, never written (GGUFFile's tensors are)."""
    start, end = -(-address // _PAGE) * _PAGE, (address + nbytes) // _PAGE * _PAGE
    if end <= start or not sys.platform.startswith("linux") or not _file_mapped(address, address + nbytes):
        return False
    return _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _file_mapped(start: int, end: int) -> bool:
    """Whether [start, end) lies in one mapping of a file (an inode, not anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, _, _, _, inode, *_ = line.split() + [""]
            lo, hi = (int(v, 16) for v in span.split("-"))
            if lo <= start < hi:
                return end <= hi and inode not in ("0", "")
    return False
