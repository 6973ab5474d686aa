"""A site's local work for one round: train the adapter, or evaluate it.

This module owns the local loop: it sets the global adapter, trains the tensors the
strategy names for ``train.local_steps`` optimiser steps, and returns the delta of
those tensors. Per-example losses come from :mod:`fedpeft.losses` (the same ones DP-SGD
clips); differential privacy wraps this loop through :mod:`fedpeft.privacy` rather than
living inside it.

On a CUDA device with bfloat16 support the forward pass of non-private training and of
evaluation runs under bf16 autocast; weights, optimiser state and losses stay float32.
DP-SGD trains in float32 throughout: Opacus computes per-sample gradients in the dtype of
the layer's backpropagated gradients, so an autocast forward would clip and noise bf16
gradients.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import DataLoader

from fedpeft.config import TrainConfig
from fedpeft.data import TokenizedDataset, collate
from fedpeft.losses import per_example_loss
from fedpeft.model import LoadedModel, get_flat, is_head, set_flat
from fedpeft.privacy.errors import NonFiniteExamplesError

if TYPE_CHECKING:
    from fedpeft.privacy.dp import DPSession

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training produced."""

    delta: NDArray[np.float32]  # laid out as the trained subset of the adapter
    num_examples: int
    train_loss: float
    steps: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Held-out figures of the global adapter at one site."""

    loss: float
    accuracy: float  # classification: exact match; causal LM: next-token accuracy
    num_examples: int
    seconds: float


def make_loader(
    dataset: TokenizedDataset, *, batch_size: int, pad_id: int, shuffle: bool, seed: int
) -> DataLoader[Batch]:
    """A data loader over a tokenised split with per-batch padding."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=partial(collate, pad_id=pad_id),
    )


def cycle(loader: DataLoader[Batch]) -> Iterator[Batch]:
    """Batches from a (non-private, shuffled) ``loader``, epoch after epoch."""
    while True:
        yield from loader


def autocast(
    device: torch.device, *, enabled: bool = True
) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on a CUDA device that supports bf16; no change anywhere else."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_losses(
    loaded: LoadedModel,
    model: torch.nn.Module,
    batch: Sequence[torch.Tensor],
    device: torch.device,
    *,
    mixed_precision: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example losses ``(B,)``, float32, and the logits for one batch.

    ``batch`` is (input ids, attention mask, labels, …): tensors after the third (an audit's
    canary marks) are not read. ``mixed_precision`` runs the forward pass under
    :func:`autocast` (never under DP-SGD).
    """
    ids, mask, labels = (t.to(device) for t in batch[:3])
    with autocast(device, enabled=mixed_precision):
        logits = model(input_ids=ids, attention_mask=mask).logits
    return per_example_loss(logits, labels, task=loaded.task), logits


def prepare_trainable(
    loaded: LoadedModel, trained_names: Sequence[str]
) -> list[tuple[str, torch.nn.Parameter]]:
    """Make exactly ``trained_names`` require gradients; return them (name, tensor) in order."""
    wanted = set(trained_names)
    unknown = wanted - set(loaded.layout.names)
    if unknown:
        raise ValueError(
            f"asked to train tensors that are not in the adapter: {sorted(unknown)[:3]}"
        )
    params = []
    for name, param in loaded.peft_model.named_parameters():
        param.requires_grad_(name in wanted)
        if name in wanted:
            params.append((name, param))
    return params


def make_optimizer(
    params: Sequence[tuple[str, torch.nn.Parameter]], config: TrainConfig
) -> torch.optim.Optimizer:
    """The local optimiser; the head's tensors step at ``train.head_lr`` when it is set.

    A classifier head and the LoRA factors want different steps: under DP-SGD every example's
    gradient is clipped to ``max_grad_norm``, which shrinks the head's (large) gradient, while
    the noise added per coordinate is the same for the LoRA factors, which a large step would
    turn into a random walk of the encoder.
    """
    head_lr = config.head_lr if config.head_lr is not None else config.lr
    groups = [
        {"params": [p for n, p in params if not is_head(n)], "lr": config.lr},
        {"params": [p for n, p in params if is_head(n)], "lr": head_lr},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD for one round: noise multiplier σ, clip norm C, Opacus's clipping mode and the
    Poisson rate q (None: ``1 / len(loader)``, Opacus's own choice)."""

    noise_multiplier: float
    max_grad_norm: float
    clipping: str = "hooks"
    sample_rate: float | None = None
    automatic_clipping: float | None = None  # γ of C/(‖g‖+γ); None: Opacus's clipping


