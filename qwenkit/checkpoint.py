"""Hugging Face checkpoint folders: config.json, safetensors (one file or shards plus an index),
generation_config.json. Loaded and saved unchanged, so transformers, vLLM and llama.cpp's
converters read what qwenkit writes.

This module knows tensors and files, not the model: `iter_tensors` reads a folder's tensors one at
a time (qwenkit.model.load_model puts each straight into its final storage, so a checkpoint never
sits in memory twice), and `write_checkpoint` writes a state dict, every file under a temporary
name renamed into place, the index last.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from qwenkit.config import QwenConfig
from qwenkit.errors import CheckpointError
from qwenkit.files import atomic_path, atomic_write
from qwenkit.qwen_vocab import ENDOFTEXT_ID, IM_END_ID

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names, as written in each file's header.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a hub id fetched where a hub is reachable."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint folder (with config.json), found a file")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(name)):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(
                f"{name!r} is not a local folder, and huggingface_hub is not installed to fetch it from the hub. "
                f"Point --model at a local checkpoint folder (e.g. one made by `qwenkit new`)."
            ) from None
        try:
            return Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        except Exception as e:
            raise CheckpointError(
                f"could not fetch {name!r} from the hub ({type(e).__name__}: {e}). Without a reachable hub, "
                f"point --model at a local checkpoint folder (e.g. one made by `qwenkit new`)."
            ) from None
    raise CheckpointError(f"{path}: no such checkpoint folder")


def checkpoint_files(folder: Path) -> dict[str, list[str]]:
    """{shard file name: [tensor names]} from the index, or the single file's header."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        files: dict[str, list[str]] = {}
        for tensor, shard in weight_map.items():
            files.setdefault(shard, []).append(tensor)
        for shard in files:
            if not (folder / shard).exists():
                raise CheckpointError(f"{folder / shard}: shard listed in {INDEX_FILE} is missing")
        return files
    single = folder / SINGLE_FILE
    if single.exists():
        return {SINGLE_FILE: list(read_header(single))}
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {', '.join(found)} but no {INDEX_FILE})" if found else ""
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        hint += "; pickle checkpoints (.bin/.pt) are not loaded: convert them to safetensors"
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def read_header(file: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header: {name: {dtype, shape, data_offsets}}, checked
    against the file's size so that a truncated file fails here, naming the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{file}: corrupt safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: corrupt safetensors header (not JSON)") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        if end > data_size:
            raise CheckpointError(f"{file}: tensor '{name}' runs past the end of the file (truncated shard?)")
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: tensor '{name}' has unsupported dtype {entry['dtype']}")
        entry["data_start"] = 8 + n + start
    return header


def iter_tensors(
    folder: Path, expected: Mapping[str, Sequence[int]], dtype: torch.dtype, tied: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a checkpoint folder as (name, a new CPU tensor in `dtype`), one at a time.

    Names and shapes are checked against `expected` ({name: shape}); an unexpected name, a wrong
    shape, a truncated file and, at the end, an expected name the checkpoint lacks each raise a
    CheckpointError naming the file and the tensor. Rotary tables some exporters write are skipped
    (recomputed), and so is `lm_head.weight` where the head is `tied` to the embeddings.
    """
    seen: set[str] = set()
    buffers: dict = {}  # _read_tensor's conversion buffers, kept for the whole load
    for shard, names in checkpoint_files(folder).items():
        file = folder / shard
        header = read_header(file)
        with open(file, "rb", buffering=0) as f:
            for name in names:
                if name not in header:
                    raise CheckpointError(f"{file}: tensor '{name}' is in the index but not in the file")
                if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor '{name}' (not part of this model's config)")
                entry = header[name]
                if list(entry["shape"]) != list(expected[name]):
                    raise CheckpointError(
                        f"{file}: tensor '{name}' has shape {list(entry['shape'])}, "
                        f"the config asks for {list(expected[name])}"
                    )
                f.seek(entry["data_start"])
                try:
                    tensor = _read_tensor(f, entry, dtype, buffers)
                except EOFError:
                    raise CheckpointError(
                        f"{file}: tensor '{name}' could not be read in full (truncated shard?)"
                    ) from None
                seen.add(name)
                yield name, tensor
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{folder}: missing tensors {', '.join(missing[:5])}{more}")


def load_weights(model: nn.Module, folder: Path, dtype: torch.dtype, device: torch.device) -> None:
    """Read every tensor of the checkpoint into `model` (built on the meta device) in place."""
    expected = {name: p.shape for name, p in model.named_parameters()}
    for name, tensor in iter_tensors(folder, expected, dtype, getattr(model.config, "tie_word_embeddings", False)):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = nn.Parameter(tensor.to(device), requires_grad=module._parameters[attr].requires_grad)


_CHUNK_BYTES = 64 << 20


def _read_tensor(f, entry: dict, dtype: torch.dtype, buffers: dict) -> torch.Tensor:
    """Read one tensor at the file's position into a new CPU tensor of `dtype`. A dtype change goes
    through a bounded buffer, so no full-size copy in the file's dtype ever exists. `buffers` keeps
    that buffer (one per stored dtype) for the whole load: one buffer per tensor, allocated and
    freed between the parameters, leaves holes in the heap that the process keeps."""
    stored = _DTYPES[entry["dtype"]]
    out = torch.empty(entry["shape"], dtype=dtype)
    flat = out.view(-1)
    if stored == dtype:
        _read_into(f, flat)
        return out
    step = max(_CHUNK_BYTES // stored.itemsize, 1)
    buffer = buffers.get(stored)
    if buffer is None or buffer.numel() < min(step, flat.numel()):
        buffers[stored] = buffer = torch.empty(min(step, flat.numel()), dtype=stored)
    for start in range(0, flat.numel(), step):
        part = buffer[: min(step, flat.numel() - start)]
        _read_into(f, part)
        flat[start : start + part.numel()].copy_(part)
    return out


def _read_into(f, t: torch.Tensor) -> None:
    view = memoryview(t.view(torch.uint8).numpy())
    while view.nbytes:
        n = f.readinto(view)
        if not n:
            raise EOFError
        view = view[n:]


def read_generation_config(folder: Path) -> dict:
    file = folder / "generation_config.json"
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON (line {e.lineno}: {e.msg})") from None


def default_generation_config(config: QwenConfig) -> dict:
    """Qwen2.5-Instruct's generation_config.json for Qwen2 models; the config's own ids otherwise."""
    if config.model_type != "qwen2":
        return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    return {
        "bos_token_id": ENDOFTEXT_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
    }


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000, like transformers' max_shard_size."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size such as '500MB' or '5GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def write_checkpoint(
    state: Mapping[str, torch.Tensor],
    config: QwenConfig,
    generation_config: dict,
    out_dir: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config.json, generation_config.json and the tensors of `state` (HF names), sharded
    past max_shard_size, in `dtype` (default: the tensors' own)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    dtype = dtype or next(iter(state.values())).dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in state.items():
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += nbytes

    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    with contextlib.ExitStack() as stack:  # every shard is renamed into place only once all are written
        for name, shard in zip(names, shards):
            temp = stack.enter_context(atomic_path(out / name))
            tensors = {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in shard.items()}
            save_file(tensors, str(temp), metadata={"format": "pt"})
            del tensors

    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_json(out / "config.json", hf_config)
    _write_json(out / "generation_config.json", generation_config)
    index = out / INDEX_FILE
    if len(shards) > 1:
        total = sum(t.numel() * dtype.itemsize for t in state.values())
        weight_map = {k: names[i] for i, shard in enumerate(shards) for k in shard}
        _write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    # Shards of an earlier save that this one does not use would be read by a loader globbing files.
    keep = set(names)
    for old in out.glob("model*.safetensors"):
        if old.name not in keep:
            old.unlink()
    if len(shards) == 1 and index.exists():
        index.unlink()
    return out


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
