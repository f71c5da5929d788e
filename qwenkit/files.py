"""Files that are never half-written, and qwenkit's cache folder.

Everything qwenkit writes for later reading (checkpoints, adapters, caches, outputs) is written
under a temporary name beside its target and renamed into place, so a crash or a kill leaves the
old file or the new one, never a truncated one that a later load would trust.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """qwenkit's cache folder: $QWENKIT_CACHE, else $XDG_CACHE_HOME/qwenkit, else ~/.cache/qwenkit."""
    if os.environ.get("QWENKIT_CACHE"):
        return Path(os.environ["QWENKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwenkit"


def temporary_name(path: Path) -> Path:
    """A name beside `path`, unique to this writer, hidden, that a glob for the real files skips."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path` through (by any library); on success it is renamed
    to `path`, on an error removed. The file gets the permissions of an ordinary new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) create files 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def install_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the finished folder `tmp` to `target`. An existing `target` is swapped out first and
    then removed, so `target` is at no moment a mix of the two."""
    tmp, target = Path(tmp), Path(target)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.rename(tmp, target)
        return target
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    os.rename(tmp, target)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
