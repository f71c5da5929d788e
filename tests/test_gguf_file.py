"""qwenkit.gguf_file, the one-pass GGUF reader, against the gguf package's GGUFReader (the oracle):
the same metadata (values and Python types) and the same tensors (types, shapes, offsets, bytes),
and a clear GGUFError, never another exception, for every damaged file."""

from __future__ import annotations

import sys

import gguf
import numpy as np
import pytest
import test_gguf_export
import torch

from qwenkit.errors import GGUFError
from qwenkit.gguf_file import GGUFFile, drop_pages

T = gguf.GGUFValueType
qwen_vocab_folder = test_gguf_export.qwen_vocab_folder  # the fixture: a tiny model, the real vocabulary


def _write(path, alignment=None, tensors=None, extra=()):
    w = gguf.GGUFWriter(path, "qwen2")
    if alignment is not None:
        w.add_custom_alignment(alignment)  # the key and the writer's own padding
    for key, value, vtype in [
        ("u8", 200, T.UINT8), ("i8", -100, T.INT8), ("u16", 60000, T.UINT16), ("i16", -30000, T.INT16),
        ("u32", 4_000_000_000, T.UINT32), ("i32", -2_000_000_000, T.INT32), ("f32", 1e-5, T.FLOAT32),
        ("u64", 2**63 + 5, T.UINT64), ("i64", -(2**62), T.INT64), ("f64", 1e-300, T.FLOAT64),
        ("yes", True, T.BOOL), ("no", False, T.BOOL), ("text", "héllo, 世界", T.STRING), ("empty", "", T.STRING),
        *extra,
    ]:  # fmt: skip
        w.add_key_value(key, value, vtype)
    w.add_array("tokens", ["a", "", "Ġthe", "<|im_end|>", "🙂"] * 50)
    w.add_array("scores", [0.5, -1.25, 3.0])
    w.add_array("types", [1, 3, 6])
    w.add_key_value("flags", [True, False], T.ARRAY, sub_type=T.BOOL)
    rng = np.random.default_rng(0)
    for name, qtype, shape in tensors or [
        ("f32", "F32", (3, 64)), ("f16", "F16", (2, 32)), ("bias", "F32", (64,)), ("ids", "I32", (5,)),
        ("q8", "Q8_0", (4, 64)), ("q4", "Q4_0", (3, 96)), ("q4k", "Q4_K", (2, 256)), ("q6k", "Q6_K", (2, 512)),
    ]:  # fmt: skip
        kind = gguf.GGMLQuantizationType[qtype]
        values = rng.standard_normal(shape).astype(np.float32)
        if qtype == "I32":
            w.add_tensor(name, np.arange(shape[0], dtype=np.int32))
        elif qtype in ("F32", "F16"):
            w.add_tensor(name, values.astype(np.float16 if qtype == "F16" else np.float32))
        elif qtype in ("Q8_0", "Q4_0"):
            w.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
        else:  # K-quants, which the gguf package cannot quantize: random blocks
            block, size = gguf.GGML_QUANT_SIZES[kind]
            blocks = rng.integers(0, 256, (shape[0], shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, blocks, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _same_as_gguf_package(path):
    ours, oracle = GGUFFile(path), gguf.GGUFReader(path)
    expected = {key: field.contents() for key, field in oracle.fields.items()}
    assert ours.metadata == expected
    assert [type(v) for v in ours.metadata.values()] == [type(v) for v in expected.values()]
    assert len(ours.tensors) == len(oracle.tensors)
    for a, b in zip(ours.tensors, oracle.tensors):
        assert (a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == (
            b.name, b.tensor_type, b.n_elements, b.n_bytes, b.data_offset
        )  # fmt: skip
        assert a.shape.tolist() == b.shape.tolist() and a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8))
    return ours


@pytest.mark.parametrize("alignment", [None, 64, 4096])
def test_the_reader_matches_the_gguf_package(tmp_path, alignment):
    ours = _same_as_gguf_package(_write(tmp_path / "m.gguf", alignment))
    assert ours.alignment == (alignment or 32)
    assert ours.metadata["f32"] == pytest.approx(1e-5) and ours.metadata["tokens"][4] == "🙂"


@pytest.mark.slow
def test_the_reader_matches_the_gguf_package_on_the_qwen_vocabulary(qwen_vocab_folder, tmp_path):
    """The whole Qwen2.5 vocabulary as `qwenkit quantize` writes it (151,665 tokens, 151,387
    merges); slow for the oracle's sake (GGUFReader takes about 7 s on it)."""
    path = test_gguf_export.write_gguf(qwen_vocab_folder, tmp_path / "q.gguf", "q8_0")
    ours = _same_as_gguf_package(path)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 151936


def test_arrays_of_arrays_read_as_lists_of_lists(tmp_path):
    ours = GGUFFile(_write(tmp_path / "m.gguf", extra=[("nested", [[1, 2], [3]], T.ARRAY)]))
    assert ours.metadata["nested"] == [[1, 2], [3]]


def test_every_truncation_is_a_clear_error(tmp_path):
    path = _write(tmp_path / "m.gguf", tensors=[("w", "Q8_0", (2, 32))])
    data = path.read_bytes()
    w = GGUFFile(path).tensors[0]
    end = w.data_offset + w.n_bytes  # the writer pads the file after it: cutting padding loses nothing
    cut = tmp_path / "cut.gguf"
    # a length in every 7 bytes of the header, and every length inside the tensor's data
    for n in [*range(0, w.data_offset, 7), *range(w.data_offset, end)]:
        cut.write_bytes(data[:n])
        with pytest.raises(GGUFError, match="truncated"):
            GGUFFile(cut)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda b: b"GGUX" + b[4:], "magic"),
        (lambda b: b[:4] + (1).to_bytes(4, "little") + b[8:], "version 1"),
        (lambda b: b[:4] + (3 << 24).to_bytes(4, "little") + b[8:], "big-endian"),
    ],
)
def test_a_damaged_header_is_a_clear_error(tmp_path, damage, match):
    path = _write(tmp_path / "m.gguf")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(GGUFError, match=match):
        GGUFFile(path)


