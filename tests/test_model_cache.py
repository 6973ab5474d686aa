"""The verified model cache: a damaged or partial folder is detected and rebuilt, never used.

A GGUF file cannot be made small, so the builder is injected: it saves a tiny in-process
Llama (what the SmolLM2 builder writes, at a smaller size) and counts its calls.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from fedpeft.config import ModelConfig
from fedpeft.model import _byte_tokenizer, _tiny_llama
from fedpeft.model_cache import CACHE_ENV, MANIFEST, cache_root, check_folder, ensure_cached

pytestmark = pytest.mark.filterwarnings(
    # transformers 5.23 deprecation hit by its own save_pretrained
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)


class Builder:
    """Writes a tiny saved Llama and its tokenizer; counts calls."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    def __call__(self, out: Path) -> None:
        self.calls += 1
        time.sleep(self.delay)  # widen the window in which a second builder could interfere
        model, _ = _tiny_llama(ModelConfig(loader="tiny_llama", task="causal_lm"))
        model.save_pretrained(str(out))
        _byte_tokenizer().save_pretrained(str(out))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF fake source")
    return path


def _cached(folder: Path, source: Path, build: Builder, builder: str = "test/1") -> Path:
    return ensure_cached(folder, source=source, builder=builder, build=build)


def test_builds_once_then_loads_from_the_cache(tmp_path: Path, source: Path) -> None:
    build = Builder()
    folder = tmp_path / "cache" / "m"
    assert _cached(folder, source, build) == folder
    assert _cached(folder, source, build) == folder
    assert build.calls == 1
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source"]["name"] == "model.gguf"
    assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    # nothing but the folder and its lock is left beside it
    assert sorted(p.name for p in folder.parent.iterdir()) == [".m.lock", "m"]


def test_truncated_weights_are_detected_and_rebuilt(
    tmp_path: Path, source: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build = Builder()
    folder = _cached(tmp_path / "m", source, build)
    weights = folder / "model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[: len(full) // 2])  # as a copy cut short, or a full disk
    assert "model.safetensors has" in str(
        check_folder(folder, source=_fp(source), builder="test/1")
    )
    with caplog.at_level(logging.WARNING, logger="fedpeft.model_cache"):
        _cached(folder, source, build)
    assert build.calls == 2
    assert "truncated" in caplog.text and "rebuilding" in caplog.text
    assert weights.read_bytes() == full  # the builder is deterministic: the same bytes again


def test_same_size_corruption_is_detected_by_hash(tmp_path: Path, source: Path) -> None:
    build = Builder()
    folder = _cached(tmp_path / "m", source, build)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "SHA-256" in str(check_folder(folder, source=_fp(source), builder="test/1"))
    _cached(folder, source, build)
    assert build.calls == 2


@pytest.mark.parametrize("damage", ["no-manifest", "bad-manifest", "missing-file", "stray-file"])
def test_partial_or_altered_folders_are_rebuilt(tmp_path: Path, source: Path, damage: str) -> None:
    build = Builder()
    folder = _cached(tmp_path / "m", source, build)
    if damage == "no-manifest":  # a build that died before its last write
        (folder / MANIFEST).unlink()
    elif damage == "bad-manifest":
        (folder / MANIFEST).write_text("{not json")
    elif damage == "missing-file":
        (folder / "tokenizer.json").unlink()
    else:
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert check_folder(folder, source=_fp(source), builder="test/1") is not None
    _cached(folder, source, build)
    assert build.calls == 2
    assert check_folder(folder, source=_fp(source), builder="test/1") is None


def test_a_new_source_or_builder_rebuilds(tmp_path: Path, source: Path) -> None:
    build = Builder()
    folder = _cached(tmp_path / "m", source, build)
    source.write_bytes(b"GGUF another release")
    _cached(folder, source, build)
    assert build.calls == 2
    _cached(folder, source, build, builder="test/2")
    assert build.calls == 3


def test_a_failed_build_leaves_nothing_half_made(tmp_path: Path, source: Path) -> None:
    def broken(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    folder = tmp_path / "m"
    with pytest.raises(RuntimeError, match="killed mid-build"):
        _cached(folder, source, broken)  # type: ignore[arg-type]
    assert not folder.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.build-")] == []
    build = Builder()
    _cached(folder, source, build)
    assert build.calls == 1


def test_concurrent_builders_build_once(tmp_path: Path, source: Path) -> None:
    build = Builder(delay=0.5)
    folder = tmp_path / "m"
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            _cached(folder, source, build)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert build.calls == 1
    assert check_folder(folder, source=_fp(source), builder="test/1") is None


def test_cache_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "fedpeft"
    assert cache_root("~/c") == Path.home() / "c"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "site"))
    assert cache_root("/elsewhere") == tmp_path / "site"  # the machine's operator wins
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root() == Path.home() / ".cache" / "fedpeft"


def test_cached_folder_loads_as_a_model(tmp_path: Path, source: Path) -> None:
    from fedpeft.model import _from_folder

    folder = _cached(tmp_path / "m", source, Builder())
    model, tokenizer = _from_folder(folder, ModelConfig(loader="local", task="causal_lm"))
    ids = tokenizer("hi", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def _fp(source: Path) -> dict[str, object]:
    from fedpeft.model_cache import fingerprint

    return fingerprint(source)
