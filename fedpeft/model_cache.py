"""A verified on-disk cache of model folders that are expensive to build.

This module owns *where* a built model folder lives (:func:`cache_root`), *whether* a folder
found there is whole (:func:`check_folder`, against a manifest of every file's size and
SHA-256 written last), and building it exactly once even when several processes (the Ray
actors of a simulation) ask at the same moment (:func:`ensure_cached`: an ``fcntl`` lock,
a build into a temporary sibling, an atomic rename). *What* is built is the caller's: a
function that writes a Hugging Face folder (:mod:`fedpeft.model` dequantises a GGUF file).

A folder that fails the check (a truncated or missing file, no manifest, a stray file, a
different source or builder) is never used: it is rebuilt, with a log line saying why.
The full hash is checked on every load, not only the sizes: SHA-256 of the 538 MB SmolLM2
folder costs 0.33 s here, against 1.6 s to load it, and catches a same-size corruption
that a size check would pass.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedpeft.lineage import file_sha256

__all__ = ["CACHE_ENV", "MANIFEST", "cache_root", "check_folder", "ensure_cached", "fingerprint"]

log = logging.getLogger(__name__)

#: The environment variable a machine's operator sets to move the cache (it wins over the
#: run's ``model.cache_dir``: a coordinator does not know the sites' disks).
CACHE_ENV = "FEDPEFT_CACHE"
#: Written last into a built folder; a folder without it was never finished.
MANIFEST = "fedpeft-cache.json"
_FORMAT = 1


def cache_root(configured: str | None = None) -> Path:
    """The cache folder: ``$FEDPEFT_CACHE``, else ``configured`` (``model.cache_dir``), else
    ``$XDG_CACHE_HOME/fedpeft``, else ``~/.cache/fedpeft``. Never inside the project."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fedpeft"
    return Path.home() / ".cache" / "fedpeft"


def fingerprint(source: Path) -> dict[str, object]:
    """Name, size and SHA-256 of the file a cached folder is built from."""
    return {"name": source.name, "size": source.stat().st_size, "sha256": file_sha256(source)}


def _manifest(folder: Path, *, source: dict[str, object], builder: str) -> dict[str, object]:
    files = sorted(p for p in folder.iterdir() if p.name != MANIFEST)
    stray = [p.name for p in files if not p.is_file()]
    if stray:
        raise ValueError(f"the builder wrote non-files {stray} into {folder}; write files only")
    return {
        "format": _FORMAT,
        "builder": builder,
        "source": source,
        "files": {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files},
    }


def check_folder(folder: Path, *, source: dict[str, object], builder: str) -> str | None:
    """Why ``folder`` is not a whole build of ``source`` by ``builder``; None when it is.

    Checks that the manifest exists and parses, names the same format, builder and source,
    and that the folder holds exactly its files with their sizes and SHA-256.
    """
    path = folder / MANIFEST
    if not folder.is_dir():
        return "missing"
    if not path.is_file():
        return f"unfinished (no {MANIFEST})"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files: dict[str, dict[str, object]] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    if manifest.get("format") != _FORMAT or manifest.get("builder") != builder:
        return f"built by {manifest.get('builder')!r}, now {builder!r}"
    if manifest.get("source") != source:
        return f"built from {manifest.get('source')}, now {source}"
    present = {p.name for p in folder.iterdir() if p.name != MANIFEST}
    if present != set(files):
        return (
            f"files differ from the manifest (missing {sorted(set(files) - present)}, "
            f"unexpected {sorted(present - set(files))})"
        )
    for name, entry in sorted(files.items()):
        size = (folder / name).stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes, the manifest says {entry.get('size')} (truncated?)"
        if file_sha256(folder / name) != entry.get("sha256"):
            return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the file closes
        yield


def ensure_cached(
    folder: Path,
    *,
    source: Path,
    builder: str,
    build: Callable[[Path], None],
) -> Path:
    """``folder`` holding a checked build of ``source``, building it first if needed.

    Parameters
    ----------
    folder : Path
        Where the built folder lives (its parent is created).
    source : Path
        The file it is built from; a change of its size or SHA-256 rebuilds.
    builder : str
        Names the build (code version, library versions); a change rebuilds.
    build : Callable[[Path], None]
        Writes the folder's files (plain files, no subfolders) into the empty folder it is
        given; called at most once per missing or damaged cache, under a lock.

    Returns
    -------
    Path
        ``folder``, complete and checked against its manifest.
    """
    expected = fingerprint(source)
    if check_folder(folder, source=expected, builder=builder) is None:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f".{folder.name}.lock"):
        problem = check_folder(folder, source=expected, builder=builder)
        if problem is None:  # another process built it while this one waited
            return folder
        for stale in folder.parent.glob(f".{folder.name}.build-*"):  # a crashed build's
            shutil.rmtree(stale, ignore_errors=True)
        if problem == "missing":
            log.info("building %s from %s (once; later loads read the cache)", folder, source)
        else:
            log.warning("model cache %s is %s: rebuilding it from %s", folder, problem, source)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.build-"))
        try:
            build(tmp)
            manifest = _manifest(tmp, source=expected, builder=builder)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            if folder.exists():  # move the damaged one aside, then rename the new one in
                old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.build-"))
                os.replace(folder, old / folder.name)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder
