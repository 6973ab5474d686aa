"""A site's own audit trail: every instruction it received and what it released or refused.

The trail is a hash-chained JSON Lines file (:mod:`fedpeft.privacy.trail`) on the site's
disk, for the site's data protection officer; nothing of it is ever sent. It is written by
one Flower *mod* (:func:`site_trail_mod`) around every handler of the ClientApp — the one
place where instructions enter and replies leave — so the handlers do not know of it and no
reply changes because of it. Per message it appends:

- ``instruction``: message type, the node id the coordinator knows the site by, round,
  federation id, task, the SHA-256 of the adapter
  bytes received (as the coordinator signs them, :func:`fedpeft.instructions.instruction_fields`),
  of the settings (every config record) and of the whole message content;
- then ``release``: the SHA-256 of the reply content as it leaves (:func:`content_sha256`)
  and of each array's bytes on the wire; or ``refusal``: the fixed error code sent.

An instruction is logged *before* it is handled and a release *before* it is returned: if
the trail cannot be written, the site answers ``site-failed`` and releases nothing, so
nothing leaves the site unlogged.

Where the trail is (:func:`site_trail_path`): the node config's ``audit-path``; otherwise
beside the site's ledger, ``<ledger-path>.audit.jsonl``; in a simulation, beside the virtual
site's ledger in ``privacy.ledger_dir``. A site with no ledger and no ``audit-path`` (a
simulation with DP off, or a deployed site that waived DP without naming one) keeps none.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedpeft import constants as K
from fedpeft.client.errors import error_reply
from fedpeft.config import FedPeftConfig, from_run_config
from fedpeft.instructions import instruction_fields
from fedpeft.privacy.trail import AuditTrail

__all__ = ["TRAIL_SUFFIX", "array_digests", "content_sha256", "site_trail_mod", "site_trail_path"]

logger = logging.getLogger(__name__)
TRAIL_SUFFIX = ".audit.jsonl"


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes_sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def array_digests(content: RecordDict) -> dict[str, str]:
    """``"record/key"`` → SHA-256 of that array's bytes as serialised on the wire."""
    return {
        f"{name}/{key}": hashlib.sha256(array.data).hexdigest()
        for name, record in sorted(content.array_records.items())
        for key, array in sorted(record.items())
    }


def _records(content: RecordDict) -> dict[str, Any]:
    return {
        "configs": {
            n: {k: _plain(v) for k, v in sorted(r.items())}
            for n, r in sorted(content.config_records.items())
        },
        "metrics": {
            n: {k: _plain(v) for k, v in sorted(r.items())}
            for n, r in sorted(content.metric_records.items())
        },
    }


def content_sha256(content: RecordDict) -> str:
    """SHA-256 of a message's content: each array's dtype, shape and bytes, every config and
    metric entry (canonical JSON)."""
    arrays = {
        f"{name}/{key}": [array.dtype, list(array.shape), hashlib.sha256(array.data).hexdigest()]
        for name, record in sorted(content.array_records.items())
        for key, array in sorted(record.items())
    }
    document = {"arrays": arrays, **_records(content)}
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _site_name(node_config: dict[str, Any]) -> str:
    """The virtual site's name as :func:`fedpeft.client.site.load_site` gives it."""
    if node_config.get(K.NODE_DATA_PATH):
        return f"site {node_config[K.NODE_DATA_PATH]}"
    return f"site {node_config.get(K.NODE_PARTITION_ID)}"


def site_trail_path(config: FedPeftConfig | None, context: Context) -> Path | None:
    """Where this site's trail is, or None when it keeps none (see the module docstring)."""
    node = dict(context.node_config)
    if node.get(K.NODE_AUDIT_PATH):
        return Path(str(node[K.NODE_AUDIT_PATH])).expanduser()
    if node.get(K.NODE_LEDGER_PATH):
        ledger = Path(str(node[K.NODE_LEDGER_PATH])).expanduser()
        return ledger.with_name(ledger.name + TRAIL_SUFFIX)
    if K.NODE_PARTITION_ID not in node:
        return None  # a deployed site without a ledger: nothing names a place on its disk
    resolved = config if config is not None else from_run_config(context.run_config)
    if not resolved.privacy.ledger_dir:
        return None
    slug = _site_name(node).replace(" ", "-").replace("/", "_")  # as ledger_path names it
    return Path(resolved.privacy.ledger_dir) / f"{slug}.json{TRAIL_SUFFIX}"


def _instruction(msg: Message, context: Context) -> dict[str, Any]:
    content = msg.content
    entries = content.config_records.get(K.CONFIG, ConfigRecord())
    task = str(entries.get(K.CFG_TASK, msg.metadata.message_type.split(".")[0]))
    round_number = entries.get(K.CFG_ROUND, msg.metadata.group_id)
    signed = instruction_fields(content, task=task, config_sha256="")
    settings = json.dumps(_records(content)["configs"], sort_keys=True, separators=(",", ":"))
    return {
        "message_type": msg.metadata.message_type,
        "node_id": context.node_id,  # as the coordinator names this site (audit.jsonl)
        "round": round_number,
        "federation_id": entries.get(K.CFG_FEDERATION_ID),
        "task": task,
        "adapter_sha256": signed["adapter_sha256"],
        "settings_sha256": hashlib.sha256(settings.encode()).hexdigest(),
        "content_sha256": content_sha256(content),
        "signed": K.CFG_SIGNATURE in entries,
    }


def site_trail_mod(config: FedPeftConfig | None) -> Mod:
    """The Flower mod that keeps the site's trail around every handler."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            path = site_trail_path(config, context)
        except Exception as err:  # the handler reports a bad run config itself
            logger.warning("site audit trail: cannot place it (%s); none kept", err)
            path = None
        if path is None:
            return call_next(msg, context)
        trail = AuditTrail(path)
        received = _instruction(msg, context)
        which = {k: received[k] for k in ("message_type", "round", "federation_id")}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # as the ledger's folder is made
            trail.append("instruction", received)
        except Exception as err:  # nothing is handled that is not on the record
            return error_reply(msg, err)
        reply = call_next(msg, context)
        try:
            if reply.has_error():
                code = (reply.error.reason or "").split(":", 1)[0]
                trail.append("refusal", {**which, "code": code, "error": reply.error.code})
            else:
                trail.append(
                    "release",
                    {
                        **which,
                        "content_sha256": content_sha256(reply.content),
                        "arrays": array_digests(reply.content),
                    },
                )
        except Exception as err:  # nothing leaves that is not on the record
            logger.error("site audit trail %s: %s; the reply is withheld", path, err)
            return error_reply(msg, err)
        return reply

    return mod
