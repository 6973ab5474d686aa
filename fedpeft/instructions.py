"""The instructions that make a site release something, as both sides sign and check them.

A *train* or *evaluate* instruction carries the global adapter (one flat array, possibly
without the tensors a site derives itself, :mod:`fedpeft.broadcast`) and a config record:
round, federation id, trained tensor names, broadcast names and digest. This module turns
such a message into the fields the coordinator signs (:mod:`fedpeft.privacy.signing`), so
that the ServerApp (:func:`sign_content`) and the ClientApp (:func:`verify_content`) agree
on exactly what is covered, and adds the digest of the resolved configuration: every site
composes the same configuration from the run config, so a signature also binds every
setting the coordinator chose.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ConfigRecord, RecordDict

from fedpeft import constants as K
from fedpeft.privacy.signing import sign_instruction, verify_instruction

__all__ = ["Signer", "config_digest", "instruction_fields", "sign_content", "verify_content"]


def config_digest(config_yaml: str) -> str:
    """SHA-256 (hex) of the resolved configuration's YAML (:func:`fedpeft.config.to_yaml`)."""
    return hashlib.sha256(config_yaml.encode()).hexdigest()


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, list) else value


def instruction_fields(content: RecordDict, *, task: str, config_sha256: str) -> dict[str, Any]:
    """What a signature covers: the config entries (bar the signature), the adapter's bytes
    as sent, the task and the configuration digest."""
    entries = content.config_records.get(K.CONFIG, ConfigRecord())
    arrays = content.array_records.get(K.ARRAYS)
    values = b""
    if arrays is not None and K.ARRAY_FLAT in arrays:
        values = arrays[K.ARRAY_FLAT].numpy().tobytes()
    return {
        "task": task,
        "config_sha256": config_sha256,
        "adapter_sha256": hashlib.sha256(values).hexdigest(),
        "entries": {
            key: _plain(value)
            for key, value in sorted(entries.items())
            if key != K.CFG_SIGNATURE and not isinstance(value, bytes)
        },
    }


def sign_content(
    content: RecordDict, key: Ed25519PrivateKey, *, task: str, config_sha256: str
) -> None:
    """Add the coordinator's signature of ``content`` to its config record, in place."""
    fields = instruction_fields(content, task=task, config_sha256=config_sha256)
    content.config_records[K.CONFIG][K.CFG_SIGNATURE] = sign_instruction(key, fields)


def verify_content(
    content: RecordDict, key: Ed25519PublicKey, *, task: str, config_sha256: str
) -> None:
    """Raise :class:`~fedpeft.privacy.signing.SignatureError` unless ``content`` carries the
    trusted coordinator's signature of exactly this instruction, task and configuration."""
    entries = content.config_records.get(K.CONFIG, ConfigRecord())
    fields = instruction_fields(content, task=task, config_sha256=config_sha256)
    verify_instruction(key, fields, entries.get(K.CFG_SIGNATURE))


@dataclass(frozen=True)
class Signer:
    """The coordinator's key and the digest of the configuration its instructions carry."""

    key: Ed25519PrivateKey
    config_sha256: str

    def sign(self, content: RecordDict, *, task: str) -> RecordDict:
        """``content`` with its signature added (in place; returned for chaining)."""
        sign_content(content, self.key, task=task, config_sha256=self.config_sha256)
        return content
