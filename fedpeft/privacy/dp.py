"""DP-SGD on a peft adapter's trainable tensors, through Opacus.

This module owns one round of private training's *mechanics*: checking that a model can be
trained with DP-SGD, attaching Opacus' per-sample-gradient hooks to it, wrapping the optimizer
(per-sample clipping + Gaussian noise) and the data loader (Poisson sampling), the backward pass
that is correct in every grad-sample mode, and removing every trace of Opacus afterwards so the
same cached model can be wrapped again next round. The random draws themselves (ChaCha20
streams) belong to :mod:`fedpeft.privacy.randomness`. It leaves to others: the loss
(:mod:`fedpeft.losses`), the noise multiplier (:mod:`fedpeft.privacy.calibration`), the budget
across rounds and runs (:mod:`fedpeft.privacy.ledger`; the ``PrivacyEngine`` accountant used
here lives for one round only and is not consulted) and the training loop itself.

Opacus' ``PrivacyEngine.make_private`` does the wrapping, with ``wrap_model=False``: hooks are
attached to the caller's model in place, so ``session.module`` *is* the peft model
(``get_peft_model_state_dict`` works on it directly). What is added here, and why:

- validation that lists every problem at once, including the peft cases Opacus' own
  ``ModuleValidator`` does not catch (trainable embeddings, LoRA on embeddings, DoRA), and
  the optimizer-captured-stale-tensors ordering bug of opacus#820;
- :meth:`DPSession.backward`, because in ``ghost`` mode a plain ``loss.backward()`` silently
  skips clipping; a step without it raises instead of updating;
- a noise-only step for an empty Poisson batch, which many models cannot run forward;
- a non-finite example drops out of its step (``hooks``/``functorch``: its per-example
  gradient is zeroed; ``ghost``: the step is run again without it) instead of failing the
  round, so a crafted adapter that overflows one kind of example learns nothing from
  whether the site failed;
- a cap on steps (the round's charge in the ledger) and a :meth:`DPSession.close` that also
  clears what Opacus' own ``cleanup`` leaves behind (``summed_grad``, captured activations);
- noise and Poisson sampling from a cryptographically secure, keyed source, and an explicit
  sampling rate.

Randomness: the Gaussian noise and the Poisson sampling are drawn from two ChaCha20
keystreams keyed by HKDF-SHA256 sub-keys of the session's ``noise_key``
(:func:`fedpeft.privacy.randomness.session_streams`); no torch or numpy generator feeds either.
Opacus' own secure path (``secure_mode=True``) needs ``torchcsprng``, which cannot be
installed, so the engine runs with ``secure_mode=False`` and two of its pieces are replaced:

- noise: the session's optimizer *instance* gets its own ``add_noise``, shadowing the class's
  (``DPOptimizer.add_noise`` in hooks and functorch modes,
  ``DPOptimizerFastGradientClipping.add_noise`` in ghost mode). It is a line-for-line copy of
  Opacus' that draws ``N(0, (σC)^2)`` from the noise stream where Opacus calls
  ``_generate_noise`` with a torch generator; both classes' ``pre_step`` call
  ``self.add_noise()`` between clipping (or ghost accumulation) and ``scale_grad``, so
  clipping, scaling, the step hook and empty batches are untouched;
- clipping, only with ``automatic_clipping`` (hooks and functorch modes): the instance's
  ``clip_and_accumulate`` is a copy of Opacus' whose per-example factor is C/(‖g‖+γ)
  (automatic clipping, Bu et al. 2022) instead of min(1, C/‖g‖), 0 for a zero gradient;
  Opacus has no such option, and the copy keeps every other line of its accumulation;
- sampling: ``PrivacyEngine.make_private(poisson_sampling=True)`` still builds its
  ``DPDataLoader`` (and forbids gradient accumulation), but that loader is discarded without
  ever being iterated, so its torch generator draws nothing; :attr:`DPSession.data_loader` is a
  :class:`PoissonDataLoader`, whose batch sampler draws from the sampling stream and whose
  empty-batch handling is Opacus' own (``wrap_collate_with_empty``).

``PrivacyEngine(secure_mode=False)`` still warns "Secure RNG turned off" (from its
``__init__``, unconditionally; shown once per process under Python's default filters). The
warning is about the torch generators of ``_generate_noise`` and of the ``DPDataLoader``,
neither of which is used here, so it no longer applies. It is not silenced here (a warnings
filter is process-wide state); callers may filter it by its message. What ``secure_mode`` does
beyond its generator (summing four Gaussians against floating-point attacks) is not reproduced:
see :mod:`fedpeft.privacy.randomness`. torch's generators still seed DataLoader workers and
LoRA dropout, which the privacy analysis does not involve.

The same ``noise_key`` gives the same batches and the same noise, so a retried round repeats
its update exactly (given deterministic kernels). Never reuse a key for a different round: an
observer of both updates could cancel the shared noise. Derive one per round from a site
secret, or pass none for a fresh random key.

Order of operations (opacus#820): put the base model on its final device and dtype, apply
peft, *then* create the optimizer, *then* call :func:`make_private`. While a session is open,
evaluate under ``torch.no_grad()`` (or after :meth:`DPSession.close`): a training-mode forward
with gradients enabled and no backward leaves captured activations behind.

Typing: Opacus ships no type information (no ``py.typed``); the project's mypy configuration
(``ignore_missing_imports``) types its objects as ``Any``, so no per-import ignores are needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence, Sized
from functools import partial
from typing import cast, get_args

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.grad_sample import AbstractGradSampleModule, GradSampleHooks
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from opacus.validators.errors import IllegalModuleConfigurationError
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data._utils.collate import default_collate

from fedpeft.losses import Reduction, batch_loss
from fedpeft.names import Clipping
from fedpeft.privacy.errors import (
    BudgetExceededError,
    DPCompatibilityError,
    NonFiniteExamplesError,
    PrivacyConfigError,
    PrivacyError,
)
from fedpeft.privacy.randomness import (
    KEY_BYTES,
    KeyedStream,
    PoissonBatchSampler,
    new_session_key,
    session_streams,
)

__all__ = [
    "DPSession",
    "GradSampleMode",
    "PoissonDataLoader",
    "find_dp_problems",
    "make_private",
    "poisson_sample_rate",
]

#: How per-example gradient norms are computed (``privacy.clipping``).
GradSampleMode = Clipping
_MODES: tuple[str, ...] = tuple(c.value for c in Clipping)
_REDUCTIONS: tuple[str, ...] = get_args(Reduction)
#: Smallest γ of automatic clipping: C/(‖g‖+γ) stays far from float32's overflow for any C.
AUTOMATIC_CLIPPING_MIN = 1e-6

# Attributes Opacus puts on parameters and submodules; close() removes any that remain.
_PARAM_ATTRS = (
    "grad_sample",
    "_forward_counter",
    "_current_grad_sample",
    "_norm_sample",
    "summed_grad",
)
_MODULE_ATTRS = (
    "activations",
    "max_batch_len",
    "ft_compute_sample_grad",
    "autograd_grad_sample_hooks",
)

# Parameter-name fragments of peft layers Opacus cannot give correct per-sample gradients for.
_DORA_MARK = "lora_magnitude_vector"
_LORA_EMBEDDING_MARKS = ("lora_embedding_A", "lora_embedding_B")
# The optimizer classes whose add_noise _add_keyed_noise reproduces (flat clipping, one process).
_NOISE_REPLACED = (DPOptimizer, DPOptimizerFastGradientClipping)


def poisson_sample_rate(data_loader: DataLoader[object]) -> float:
    """The sampling rate Opacus' ``DPDataLoader`` derives from a plain loader.

    ``DPDataLoader.from_data_loader`` includes each example in a batch with probability
    ``1 / len(data_loader)``, so the expected batch size is about the loader's ``batch_size``.
    Use this to calibrate noise and check the budget before calling :func:`make_private`.

    Parameters
    ----------
    data_loader : torch.utils.data.DataLoader
        The plain (non-DP) loader that will be passed to :func:`make_private`.

    Returns
    -------
    float
        q in (0, 1].

    Raises
    ------
    DPCompatibilityError
        If the loader has no length or no batches.
    """
    try:
        batches = len(data_loader)
    except TypeError as exc:
        raise DPCompatibilityError(
            "data_loader has no length (an IterableDataset?); Poisson sampling needs a "
            "map-style dataset."
        ) from exc
    if batches < 1:
        raise DPCompatibilityError("data_loader yields no batches: the dataset is empty.")
    return 1.0 / batches


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strip_opacus(module: nn.Module) -> None:
    """Remove every Opacus hook and attribute from ``module`` and its parameters.

    Complements Opacus' ``cleanup()``, which leaves ``summed_grad`` (set by the optimizer) and
    the activations a forward pass without backward captured; also used when ``make_private``
    fails halfway, when no session exists to close.
    """
    handles = module.__dict__.get("autograd_grad_sample_hooks", [])
    for handle in handles:
        handle.remove()
    for p in module.parameters():
        for attr in _PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
    for sub in module.modules():
        for attr in _MODULE_ATTRS:
            if attr in sub.__dict__:
                delattr(sub, attr)


def _check_settings(
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str,
    loss_reduction: str,
    max_steps: int | None,
    noise_key: object,
    sample_rate: object,
    automatic_clipping: object = None,
) -> None:
    problems = []
    if automatic_clipping is not None and not (
        isinstance(automatic_clipping, (int, float))
        and not isinstance(automatic_clipping, bool)
        and math.isfinite(automatic_clipping)
        and automatic_clipping >= AUTOMATIC_CLIPPING_MIN
    ):
        problems.append(
            f"automatic_clipping={automatic_clipping!r} must be None (Opacus's clipping) or "
            f"γ in [{AUTOMATIC_CLIPPING_MIN:g}, ∞), the stability constant of C/(‖g‖+γ) (Bu et "
            "al. use 0.01)"
        )
    if automatic_clipping is not None and grad_sample_mode == Clipping.ghost:
        problems.append(
            "automatic_clipping with grad_sample_mode='ghost': ghost clipping computes its "
            "scale inside Opacus's module, which this module does not replace; use 'hooks'"
        )
    if not (
        _is_number(noise_multiplier) and math.isfinite(noise_multiplier) and noise_multiplier >= 0
    ):
        problems.append(
            f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0 "
            "(0 means no privacy; get one from calibrate_noise_multiplier)"
        )
    if not (
        isinstance(max_grad_norm, (int, float))
        and math.isfinite(max_grad_norm)
        and max_grad_norm > 0
    ):
        problems.append(f"max_grad_norm={max_grad_norm!r} must be a finite number > 0")
    if grad_sample_mode not in _MODES:
        problems.append(f"grad_sample_mode={grad_sample_mode!r} must be one of {_MODES}")
    if loss_reduction not in _REDUCTIONS:
        problems.append(f"loss_reduction={loss_reduction!r} must be one of {_REDUCTIONS}")
    if max_steps is not None and (
        isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0
    ):
        problems.append(f"max_steps={max_steps!r} must be None or an integer >= 0")
    if noise_key is not None and not (isinstance(noise_key, bytes) and len(noise_key) == KEY_BYTES):
        got = (
            f"{len(noise_key)} bytes" if isinstance(noise_key, bytes) else type(noise_key).__name__
        )
        problems.append(  # the key is secret: name its type or length, never its value
            f"noise_key must be None or {KEY_BYTES} bytes, got {got}; pass "
            f"secrets.token_bytes({KEY_BYTES}) or a per-round key derived from a site secret"
        )
    if sample_rate is not None and not (
        isinstance(sample_rate, (int, float))
        and not isinstance(sample_rate, bool)
        and math.isfinite(sample_rate)
        and 0 < sample_rate <= 1
    ):
        problems.append(
            f"sample_rate={sample_rate!r} must be None (for 1/len(data_loader)) or a number "
            "in (0, 1], the probability that each example is in a batch"
        )
    if problems:
        raise PrivacyConfigError("invalid DP-SGD settings: " + "; ".join(problems) + ".")


def find_dp_problems(
    module: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    data_loader: DataLoader[object] | None = None,
) -> list[str]:
    """Every reason ``module`` (with ``optimizer`` and ``data_loader``) cannot be made private.

    Runs Opacus' ``ModuleValidator`` and per-sample-gradient validation, and adds the peft
    and ordering checks they lack. :func:`make_private` raises
    :class:`~fedpeft.privacy.errors.DPCompatibilityError` listing these.

    Parameters
    ----------
    module : torch.nn.Module
        The peft model to train.
    optimizer : torch.optim.Optimizer, optional
        Its optimizer; checked to hold exactly the module's trainable parameters.
    data_loader : torch.utils.data.DataLoader, optional
        The plain data loader; checked to be map-style, batched and non-empty.

    Returns
    -------
    list of str
        Human-readable problems, each with a fix; empty if none.
    """
    problems: list[str] = []
    named = list(module.named_parameters())
    trainable = [(name, p) for name, p in named if p.requires_grad]

    if isinstance(module, AbstractGradSampleModule) or hasattr(
        module, "autograd_grad_sample_hooks"
    ):
        problems.append(
            "module already carries Opacus hooks from an earlier make_private; call "
            "DPSession.close() on that session first (or pass the unwrapped peft model)"
        )
    elif any(hasattr(p, attr) for _, p in named for attr in _PARAM_ATTRS):
        problems.append(
            "module's parameters carry Opacus attributes (grad_sample, ...) from an earlier "
            "session; call DPSession.close() on that session first"
        )

    if not module.training:
        problems.append("module is in eval mode; call module.train() before make_private")
    else:
        stale = sorted(
            name
            for name, sub in module.named_modules()
            if not sub.training and any(p.requires_grad for p in sub.parameters(recurse=False))
        )
        if stale:
            problems.append(
                f"submodules with trainable parameters are in eval mode ({', '.join(stale)}); "
                "Opacus records nothing for them. Call module.train()"
            )
    for error in ModuleValidator.validate(module, strict=False):
        if isinstance(error, IllegalModuleConfigurationError) and "training mode" in str(error):
            continue  # reported above, with the fix
        problems.append(f"Opacus ModuleValidator: {error}")
    for error in GradSampleHooks.validate(module, strict=False):
        problems.append(f"Opacus: {error}")

    if not trainable:
        problems.append(
            "module has no trainable parameters; apply a LoRA adapter with peft's "
            "get_peft_model (which freezes the base model) before make_private"
        )
    dora = [name for name, _ in trainable if _DORA_MARK in name]
    if dora:
        problems.append(
            f"DoRA magnitude vectors are trainable ({', '.join(dora)}); Opacus cannot compute "
            "their per-sample gradients. Set use_dora=False in the LoraConfig"
        )
    lora_embedding = [
        name for name, _ in trainable if any(mark in name for mark in _LORA_EMBEDDING_MARKS)
    ]
    if lora_embedding:
        problems.append(
            f"LoRA is applied to embedding layers ({', '.join(lora_embedding)}); Opacus "
            "does not support it. Remove embedding modules from target_modules"
        )
    embedding = sorted(
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, sub in module.named_modules()
        if isinstance(sub, nn.Embedding)
        for p_name, p in sub.named_parameters(recurse=False)
        if p.requires_grad
    )
    if embedding:
        problems.append(
            f"embedding weights are trainable ({', '.join(embedding)}); freeze them "
            "(requires_grad_(False)) and keep them out of modules_to_save"
        )
    meta = [name for name, p in named if p.device.type == "meta"]
    if meta:
        problems.append(
            f"parameters are on the meta device ({', '.join(meta[:5])}"
            f"{', ...' if len(meta) > 5 else ''}); materialise the model on its final device "
            "before creating the optimizer"
        )

    if optimizer is not None:
        trainable_ids = {id(p) for _, p in trainable}
        frozen_ids = {id(p) for _, p in named if not p.requires_grad}
        opt_params = [p for group in optimizer.param_groups for p in group["params"]]
        opt_ids = {id(p) for p in opt_params}
        foreign = [p for p in opt_params if id(p) not in trainable_ids | frozen_ids]
        frozen = [name for name, p in named if id(p) in opt_ids and not p.requires_grad]
        missing = [name for name, p in trainable if id(p) not in opt_ids]
        if foreign:
            problems.append(
                f"the optimizer holds {len(foreign)} tensor(s) that are not parameters of "
                "module, so it would update stale copies (opacus#820). Put the model on its "
                "final device and dtype, apply peft, then create the optimizer from "
                "[p for p in model.parameters() if p.requires_grad], then call make_private"
            )
        if frozen:
            problems.append(
                f"the optimizer holds frozen parameters ({', '.join(frozen[:5])}"
                f"{', ...' if len(frozen) > 5 else ''}); build it from the trainable "
                "parameters only"
            )
        if missing:
            problems.append(
                f"trainable parameters are missing from the optimizer ({', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}); they would get per-sample gradients "
                "but never be updated. Build the optimizer from all trainable parameters"
            )

    if data_loader is not None:
        if isinstance(data_loader, (DPDataLoader, PoissonDataLoader)):
            problems.append(
                f"data_loader is already Poisson-sampled (a {type(data_loader).__name__}); pass "
                "the plain DataLoader, make_private adds Poisson sampling itself"
            )
        elif isinstance(data_loader.dataset, IterableDataset):
            problems.append(
                "data_loader iterates an IterableDataset; Poisson sampling needs a map-style "
                "dataset (with __len__ and __getitem__)"
            )
        elif data_loader.batch_size is None:
            problems.append(
                "data_loader has no batch_size (a custom batch_sampler?); give it a batch_size, "
                "which sets the expected Poisson batch size"
            )
        elif len(data_loader) == 0:
            problems.append("data_loader yields no batches: the dataset is empty")
    return problems


class PoissonDataLoader(DataLoader[object]):
    """A plain loader's dataset and collation, Poisson-sampled from a keyed stream.

    Built as Opacus' ``DPDataLoader.from_data_loader`` builds its loader (same settings copied
    from the plain loader, same empty-batch collation by ``wrap_collate_with_empty``, the
    plain loader's ``drop_last`` ignored), with the batch sampler replaced by
    :class:`~fedpeft.privacy.randomness.PoissonBatchSampler`: each of the N examples joins
    each batch independently with probability ``sample_rate``, drawn from ChaCha20. Every
    iteration continues the stream; ``len()`` is ``floor(1 / sample_rate)`` batches.

    Parameters
    ----------
    data_loader : torch.utils.data.DataLoader
        The plain, map-style loader (its dataset, collate function and worker settings).
    sample_rate : float
        q in (0, 1].
    stream : fedpeft.privacy.randomness.KeyedStream
        The session's sampling stream (never the noise stream).

    Attributes
    ----------
    sample_rate : float
        q, as Opacus' ``DPDataLoader.sample_rate``.
    """

    def __init__(
        self, data_loader: DataLoader[object], *, sample_rate: float, stream: KeyedStream
    ) -> None:
        dataset = data_loader.dataset
        sampler = PoissonBatchSampler(
            num_samples=len(cast(Sized, dataset)), sample_rate=sample_rate, stream=stream
        )
        # Opacus' DPDataLoader: an empty *first* batch is built from dataset[0]'s items
        first = cast(Sequence[object], dataset[0])
        collate = wrap_collate_with_empty(
            collate_fn=data_loader.collate_fn or default_collate,
            sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
            dtypes=[dtype_safe(x) for x in first],
        )
        super().__init__(
            dataset,
            batch_sampler=sampler,
            num_workers=data_loader.num_workers,
            collate_fn=collate,
            pin_memory=data_loader.pin_memory,
            timeout=data_loader.timeout,
            worker_init_fn=data_loader.worker_init_fn,
            multiprocessing_context=data_loader.multiprocessing_context,
            # seeds worker processes only; the batches come from the sampler's stream
            generator=data_loader.generator,
            prefetch_factor=data_loader.prefetch_factor,
            persistent_workers=data_loader.persistent_workers,
        )
        self.sample_rate = sampler.sample_rate


def _normalize_and_accumulate(optimizer: DPOptimizer, gamma: float) -> None:
    """Opacus' ``clip_and_accumulate`` with automatic clipping (Bu et al., 2022).

    A copy of ``DPOptimizer.clip_and_accumulate`` whose per-example factor is
    ``C / (‖g‖ + γ)`` instead of ``min(1, C / (‖g‖ + 1e-6))``: every example's gradient is
    scaled to norm ``C·‖g‖/(‖g‖+γ) < C``, so the sensitivity of the sum is still C and the
    noise and accounting stay as they are; small gradients are scaled up instead of kept, which
    keeps the direction of every example and removes the choice of C (any C is a learning
    rate). Bound per optimizer, as :func:`_add_keyed_noise` is.
    """
    if len(optimizer.grad_samples[0]) == 0:
        factor = torch.zeros((0,), device=optimizer.grad_samples[0].device)
    else:
        norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in optimizer.grad_samples]
        device = norms[0].device
        per_example = torch.stack([n.to(device) for n in norms], dim=1).norm(2, dim=1)
        # a zero gradient (an example zeroed as non-finite, a saturated softmax) contributes
        # nothing whatever its factor; its factor is 0, so C/γ can never reach inf · 0 = NaN
        factor = torch.where(
            per_example > 0,
            optimizer.max_grad_norm / (per_example + gamma),
            torch.zeros_like(per_example),
        )
    for p in optimizer.params:
        _check_processed_flag(p.grad_sample)
        grad_sample = optimizer._get_flat_grad_sample(p).to(p.dtype)
        grad = torch.einsum("i,i...", factor.to(grad_sample.device).to(p.dtype), grad_sample)
        if p.summed_grad is not None:
            p.summed_grad += grad
        else:
            p.summed_grad = grad
        _mark_as_processed(p.grad_sample)


def _add_keyed_noise(optimizer: DPOptimizer, stream: KeyedStream) -> None:
    """Opacus' ``add_noise``, with the Gaussian drawn from ``stream``; bound per optimizer.

    A copy of ``DPOptimizer.add_noise`` and of ``DPOptimizerFastGradientClipping.add_noise``
    (the same but for ``_adjusted_noise_multiplier``, which only Opacus' adaptive clipping
    sets): check that ``summed_grad`` is fresh, set ``p.grad = summed_grad + N(0, (σC)^2)``
    in ``summed_grad``'s shape, dtype and device, mark it used. σ = 0 adds nothing and draws
    nothing, as ``_generate_noise`` returns zeros then.
    """
    multiplier = optimizer.noise_multiplier
    if isinstance(optimizer, DPOptimizerFastGradientClipping):
        multiplier = getattr(optimizer, "_adjusted_noise_multiplier", multiplier)
    std = float(multiplier) * float(optimizer.max_grad_norm)
    for p in optimizer.params:
        _check_processed_flag(p.summed_grad)
        summed = p.summed_grad
        if std == 0:
            noisy = summed.clone()  # a new tensor, as summed + zeros is in Opacus
        else:
            noise = stream.gaussian(summed.shape, std=std, device=summed.device, dtype=summed.dtype)
            noisy = summed + noise
        p.grad = noisy.view_as(p)
        _mark_as_processed(p.summed_grad)


class DPSession:
    """One round of DP-SGD on a model; created by :func:`make_private`.

    Attributes
    ----------
    module : torch.nn.Module
        The caller's model, with Opacus hooks attached until :meth:`close`. Call it as usual.
    optimizer : opacus.optimizers.DPOptimizer
        Clips per-sample gradients, adds noise and scales by the expected batch size. Call
        ``optimizer.step()`` and ``optimizer.zero_grad()`` after each :meth:`backward`.
    data_loader : PoissonDataLoader
        Poisson-sampled loader over the same dataset: batches vary in size and can be empty
        (then call ``backward(torch.empty(0))`` without a forward pass). Opacus builds an
        empty batch in the structure of the first non-empty one; an empty *first* batch is a
        list of zero-length tensors shaped like ``dataset[0]``'s items, and crashes in
        Opacus 1.6.0 (``torch.zeros(dtype=str)``) if examples are dicts: have the dataset
        yield tuples of tensors.
    noise_multiplier : float
        σ, noise standard deviation over ``max_grad_norm``.
    max_grad_norm : float
        Per-example clipping norm C.
    sample_rate : float
        Poisson sampling rate q, the figure to record in the ledger.
    expected_batch_size : int
        Denominator of the averaged gradient when ``loss_reduction="mean"``: the plain
        loader's ``batch_size``, a public setting, never a count of the private data (see
        :func:`make_private`).
    grad_sample_mode : {"hooks", "ghost", "functorch"}
    loss_reduction : {"mean", "sum"}
    max_steps : int or None
        Steps allowed in this session (the round's charge), or no limit.
    """

    def __init__(
        self,
        *,
        module: nn.Module,
        hooks: GradSampleHooks,
        optimizer: DPOptimizer,
        data_loader: PoissonDataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        expected_batch_size: int,
        grad_sample_mode: GradSampleMode,
        loss_reduction: Reduction,
        max_steps: int | None,
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.data_loader = data_loader
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.sample_rate = sample_rate
        self.expected_batch_size = expected_batch_size
        self.grad_sample_mode = grad_sample_mode
        self.loss_reduction = loss_reduction
        self.max_steps = max_steps
        self._hooks = hooks
        self._params: list[nn.Parameter] = list(optimizer.params)
        self._steps = 0
        self._backward_done = False
        self._closed = False
        # Replaces the PrivacyEngine's accountant hook: the ledger, not that per-round
        # accountant, is the record. Called after clipping and noise, before the update.
        optimizer.attach_step_hook(self._on_step)

    @property
    def steps(self) -> int:
        """Noisy optimizer steps taken in this session."""
        return self._steps

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def backward(self, per_example_losses: torch.Tensor) -> torch.Tensor:
        """Backpropagate a batch so that the next ``optimizer.step()`` is a correct DP step.

        - ``hooks`` / ``functorch``: backpropagates the batch loss reduced with
          ``loss_reduction``; Opacus' hooks record each example's gradient.
        - ``ghost``: two backward passes through Opacus' ``DPTensorFastGradientClipping``:
          the first computes per-example gradient norms, the second the clipped sum.
        - empty batch (``per_example_losses.numel() == 0``): Poisson sampling can draw no
          example at all. Skip the forward pass and pass ``torch.empty(0)``; the following
          step then applies noise only, as the privacy analysis assumes.
        - non-finite examples (``hooks`` / ``functorch``): an example whose loss or
          per-example gradient is not finite contributes a zero gradient, and the step goes
          on. Raising instead would be a release outside the noise: a crafted adapter can
          make exactly the examples of one kind overflow, and "the site failed" would then
          say whether such an example is in the batch. Zeroing one example's contribution
          changes the clipped sum by at most C, as its absence would, so the guarantee holds.
          In ``ghost`` mode per-example gradients are never materialised and a non-finite
          example would poison the whole sum, so the step is undone and
          :class:`~fedpeft.privacy.errors.NonFiniteExamplesError` names the examples to
          run again without it (:func:`fedpeft.client.train.private_backward`); the
          result is the same.

        Parameters
        ----------
        per_example_losses : torch.Tensor
            ``(B,)`` losses from :func:`fedpeft.losses.per_example_loss`, computed from
            ``self.module``'s output in training mode with gradients enabled.

        Returns
        -------
        torch.Tensor
            The detached batch loss (for logging; 0 for an empty batch).

        Raises
        ------
        PrivacyError
            If the session is closed, a backward was already done for this step, or the
            losses are not ``(B,)`` or do not require grad.
        NonFiniteExamplesError
            In ``ghost`` mode, if an example's loss or gradient norm is not finite; nothing
            was stepped: run the forward again on ``batch[error.finite]``.
        """
        if self._closed:
            raise PrivacyError("DPSession.backward called after close(); call make_private again.")
        if self._backward_done:
            raise PrivacyError(
                "DPSession.backward called twice without optimizer.step(); Poisson sampling "
                "allows no gradient accumulation. Call optimizer.step() and "
                "optimizer.zero_grad() after each backward."
            )
        if per_example_losses.dim() != 1:
            raise PrivacyError(
                f"per_example_losses must have shape (B,); got {tuple(per_example_losses.shape)}. "
                "Use fedpeft.losses.per_example_loss (not a reduced loss)."
            )
        if per_example_losses.numel() == 0:
            self._prepare_empty_step()
            self._backward_done = True
            return torch.zeros((), device=per_example_losses.device)
        if not per_example_losses.requires_grad:
            raise PrivacyError(
                "per_example_losses do not require grad; compute them from session.module's "
                "output in training mode, outside torch.no_grad()."
            )
        finite = torch.isfinite(per_example_losses.detach())
        if self.grad_sample_mode == "ghost":
            self._ghost_backward(per_example_losses, finite)
        else:
            # A non-finite example backpropagates a zero loss gradient (its upstream
            # gradients may still be NaN: 0 · inf); its per-example rows are zeroed below.
            safe = torch.where(finite, per_example_losses, torch.zeros_like(per_example_losses))
            # torch.autograd.backward: Tensor.backward is untyped in torch 2.13
            torch.autograd.backward(batch_loss(safe, self.loss_reduction))
            self._zero_non_finite_examples(~finite)
        self._backward_done = True
        kept = per_example_losses.detach()[finite]
        return batch_loss(kept, self.loss_reduction) if kept.numel() else kept.sum()

    def close(self) -> None:
        """Remove every Opacus hook and attribute from the model (idempotent).

        Afterwards ``self.module`` is the plain peft model again, with ``.grad`` cleared, and
        can be passed to :func:`make_private` for the next round. This session's optimizer
        and data loader must not be used any more.
        """
        if self._closed:
            return
        self._closed = True
        self._hooks.cleanup()  # removes hooks; deletes grad_sample & co. from parameters
        _strip_opacus(self.module)
        for p in self._params:
            p.grad = None  # the last step's noisy gradient must not leak into later use

    def __enter__(self) -> DPSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _zero_non_finite_examples(self, bad: torch.Tensor) -> None:
        """Zero, in every parameter, the per-example gradients of examples in ``bad`` ``(B,)``
        and of every example whose per-example gradient is not finite anywhere."""
        samples = [
            p.grad_sample  # type: ignore[attr-defined]
            for p in self._params
            if isinstance(getattr(p, "grad_sample", None), torch.Tensor)
        ]
        if not samples:
            return
        bad = bad.to(samples[0].device).clone()
        for grad_sample in samples:  # (B, *shape)
            bad |= ~torch.isfinite(grad_sample.reshape(grad_sample.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            for grad_sample in samples:
                grad_sample[bad] = 0

    def _ghost_backward(self, losses: torch.Tensor, finite: torch.Tensor) -> None:
        """Opacus' two ghost-clipping passes (``DPTensorFastGradientClipping.backward``), with
        a check between them: an example whose loss or gradient norm is not finite would
        poison the second pass (0 · inf through its activations), so the step is undone and
        :class:`NonFiniteExamplesError` names the examples to run again."""
        if not bool(finite.all()):
            self._discard_forward()
            raise NonFiniteExamplesError(finite)
        torch.autograd.backward(batch_loss(losses, self.loss_reduction), retain_graph=True)
        self.optimizer.zero_grad()
        coefficients = self._hooks.get_clipping_coef()  # C / norm, at most 1
        finite_norms = torch.isfinite(self._hooks.per_sample_gradient_norms)
        if not bool(finite_norms.all()):
            self.optimizer.zero_grad()
            self._discard_forward()
            raise NonFiniteExamplesError(finite_norms.to(finite.device))
        self._hooks.disable_hooks()
        try:
            torch.autograd.backward(torch.sum(coefficients.to(losses.device) * losses))
        finally:
            self._hooks.enable_hooks()

    def _discard_forward(self) -> None:
        """Forget the activations Opacus' hooks kept from a forward pass not backpropagated,
        and its count of forwards (ghost clipping takes a second one for parameter tying)."""
        for sub in self.module.modules():
            for attr in ("activations", "max_batch_len"):
                if attr in sub.__dict__:
                    delattr(sub, attr)
        for p in self._params:
            if hasattr(p, "_forward_counter"):
                p._forward_counter = 0

    def _prepare_empty_step(self) -> None:
        """Gradient state for a batch with no examples: the step adds noise to zero."""
        self._discard_forward()  # drop activations of an empty forward, if one ran
        for p in self._params:
            if self.grad_sample_mode == "ghost":
                p.grad = torch.zeros_like(p)  # the ghost optimizer noises p.grad directly
            else:
                # Opacus' per-sample gradient attribute: (0, *shape) for no examples
                p.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                    (0, *p.shape), dtype=p.dtype, device=p.device
                )

    def _on_step(self, optimizer: DPOptimizer) -> None:
        """Opacus step hook: runs after clipping and noise, before the parameter update."""
        if self._closed:
            raise PrivacyError("optimizer.step() called after DPSession.close().")
        if not self._backward_done:
            raise PrivacyError(
                "optimizer.step() called without DPSession.backward(per_example_losses); a plain "
                "loss.backward() skips clipping in ghost mode and may mis-scale per-sample "
                "gradients in the others. No update was applied."
            )
        if self.max_steps is not None and self._steps >= self.max_steps:
            raise BudgetExceededError(
                f"step {self._steps + 1} refused: this session was charged for max_steps="
                f"{self.max_steps} steps in the privacy ledger. No update was applied. "
                "Stop the round after max_steps steps, or charge more steps before training."
            )
        self._backward_done = False
        self._steps += 1


def make_private(
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[object],
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: GradSampleMode = Clipping.hooks,
    loss_reduction: Reduction = "mean",
    max_steps: int | None = None,
    noise_key: bytes | None = None,
    sample_rate: float | None = None,
    automatic_clipping: float | None = None,
) -> DPSession:
    """Prepare one round of DP-SGD on a peft model's trainable (adapter) parameters.

    Poisson sampling is always on: it is what the accountants assume, and without it a
    ragged last batch mis-scales the gradient.

    Parameters
    ----------
    module : torch.nn.Module
        The peft model, on its final device and dtype, in training mode, with only adapter
        tensors (and ``modules_to_save`` heads) trainable. Hooks are attached to it in place.
    optimizer : torch.optim.Optimizer
        Created *after* the model reached its final device, over exactly its trainable
        parameters. Its state (e.g. Adam moments) is kept.
    data_loader : torch.utils.data.DataLoader
        A plain map-style loader over N examples. Its ``batch_size`` B divides each step's
        noisy sum (``loss_reduction`` below) and, without ``sample_rate``, is the expected
        Poisson batch size. Its ``generator`` (if any) now only seeds
        worker processes: the sampling is drawn from ``noise_key``.
    noise_multiplier : float
        σ >= 0, e.g. from :func:`fedpeft.privacy.calibration.calibrate_noise_multiplier`.
    max_grad_norm : float
        Per-example clipping norm C > 0.
    grad_sample_mode : {"hooks", "ghost", "functorch"}, default "hooks"
        How Opacus gets per-example gradients. ``ghost`` computes only their norms (saves
        memory, slower for small LoRA tensors); ``functorch`` uses ``torch.func`` for
        every layer.
    loss_reduction : {"mean", "sum"}, default "mean"
        How :meth:`DPSession.backward` reduces the per-example losses; with "mean" the noisy
        sum is divided by the plain loader's ``batch_size`` B. Opacus divides by
        ``int(N * q)`` instead, but N is private under add/remove adjacency (the accounting
        Poisson sampling uses): a divisor computed from N is not post-processing of the
        noisy sum, and the noise's scale in the update, σ·C/⌊qN⌋, would tell whoever
        receives it the site's N to within 1/q. B is a setting, the same whatever the data;
        at q = 1/len(data_loader) it is about q·N, and with another ``sample_rate`` an update
        is the noisy sum times q·N/B of a mean one (which Adam's per-coordinate steps do not
        see).
    max_steps : int, optional
        Refuse (``BudgetExceededError``, no update) any step beyond this many: pass the steps
        charged to the ledger for this round.
    noise_key : bytes, optional
        32-byte secret keying this session's Poisson sampling and Gaussian noise (two
        ChaCha20 streams with HKDF-SHA256 sub-keys, see
        :func:`~fedpeft.privacy.randomness.session_streams`). The same key repeats the same
        batches and noise (a retried round); use a key for one round only. Omitted: a fresh
        ``secrets.token_bytes(32)``.
    sample_rate : float, optional
        Poisson rate q in (0, 1]: each example joins each batch independently with
        probability q. Omitted: ``poisson_sample_rate(data_loader)`` = ``1/len(data_loader)``.
    automatic_clipping : float, optional
        γ > 0: scale every per-example gradient by ``C/(‖g‖+γ)`` (automatic clipping, Bu et
        al. 2022) instead of clipping it to norm C; the sensitivity stays C, so σ and ε do not
        change. Hooks and functorch modes only. Omitted: Opacus's clipping.

    Returns
    -------
    DPSession
        Holds the model, DP optimizer and Poisson loader; call :meth:`DPSession.close` at the
        end of the round.

    Raises
    ------
    PrivacyConfigError
        If a numeric setting, the mode, ``noise_key`` or ``sample_rate`` is invalid.
    DPCompatibilityError
        Listing every problem with the model, optimizer and data loader.

    Examples
    --------
    One round at a site (``ledger`` a :class:`~fedpeft.privacy.ledger.PrivacyLedger`):

    >>> q = poisson_sample_rate(loader)  # or any rate in (0, 1], passed as sample_rate=q
    >>> ledger.record(run_id=run, round=rnd, noise_multiplier=sigma, sample_rate=q,
    ...               steps=local_steps, ceiling_epsilon=site_ceiling)  # charge first
    >>> model.train()
    >>> optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    >>> from fedpeft.privacy.randomness import derive_key
    >>> round_key = derive_key(site_secret, f"{run}/{rnd}".encode())  # one key per round
    >>> with make_private(module=model, optimizer=optimizer, data_loader=loader,
    ...                   noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=q,
    ...                   max_steps=local_steps, noise_key=round_key) as session:
    ...     batches = iter(session.data_loader)  # restart it when exhausted
    ...     while session.steps < local_steps:
    ...         ids, mask, labels = next(batches)
    ...         if labels.shape[0] == 0:
    ...             session.backward(torch.empty(0))  # noise-only step, no forward
    ...         else:
    ...             logits = session.module(input_ids=ids, attention_mask=mask).logits
    ...             session.backward(per_example_loss(logits, labels, task=task))
    ...         session.optimizer.step()
    ...         session.optimizer.zero_grad()
    """
    _check_settings(
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        grad_sample_mode=grad_sample_mode,
        loss_reduction=loss_reduction,
        max_steps=max_steps,
        noise_key=noise_key,
        sample_rate=sample_rate,
        automatic_clipping=automatic_clipping,
    )
    problems = find_dp_problems(module, optimizer=optimizer, data_loader=data_loader)
    if problems:
        raise DPCompatibilityError(
            f"the model cannot be trained with DP-SGD ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}):\n" + "\n".join(f"  - {p}" for p in problems)
        )
    rate = poisson_sample_rate(data_loader) if sample_rate is None else float(sample_rate)
    expected_batch_size = int(cast(int, data_loader.batch_size))  # find_dp_problems: not None
    sampling_stream, noise_stream = session_streams(
        new_session_key() if noise_key is None else noise_key
    )
    engine = PrivacyEngine(accountant="prv", secure_mode=False)  # see "Randomness" above
    try:
        wrapped = engine.make_private(
            module=module,
            optimizer=optimizer,
            # ghost mode asserts that the criterion's reduction is loss_reduction; the criterion
            # itself is unused (Opacus' default, reduction="mean", refused loss_reduction="sum")
            criterion=nn.CrossEntropyLoss(reduction=loss_reduction),
            data_loader=data_loader,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            loss_reduction=loss_reduction,
            poisson_sampling=True,  # its DPDataLoader is replaced below, never iterated
            clipping="flat",
            grad_sample_mode=grad_sample_mode,
            wrap_model=False,
        )
        # (hooks, optimizer, data_loader), or (hooks, optimizer, criterion, data_loader) in
        # ghost mode; the criterion is not needed: DPSession.backward builds the same loss.
        hooks, dp_optimizer = wrapped[0], wrapped[1]
        if type(dp_optimizer) not in _NOISE_REPLACED:
            raise DPCompatibilityError(
                f"Opacus returned a {type(dp_optimizer).__name__}, whose add_noise this module "
                "does not replace, so its noise would come from torch's generator; only "
                "single-process flat clipping is supported."
            )
        dp_loader = PoissonDataLoader(data_loader, sample_rate=rate, stream=sampling_stream)
    except BaseException:
        _strip_opacus(module)  # leave the cached model as it was, ready for another try
        raise
    # Opacus set int(N * q), a count of the private data; the divisor is the public B instead.
    dp_optimizer.expected_batch_size = expected_batch_size
    # An instance attribute shadows the class's add_noise; pre_step calls self.add_noise().
    dp_optimizer.add_noise = partial(_add_keyed_noise, dp_optimizer, noise_stream)
    if automatic_clipping is not None:  # pre_step calls self.clip_and_accumulate() likewise
        dp_optimizer.clip_and_accumulate = partial(
            _normalize_and_accumulate, dp_optimizer, float(automatic_clipping)
        )
    return DPSession(
        module=module,
        hooks=hooks,
        optimizer=cast(DPOptimizer, dp_optimizer),
        data_loader=dp_loader,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        sample_rate=rate,
        expected_batch_size=expected_batch_size,
        grad_sample_mode=grad_sample_mode,
        loss_reduction=loss_reduction,
        max_steps=max_steps,
    )
