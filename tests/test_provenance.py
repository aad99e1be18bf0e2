"""Provenance: what results files record about the code and checkpoints behind them."""

import pytest

from vlsae_guard import provenance


def test_environment_lists_versions():
    env = provenance.environment()
    assert env["packages"]["torch"] and env["python"] and env["device"] == "cpu"


def test_dir_hash_tracks_contents_and_names(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    first = provenance.sha256_dir(tmp_path)
    (tmp_path / "notes.txt").write_text("ignored")
    assert provenance.sha256_dir(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert provenance.sha256_dir(tmp_path) != first
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    (tmp_path / "model.safetensors").rename(tmp_path / "other.safetensors")
    assert provenance.sha256_dir(tmp_path) != first  # same bytes under another name


def test_dir_hash_refuses_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint files"):
        provenance.sha256_dir(tmp_path)
