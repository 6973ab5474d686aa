"""Lineage: the adapter and base-model hashes every audit file names."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedpeft.config import ModelConfig
from fedpeft.lineage import ADAPTER_WEIGHTS, adapter_sha256, base_identity, file_sha256


def test_adapter_hash_is_the_sha256_of_the_weights_file(tmp_path: Path) -> None:
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"abc")
    assert adapter_sha256(tmp_path) == hashlib.sha256(b"abc").hexdigest()
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"abd")
    assert adapter_sha256(tmp_path) == hashlib.sha256(b"abd").hexdigest()


def test_a_folder_without_adapter_weights_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        adapter_sha256(tmp_path)


def test_a_local_base_is_named_by_the_hash_of_its_weight_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    found = base_identity(ModelConfig(loader="local", path=str(tmp_path)))
    assert found.weights_sha256 == {"model.safetensors": hashlib.sha256(b"weights").hexdigest()}
    assert found.source == str(tmp_path.resolve())
    assert file_sha256(tmp_path / "model.safetensors") == found.weights_sha256["model.safetensors"]


def test_an_in_process_base_is_named_by_its_settings() -> None:
    one = base_identity(ModelConfig(loader="tiny_bert"))
    other = base_identity(ModelConfig(loader="tiny_bert", hidden_size=64))
    assert one.weights_sha256 == {} and "seed" in one.source
    assert one.settings_sha256 != other.settings_sha256
    assert one == base_identity(ModelConfig(loader="tiny_bert"))