def private_backward(
    session: DPSession,
    batch: Sequence[torch.Tensor],
    losses_of: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    *,
    device: torch.device,
) -> tuple[torch.Tensor, Sequence[torch.Tensor]]:
    """``session.backward`` for one Poisson batch (tensors of equal first dimension).

    ``losses_of(batch)`` runs the forward pass and returns the per-example losses. An empty
    batch takes a noise-only step without a forward pass. In ghost mode, examples whose loss
    or gradient norm is not finite are dropped and the rest run again
    (:class:`~fedpeft.privacy.errors.NonFiniteExamplesError`), as ``hooks`` zeroes them:
    either way the step goes on, and nothing says which examples were dropped. Returns the
    logged batch loss and the examples the step used.
    """
    while True:
        if batch[0].shape[0] == 0:
            return session.backward(torch.empty(0, device=device)), batch
        try:
            return session.backward(losses_of(batch)), batch
        except NonFiniteExamplesError as error:
            keep = error.finite.to(batch[0].device)
            batch = tuple(tensor[keep] for tensor in batch)


def train_local(
    loaded: LoadedModel,
    dataset: TokenizedDataset,
    *,
    global_flat: NDArray[np.float32],
    trained_names: Sequence[str],
    config: TrainConfig,
    device: torch.device,
    seed: int,
    dp: DPSettings | None = None,
    noise_key: bytes | None = None,
) -> TrainResult:
    """Train the named adapter tensors for ``config.local_steps`` steps.

    With ``dp``, every step is a DP-SGD step through :func:`fedpeft.privacy.dp.make_private`:
    Poisson-sampled batches at rate ``dp.sample_rate`` (an empty one still takes a noise-only
    step, as the accountant assumes), per-example clipping to ``dp.max_grad_norm`` and
    Gaussian noise; sampling and noise are drawn from a ChaCha20 stream keyed by
    ``noise_key`` (known only to the site; a fresh random key if None). ``seed`` drives only
    what protects nothing: shuffling without DP and LoRA dropout.
    """
    start = time.perf_counter()
    model = loaded.peft_model
    set_flat(model, loaded.layout, global_flat)
    trained_layout = loaded.layout.subset(lambda n: n in set(trained_names))
    before = get_flat(model, trained_layout)
    named = prepare_trainable(loaded, trained_names)
    model.train()
    optimizer = make_optimizer(named, config)
    torch.manual_seed(seed)  # LoRA dropout
    loader = make_loader(
        dataset,
        batch_size=config.batch_size,
        pad_id=int(loaded.tokenizer.pad_token_id),
        shuffle=dp is None,
        seed=seed,
    )
    losses: list[float] = []
    if dp is None:
        batches = cycle(loader)
        for _ in range(config.local_steps):
            per_example, _ = forward_losses(
                loaded, model, next(batches), device, mixed_precision=True
            )
            loss = per_example.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    else:
        from fedpeft.privacy.dp import make_private

        with make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            grad_sample_mode=dp.clipping,  # type: ignore[arg-type]
            max_steps=config.local_steps,
            sample_rate=dp.sample_rate,
            noise_key=noise_key,
            automatic_clipping=dp.automatic_clipping,
        ) as session:
            while session.steps < config.local_steps:
                for batch in session.data_loader:
                    if session.steps >= config.local_steps:
                        break
                    loss, kept = private_backward(
                        session,
                        batch,
                        lambda b: forward_losses(loaded, session.module, b, device)[0],
                        device=device,
                    )
                    if kept[0].shape[0]:
                        losses.append(float(loss))
                    session.optimizer.step()
                    session.optimizer.zero_grad()
    delta = get_flat(model, trained_layout) - before
    return TrainResult(
        delta=delta.astype(np.float32),
        num_examples=len(dataset),
        train_loss=float(np.mean(losses)) if losses else math.nan,
        steps=config.local_steps,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def evaluate_local(
    loaded: LoadedModel,
    dataset: TokenizedDataset,
    *,
    global_flat: NDArray[np.float32],
    batch_size: int,
    device: torch.device,
) -> EvalResult:
    """Mean loss and accuracy of the global adapter on a held-out split."""
    start = time.perf_counter()
    model = loaded.peft_model
    set_flat(model, loaded.layout, global_flat)
    model.eval()
    loader = make_loader(
        dataset,
        batch_size=batch_size,
        pad_id=int(loaded.tokenizer.pad_token_id),
        shuffle=False,
        seed=0,
    )
    loss_sum = correct = count = 0.0
    for ids, mask, labels in loader:
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        with autocast(device):
            logits = model(input_ids=ids, attention_mask=mask).logits
        logits = logits.float()  # losses in float32 whatever the forward's precision
        if loaded.task == "classification":
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += float((logits.argmax(-1) == labels).sum())
            count += labels.shape[0]
        else:
            # token level: position t predicts token t+1; -100 marks prompt and padding
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            valid = shift_labels != -100
            loss_sum += float(
                torch.nn.functional.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.shape[-1]),
                    shift_labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            correct += float(((shift_logits.argmax(-1) == shift_labels) & valid).sum())
            count += float(valid.sum())
    model.train()
    mean_loss = loss_sum / count if count else math.nan
    return EvalResult(
        loss=mean_loss,
        accuracy=correct / count if count else math.nan,
        num_examples=len(dataset),
        seconds=time.perf_counter() - start,
    )