def test_an_unknown_tensor_type_names_the_tensor(tmp_path):
    path = _write(tmp_path / "m.gguf", tensors=[("blk.0.w", "F32", (2, 32))])
    data = bytearray(path.read_bytes())
    # the tensor table's entry: name, n_dims, dims, then the type (F32 = 0) and the offset
    at = data.index(b"blk.0.w") + len("blk.0.w") + 4 + 2 * 8
    assert data[at : at + 4] == (0).to_bytes(4, "little")
    data[at : at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(data)
    with pytest.raises(GGUFError, match=r"'blk\.0\.w' has type number 99"):
        GGUFFile(path)


def test_an_unknown_value_type_names_the_key(tmp_path):
    path = _write(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    at = data.index(b"yes") + 3  # the key's value type (BOOL = 7) follows its name
    data[at : at + 4] = (42).to_bytes(4, "little")
    path.write_bytes(data)
    with pytest.raises(GGUFError, match="metadata key 'yes': .*value type 42"):
        GGUFFile(path)


def _resident_kb(address: int) -> int:
    """The resident kB of the mapping that holds `address` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("no mapping holds the address")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")
def test_drop_pages_gives_back_a_mapped_tensors_pages_and_keeps_its_values(tmp_path):
    path = _write(tmp_path / "m.gguf", tensors=[("w", "F32", (1024, 1024))])  # 4 MiB
    w = GGUFFile(path, "c").tensors[0].data
    expected = np.array(w)  # reads every page: resident
    address = w.ctypes.data
    before = _resident_kb(address)
    assert before >= 4096
    assert drop_pages(address, w.nbytes)
    assert _resident_kb(address) <= before - 4000
    assert np.array_equal(w, expected)  # read again from the file
    anonymous = torch.ones(1 << 20)  # not a file's pages: left alone
    assert not drop_pages(anonymous.data_ptr(), anonymous.numel() * 4)
    assert bool((anonymous == 1).all())
