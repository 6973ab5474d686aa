"""Checks on what a site sends back, before any of it touches the global adapter.

A reply is accepted only if it carries exactly the tensors the server asked for (names
and element counts in layout order), as one finite float32 vector of the right length,
with a positive example count. Anything else is rejected with a reason the round loop
logs and records; the round goes on with the other sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Message
from numpy.typing import NDArray

from fedpeft import constants as K
from fedpeft.model import AdapterLayout


class ReplyRejected(ValueError):
    """A site's reply cannot be used; the message says why."""


@dataclass(frozen=True)
class TrainReply:
    """A validated training reply."""

    node_id: int
    delta: NDArray[np.float32]
    num_examples: int
    train_loss: float
    bytes_up: int


def check_train_reply(
    msg: Message, expected: AdapterLayout, *, max_examples: int = 10**9
) -> TrainReply:
    """Validate a training reply against the layout the server asked for.

    Raises
    ------
    ReplyRejected
        With the reason: missing record, wrong names, sizes, dtype, length, non-finite
        values, or a bad example count.
    """
    node = msg.metadata.src_node_id
    content = msg.content
    for key, records in (
        (K.ARRAYS, content.array_records),
        (K.LAYOUT, content.config_records),
        (K.METRICS, content.metric_records),
    ):
        if key not in records:
            raise ReplyRejected(f"node {node}: reply lacks the {key!r} record")
    arrays = content.array_records[K.ARRAYS]
    if list(arrays.keys()) != [K.ARRAY_FLAT]:
        raise ReplyRejected(
            f"node {node}: expected one array {K.ARRAY_FLAT!r}, got {list(arrays.keys())}"
        )
    layout = content.config_records[K.LAYOUT]
    names = [str(n) for n in layout.get(K.LAYOUT_NAMES, [])]  # type: ignore[union-attr]
    numels = [int(n) for n in layout.get(K.LAYOUT_NUMELS, [])]  # type: ignore[union-attr]
    if names != list(expected.names):
        extra = sorted(set(names) - set(expected.names))[:3]
        missing = sorted(set(expected.names) - set(names))[:3]
        raise ReplyRejected(
            f"node {node}: tensor names differ from those requested (unexpected {extra}, "
            f"missing {missing})"
        )
    if numels != list(expected.numels):
        raise ReplyRejected(f"node {node}: tensor sizes {numels[:4]}… differ from the adapter's")
    array = arrays[K.ARRAY_FLAT]
    if array.dtype != "float32":
        raise ReplyRejected(f"node {node}: dtype {array.dtype}, expected float32")
    delta = array.numpy()
    if delta.shape != (expected.size,):
        raise ReplyRejected(
            f"node {node}: vector of shape {delta.shape}, expected ({expected.size},)"
        )
    if not np.isfinite(delta).all():
        raise ReplyRejected(
            f"node {node}: update holds {int((~np.isfinite(delta)).sum())} non-finite values"
        )
    metrics = content.metric_records[K.METRICS]
    num_examples = metrics.get(K.MET_NUM_EXAMPLES, 0)
    if not isinstance(num_examples, int) or not 0 < num_examples <= max_examples:
        raise ReplyRejected(
            f"node {node}: example count {num_examples!r} is not in [1, {max_examples}]"
        )
    loss = float(metrics.get(K.MET_TRAIN_LOSS, math.nan))  # type: ignore[arg-type]
    return TrainReply(
        node_id=node,
        delta=delta.astype(np.float32, copy=False),
        num_examples=num_examples,
        train_loss=loss,
        bytes_up=int(delta.nbytes),
    )
