"""A run's model as folders that plain ``transformers`` + ``peft`` load correctly.

This module owns three folders:

- the run's **base folder** ``RUN_DIR/base/`` (:func:`write_base`), written once when a
  federation starts: ``config.json`` naming the architecture (and, for the mean-pooling head,
  ``auto_map`` → ``modeling_fedpeft.py``, copied beside it), the tokenizer and the weights.
  Weights loaded from a folder (the embedded MiniLM, ``model.loader=local``) are symlinked, not
  copied, so a run directory does not hold another 90 MB; a tiny model built in-process is
  saved. Every adapter the run writes names it (``base_model_name_or_path``);
- ``fedpeft export RUN_DIR --out DIR`` (:func:`export_adapter`): the adapter files, a model
  card (``README.md``, :mod:`fedpeft.model_card`) and ``DIR/base/`` with real files;
- ``fedpeft export --merge`` (:func:`export_merged`): the base with the adapter merged in, and
  the model card.

``base_model_name_or_path`` is written relative to the adapter's own folder (``../base`` in
a run directory, ``base`` in an export), so a folder moved as a whole still names its base;
``transformers`` resolves relative paths from the working directory, so load the base by its
full path as the model card shows. A base or merged model with the mean-pooling head loads
only with ``trust_remote_code=True``; without it ``transformers`` refuses and says to pass it,
rather than putting the adapter on BERT's pooler head.

What a model is, as hashes, is :mod:`fedpeft.lineage`'s business; the card's text is
:mod:`fedpeft.model_card`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft.config import ConfigError, FedPeftConfig, ModelConfig, from_yaml
from fedpeft.files import replace_dir
from fedpeft.lineage import base_folder

if TYPE_CHECKING:  # imported where used: the server imports this module at start
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BASE_DIR",
    "ExportResult",
    "describe_adapter",
    "export_adapter",
    "export_merged",
    "load_run_model",
    "read_run",
    "set_base_path",
    "write_base",
]

BASE_DIR = "base"  # RUN_DIR/base and DIR/base
ADAPTER_CONFIG = "adapter_config.json"
CARD = "README.md"
# The weight files of a Hugging Face folder that a base folder links to (lineage hashes these).
_WEIGHT_PATTERNS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "pytorch_model.bin",
)


@dataclass(frozen=True)
class ExportResult:
    """What ``fedpeft export`` wrote."""

    out: Path
    merged: bool
    files: tuple[str, ...]  # relative paths under ``out``


def read_run(run_dir: Path) -> FedPeftConfig:
    """The configuration of the finished run in ``run_dir``.

    Raises
    ------
    ConfigError
        If ``run_dir`` lacks ``adapter/adapter_config.json`` or ``config.yaml``.
    """
    config_file = run_dir / "config.yaml"
    if not (run_dir / "adapter" / ADAPTER_CONFIG).is_file() or not config_file.is_file():
        raise ConfigError(
            f"{run_dir} is not a finished fedpeft run directory (needs adapter/ and config.yaml); "
            "give the folder that 'fedpeft simulate' printed."
        )
    return from_yaml(config_file.read_text(encoding="utf-8"))


def _weight_files(folder: Path) -> list[Path]:
    found: list[Path] = []
    for pattern in _WEIGHT_PATTERNS:
        found += sorted(p for p in folder.glob(pattern) if p.is_file())
    return found


def write_base(folder: Path, model_config: ModelConfig, *, link_weights: bool = True) -> Path:
    """Write the base model ``model_config`` loads as a Hugging Face folder at ``folder``.

    Parameters
    ----------
    folder : Path
        Replaced whole (written to a temporary sibling, then renamed into place).
    model_config : ModelConfig
        The run's ``model`` settings; the base is loaded by fedpeft's own loader, so its
        ``config.json`` holds the run's labels, head and pad token.
    link_weights : bool, default True
        Symlink the weight files of a base loaded from a folder instead of copying them. An
        export passes False: it must hold real files.

    Returns
    -------
    Path
        ``folder``.
    """
    from fedpeft.model import MODEL_LOADERS

    base, tokenizer = MODEL_LOADERS[model_config.loader](model_config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        source = base_folder(model_config)
        weights = _weight_files(source.resolve()) if source is not None else []
        if link_weights and weights:
            from transformers.dynamic_module_utils import custom_object_save

            base.config.architectures = [type(base).__name__]
            if getattr(base, "_auto_class", None) is not None:  # mean pooling: modeling file
                # annotated as dict, but it sets auto_map on a config object too
                custom_object_save(base, tmp, config=base.config)  # type: ignore[arg-type]
            base.config.save_pretrained(str(tmp))
            for path in weights:
                (tmp / path.name).symlink_to(path)
        else:
            base.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def set_base_path(adapter_dir: Path, base_path: str) -> None:
    """Make ``adapter_config.json`` in ``adapter_dir`` name ``base_path`` as its base model."""
    path = adapter_dir / ADAPTER_CONFIG
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings["base_model_name_or_path"] = base_path
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def describe_adapter(adapter_dir: Path, run_dir: Path) -> None:
    """Make the run's adapter in ``adapter_dir`` (about to become ``RUN_DIR/adapter``) name
    ``RUN_DIR/base`` and carry the model card of the run so far."""
    from fedpeft.model_card import write_card

    set_base_path(adapter_dir, f"../{BASE_DIR}")
    write_card(adapter_dir, run_dir, layout="adapter", base_path=f"../{BASE_DIR}")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; choose a new folder.")


def _finish(tmp: Path, out: Path, *, merged: bool) -> ExportResult:
    files = tuple(sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
    if out.exists():
        out.rmdir()  # checked empty by _check_out
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return ExportResult(out=out, merged=merged, files=files)


def export_adapter(run_dir: Path, out: Path) -> ExportResult:
    """``out/``: the run's adapter, its model card, and ``out/base/`` (real files).

    The base is copied from ``RUN_DIR/base`` (links followed) or, for a run made before
    fedpeft wrote one, written afresh by the run's loader.
    """
    from fedpeft.model_card import write_card

    config = read_run(run_dir)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for path in (run_dir / "adapter").iterdir():
            if path.is_file() and path.name != CARD:
                shutil.copy2(path, tmp / path.name)
        set_base_path(tmp, BASE_DIR)
        run_base = run_dir / BASE_DIR
        if (run_base / "config.json").is_file():
            shutil.copytree(run_base, tmp / BASE_DIR, symlinks=False)
        else:
            write_base(tmp / BASE_DIR, config.model, link_weights=False)
        write_card(tmp, run_dir, layout="adapter", base_path=BASE_DIR)
        return _finish(tmp, out, merged=False)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_run_model(run_dir: Path) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The run's base (fedpeft's loader) with ``RUN_DIR/adapter`` applied, and its tokenizer."""
    from peft import PeftModel

    from fedpeft.model import MODEL_LOADERS

    config = read_run(run_dir)
    base, tokenizer = MODEL_LOADERS[config.model.loader](config.model)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    return model, tokenizer


def export_merged(run_dir: Path, out: Path) -> ExportResult:
    """``out/``: the base with the run's adapter merged in (float32), tokenizer, model card.

    A mean-pooling model's folder carries ``modeling_fedpeft.py`` and ``auto_map``
    (:mod:`fedpeft.heads`): it loads with ``trust_remote_code=True``.
    """
    import torch

    from fedpeft.model_card import write_card

    read_run(run_dir)
    _check_out(out)
    model, tokenizer = load_run_model(run_dir)
    merged = model.merge_and_unload()
    merged.to(torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_card(tmp, run_dir, layout="merged")
        return _finish(tmp, out, merged=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
