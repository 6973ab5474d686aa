"""A site that answers with a malformed update over the wire (the deployment fault tests).

It is ``fedpeft worker`` with the ClientApp wrapped: every train reply's delta is replaced,
after the real training, by one the server must refuse — a NaN in round 1, a vector ten
times too long (an oversized update) from round 2 on. Run as
``python tests/deploy/tampering_worker.py RUNTIME_API``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flwr.app import Array, ArrayRecord, Context, Message  # noqa: E402

from fedpeft import constants as K  # noqa: E402
from fedpeft.client.worker import Worker  # noqa: E402


def tamper(reply: Message) -> Message:
    if not reply.has_content() or K.LAYOUT not in reply.content.config_records:
        return reply  # an error reply or an evaluation: left as it is
    flat = reply.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy().copy()
    if reply.metadata.group_id == "1":
        flat[0] = np.nan
    else:
        flat = np.tile(flat, 10)
    reply.content.array_records[K.ARRAYS] = ArrayRecord({K.ARRAY_FLAT: Array(flat)})
    return reply


def load_app() -> Any:
    from fedpeft.client.app import app

    def tampered(message: Message, context: Context) -> Message:
        return tamper(app(message=message, context=context))

    return tampered


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    Worker(sys.argv[1], load_app=load_app).serve()
