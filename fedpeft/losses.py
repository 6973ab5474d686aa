"""Per-example training losses.

This module owns how a batch's model output becomes one loss per example, shape ``(B,)``.
DP-SGD clips each example's gradient, so each example's loss must depend on that example alone:
Hugging Face's built-in causal-LM loss averages over all valid tokens of the *batch*, which
scales each example's gradient by its share of the batch's tokens and makes per-sample clipping
bound the wrong quantity. Here each example's token losses are averaged over its *own* valid
tokens. How the per-example losses are reduced for backpropagation is :func:`batch_loss`; the
DP backward pass itself belongs to :mod:`fedpeft.privacy.dp`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from fedpeft.names import Task

__all__ = ["IGNORE_INDEX", "Reduction", "Task", "batch_loss", "per_example_loss"]

Reduction = Literal["mean", "sum"]

#: Label value excluded from the loss (padding, prompt tokens); the PyTorch and HF convention.
IGNORE_INDEX = -100

_TASKS = tuple(t.value for t in Task)
_REDUCTIONS = ("mean", "sum")


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, *, task: Task) -> torch.Tensor:
    """Compute one loss per example.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, C)`` class scores for ``task="classification"``; ``(B, T, V)`` next-token
        scores for ``task="causal_lm"``.
    labels : torch.Tensor
        ``(B,)`` class indices for classification; ``(B, T)`` token ids for causal LM, aligned
        with the *inputs* (the shift by one happens here), with ``-100`` at every position
        that must not count (padding, prompt).
    task : {"classification", "causal_lm"}
        What the logits predict.

    Returns
    -------
    torch.Tensor
        ``(B,)`` losses, float32 or wider (half-precision logits are upcast).

        - classification: cross entropy of each example (an example labelled ``-100`` gets 0).
        - causal_lm: mean cross entropy over the example's own valid (non ``-100``) target
          tokens after shifting, so an example's loss depends neither on how much padding the
          batch has nor on the other examples. An example with no valid target token gets a loss
          of exactly 0 (and so a zero gradient): it still counts in the batch size but pulls
          the update nowhere.

    Raises
    ------
    ValueError
        If ``task`` is unknown or the shapes of ``logits`` and ``labels`` do not match.
    """
    if task not in _TASKS:
        raise ValueError(f"task={task!r} is not supported; use one of {_TASKS}.")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # cross entropy in half precision loses too much
    if task == "classification":
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                "classification expects logits of shape (B, C) and labels of shape (B,); got "
                f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}."
            )
        return F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)

    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            "causal_lm expects logits of shape (B, T, V) and labels of shape (B, T); got "
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}."
        )
    batch, length, vocab = logits.shape
    if length < 2:
        raise ValueError(
            f"causal_lm needs sequences of at least 2 tokens to predict a next token; "
            f"got T={length}."
        )
    shift_logits = logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1
    shift_labels = labels[:, 1:]  # (B, T-1)
    token_losses = F.cross_entropy(
        shift_logits.reshape(-1, vocab),
        shift_labels.reshape(-1),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    ).view(batch, length - 1)  # (B, T-1), 0 at ignored positions
    valid = (shift_labels != IGNORE_INDEX).sum(dim=1)  # (B,)
    # clamp: an example without valid tokens has a zero sum, so its loss is 0, not 0/0
    return token_losses.sum(dim=1) / valid.clamp(min=1).to(token_losses.dtype)


def batch_loss(per_example: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Reduce per-example losses to the scalar that is backpropagated.

    Parameters
    ----------
    per_example : torch.Tensor
        ``(B,)`` losses from :func:`per_example_loss`.
    reduction : {"mean", "sum"}
        Must equal the ``loss_reduction`` given to :func:`fedpeft.privacy.dp.make_private`:
        a mismatch scales every per-sample gradient by ``B`` or ``1/B`` and changes which
        examples get clipped.

    Returns
    -------
    torch.Tensor
        A scalar. The mean of an empty batch is defined as 0 here (not NaN).

    Raises
    ------
    ValueError
        If ``per_example`` is not 1-D or ``reduction`` is unknown.
    """
    if per_example.dim() != 1:
        raise ValueError(
            f"per_example must have shape (B,); got {tuple(per_example.shape)}. "
            "Use per_example_loss(...) to get one loss per example."
        )
    if reduction == "sum":
        return per_example.sum()
    if reduction == "mean":
        return per_example.sum() / max(per_example.shape[0], 1)
    raise ValueError(f"reduction={reduction!r} is not supported; use one of {_REDUCTIONS}.")
