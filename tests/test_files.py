"""The homes of two policies: atomic writes and the cache folder (qwenkit.files), and the one error
base (qwenkit.errors)."""

import os

import pytest

from qwenkit import errors, files


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENKIT_CACHE", str(tmp_path / "a"))
    assert files.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("QWENKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_dir() == tmp_path / "xdg" / "qwenkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert files.cache_dir() == tmp_path / "home" / ".cache" / "qwenkit"


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "out.json"
    files.atomic_write(target, "old")
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"  # the old file stands, and no temporary file is left
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]
    files.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"


def test_atomic_files_get_ordinary_permissions(tmp_path):
    target = tmp_path / "weights.bin"
    with files.atomic_path(target) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors creates its files
        os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_install_dir_swaps_a_folder_in_whole(tmp_path):
    target = tmp_path / "model"
    first = tmp_path / "work1"
    first.mkdir()
    (first / "a").write_text("1")
    files.install_dir(first, target)
    second = tmp_path / "work2"
    second.mkdir()
    (second / "b").write_text("2")
    files.install_dir(second, target)
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_errors_share_one_base_and_say_where():
    for cls in (
        errors.UserError,
        errors.ConfigError,
        errors.CheckpointError,
        errors.GGUFError,
        errors.AdapterError,
        errors.DataError,
        errors.RecipeError,
        errors.ContextLengthError,
        errors.ModelError,
    ):
        assert issubclass(cls, errors.QwenkitError)
    e = errors.DataError("expected an object", file="train.jsonl", line=7, field="messages")
    assert str(e) == "train.jsonl:7: messages: expected an object"
    assert (e.file, e.line, e.field) == ("train.jsonl", 7, "messages")
    assert str(errors.ConfigError("bad")) == "bad"
    assert isinstance(errors.CheckpointError("x"), ValueError)  # `except ValueError` still catches it
