"""DP-SGD through Opacus on tiny peft models: per-sample gradients, clipping, parity, lifecycle."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import opacus.optimizers.optimizer
import opacus.optimizers.optimizer_fast_gradient_clipping
import pytest
import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpeft.losses import per_example_loss
from fedpeft.privacy.calibration import compute_epsilon
from fedpeft.privacy.dp import (
    DPSession,
    PoissonDataLoader,
    find_dp_problems,
    make_private,
    poisson_sample_rate,
)
from fedpeft.privacy.errors import (
    BudgetExceededError,
    DPCompatibilityError,
    NonFiniteExamplesError,
    PrivacyConfigError,
    PrivacyError,
)
from fedpeft.privacy.randomness import PoissonBatchSampler

pytestmark = [
    # PrivacyEngine(secure_mode=False) warns about torch generators that fedpeft no longer
    # draws from (noise and sampling come from ChaCha20; documented in dp.py).
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    # torch notes that LoRA layers fed by frozen layers have no input gradient: expected here.
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    # transformers 5.23 deprecation hit by peft 0.21's get_peft_model.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

MODES = ("hooks", "functorch", "ghost")
KEY = bytes(range(32))
OPACUS_PARAM_ATTRS = (
    "grad_sample",
    "_forward_counter",
    "_current_grad_sample",
    "_norm_sample",
    "summed_grad",
)
OPACUS_MODULE_ATTRS = (
    "activations",
    "max_batch_len",
    "ft_compute_sample_grad",
    "autograd_grad_sample_hooks",
)


def _model_and_batch(
    tiny: SimpleNamespace, kind: str, *, seed: int = 0
) -> tuple[nn.Module, object]:
    """A perturbed float64 model and a padded batch with examples of different lengths."""
    if kind in ("bert", "bert-mean", "bert-bias"):
        pooling = "mean" if kind == "bert-mean" else "model"
        bias = "all" if kind == "bert-bias" else "none"  # LoRA and every bias (BitFit's)
        model = tiny.build_bert_classifier(seed=seed, pooling=pooling, bias=bias)
        batch = tiny.make_batch("classification", lengths=[5, 9, 3, 7, 6], seed=seed + 10)
    else:
        model = tiny.build_llama_lm(seed=seed)
        batch = tiny.make_batch("causal_lm", lengths=[4, 9, 6, 2, 8], seed=seed + 10)
    tiny.perturb_lora_b(model, seed=seed + 1)
    return model, batch


def _tolerance(kind: str, reference: torch.Tensor) -> dict[str, float]:
    """assert_close tolerances: float64 end to end for BERT; Llama's RMSNorm computes in float32
    even in a float64 model, so the 1/B of the mean loss, rounded there, costs ~1e-7 relative."""
    if kind.startswith("bert"):
        return {"rtol": 1e-9, "atol": 1e-12}
    return {"rtol": 1e-5, "atol": 1e-6 * float(reference.detach().abs().max())}


def _loader_over(batch: object, *, batch_size: int | None = None) -> DataLoader[object]:
    """A plain loader over the batch's examples; with batch_size=B, q = 1 and E = B."""
    dataset = TensorDataset(batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.labels)
    return DataLoader(dataset, batch_size=batch_size or len(dataset))


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _private(model: nn.Module, loader: DataLoader[object], **kwargs: object) -> DPSession:
    optimizer = torch.optim.SGD(list(_trainable(model).values()), lr=kwargs.pop("lr", 1.0))
    settings: dict[str, object] = {"noise_multiplier": 0.0, "max_grad_norm": 1.0}
    settings.update(kwargs)
    return make_private(module=model, optimizer=optimizer, data_loader=loader, **settings)


# ---------------------------------------------------------------------------- (a) correctness


@pytest.mark.parametrize("kind", ["bert", "bert-mean", "bert-bias", "llama"])
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_grads_match_one_backward_per_example(
    tiny: SimpleNamespace, kind: str, mode: str
) -> None:
    model, batch = _model_and_batch(tiny, kind)
    reference = tiny.reference_grads(model, batch)
    assert any("lora_A" in n and g.abs().max() > 0 for n, g in reference.items())

    session = _private(model, _loader_over(batch), grad_sample_mode=mode)
    session.backward(tiny.losses_of(session.module, batch))

    trainable = _trainable(model)
    assert set(reference) == set(trainable)
    biases = [n for n in trainable if n.endswith(".bias") and ".modules_to_save." not in n]
    assert len(biases) == (18 if kind == "bert-bias" else 0)  # the encoder's, the pooler's
    for name, p in trainable.items():
        assert p.grad_sample.shape == (batch.size, *p.shape), name
        torch.testing.assert_close(
            p.grad_sample,
            reference[name],
            **_tolerance(kind, reference[name]),
            msg=lambda m, n=name: f"{n}: {m}",
        )
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert not hasattr(p, "grad_sample"), f"frozen {name} got per-sample gradients"
    session.close()


@pytest.mark.parametrize("kind", ["bert", "bert-mean", "bert-bias", "llama"])
@pytest.mark.parametrize("mode", MODES)
def test_clipped_step_matches_reference(tiny: SimpleNamespace, kind: str, mode: str) -> None:
    """Noise-free step = -lr * sum_i clip(g_i) / E, with some examples clipped and some not."""
    model, batch = _model_and_batch(tiny, kind)
    reference = tiny.reference_grads(model, batch)
    norms = tiny.per_example_norms(reference)
    clip = float(norms.median())
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()
    expected = tiny.clipped_sum(reference, clip)

    session = _private(
        model, _loader_over(batch), grad_sample_mode=mode, max_grad_norm=clip, lr=1.0
    )
    assert session.expected_batch_size == batch.size
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    session.backward(tiny.losses_of(session.module, batch))
    session.optimizer.step()
    for name, p in _trainable(model).items():
        torch.testing.assert_close(
            before[name] - p.detach(),
            expected[name] / batch.size,
            **_tolerance(kind, expected[name] / batch.size),
            msg=lambda m, n=name: f"{n}: {m}",
        )
    assert session.steps == 1
    session.close()


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_automatic_clipping_scales_every_example_by_c_over_its_norm_plus_gamma(
    tiny: SimpleNamespace, mode: str
) -> None:
    """Noise-free step = -lr · Σ_i C·g_i/(‖g_i‖+γ) / E: small gradients scaled up, large ones
    down, every contribution of norm below C (the sensitivity the accounting assumes)."""
    model, batch = _model_and_batch(tiny, "bert")
    reference = tiny.reference_grads(model, batch)
    norms = tiny.per_example_norms(reference)
    clip, gamma = float(norms.median()), 0.01
    factor = clip / (norms + gamma)
    assert (factor > 1).any() and (factor < 1).any()
    assert (norms * factor < clip).all()
    expected = {
        n: torch.einsum("i,i...", factor.to(g.dtype), g).to(g.dtype) for n, g in reference.items()
    }
    session = _private(
        model,
        _loader_over(batch),
        grad_sample_mode=mode,
        max_grad_norm=clip,
        lr=1.0,
        automatic_clipping=gamma,
    )
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    session.backward(tiny.losses_of(session.module, batch))
    session.optimizer.step()
    for name, p in _trainable(model).items():
        torch.testing.assert_close(
            before[name] - p.detach(),
            expected[name] / batch.size,
            **_tolerance("bert", expected[name] / batch.size),
            msg=lambda m, n=name: f"{n}: {m}",
        )
    session.close()


def test_automatic_clipping_is_refused_in_ghost_mode_and_without_a_positive_gamma(
    tiny: SimpleNamespace,
) -> None:
    model, batch = _model_and_batch(tiny, "bert")
    with pytest.raises(
        PrivacyConfigError, match="automatic_clipping with grad_sample_mode='ghost'"
    ):
        _private(model, _loader_over(batch), grad_sample_mode="ghost", automatic_clipping=0.01)
    for bad in (0, 1e-7, math.inf):
        with pytest.raises(PrivacyConfigError, match=r"must be None \(Opacus's clipping\) or"):
            _private(model, _loader_over(batch), automatic_clipping=bad)


def test_automatic_clipping_gives_a_zero_gradient_example_nothing(tiny: SimpleNamespace) -> None:
    """An example with no gradient (here: its label ignored) adds exactly 0, not C/γ · 0."""
    model, batch = _model_and_batch(tiny, "bert")
    batch.labels[1] = -100  # per_example_loss gives it a loss of 0: a zero gradient
    reference = tiny.reference_grads(model, batch)
    norms = tiny.per_example_norms(reference)
    assert norms[1] == 0 and (norms[[0, 2, 3, 4]] > 0).all()
    clip, gamma = 1e3, 1e-6  # the largest factor the floor on γ allows for a zero norm
    factor = torch.where(norms > 0, clip / (norms + gamma), torch.zeros_like(norms))
    expected = {n: torch.einsum("i,i...", factor.to(g.dtype), g) for n, g in reference.items()}
    session = _private(
        model, _loader_over(batch), max_grad_norm=clip, lr=1.0, automatic_clipping=gamma
    )
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    session.backward(tiny.losses_of(session.module, batch))
    session.optimizer.step()
    for name, p in _trainable(model).items():
        moved = before[name] - p.detach()
        assert torch.isfinite(moved).all(), name
        torch.testing.assert_close(moved, expected[name] / batch.size, rtol=1e-7, atol=1e-9)
    session.close()


# ---------------------------------------------------------------------------- (b), (c)


@pytest.mark.parametrize("mode", MODES)
def test_dp_step_changes_exactly_the_adapter(tiny: SimpleNamespace, mode: str) -> None:
    model = tiny.build_bert_classifier(dtype=torch.float32)
    batch = tiny.make_batch("classification", lengths=[6, 8, 4, 8], seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = set(_trainable(model))
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)

    session = _private(
        model, _loader_over(batch), grad_sample_mode=mode, noise_multiplier=1.0, lr=0.1
    )
    session.backward(tiny.losses_of(session.module, batch))
    session.optimizer.step()
    session.close()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trainable


@pytest.mark.parametrize("explicit_rate", [False, True])
@pytest.mark.parametrize(("kind", "mode"), [("bert", m) for m in MODES] + [("llama", "hooks")])
def test_noise_free_unclipped_dp_step_equals_sgd(
    tiny: SimpleNamespace, kind: str, mode: str, explicit_rate: bool
) -> None:
    plain, batch = _model_and_batch(tiny, kind)
    private = copy.deepcopy(plain)
    # 20 examples, batch_size 5: q = 1/4 and the divisor B = 5; with sample_rate=0.5 given
    # (q·N = 10) the divisor is still the loader's B = 5, a setting, not a count of the data.
    # Poisson sampling is bypassed *here only* by stepping on a fixed batch of B examples.
    pool = tiny.make_batch(batch.task, lengths=[3, 5, 7, 9] * 5, seed=7)
    fixed = pool.subset([0, 5, 10, 15, 18])
    loader = _loader_over(pool, batch_size=5)
    rate = {"sample_rate": 0.5} if explicit_rate else {}

    sgd = torch.optim.SGD(list(_trainable(plain).values()), lr=0.5)
    tiny.losses_of(plain, fixed).mean().backward()
    sgd.step()

    session = _private(
        private, loader, grad_sample_mode=mode, max_grad_norm=1e6, lr=0.5, noise_key=KEY, **rate
    )
    assert session.expected_batch_size == fixed.size
    assert session.sample_rate == (0.5 if explicit_rate else 0.25)
    session.backward(tiny.losses_of(session.module, fixed))
    session.optimizer.step()
    session.close()

    for (name, p), q in zip(plain.named_parameters(), private.parameters(), strict=True):
        torch.testing.assert_close(q, p, **_tolerance(kind, p), msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------- lifecycle


def _opacus_traces(model: nn.Module) -> list[str]:
    traces = [
        f"{n}.{a}" for n, p in model.named_parameters() for a in OPACUS_PARAM_ATTRS if hasattr(p, a)
    ]
    for name, sub in model.named_modules():
        traces += [f"{name}.{a}" for a in OPACUS_MODULE_ATTRS if a in sub.__dict__]
        if sub._forward_hooks or sub._backward_hooks or sub._forward_pre_hooks:
            traces.append(f"{name}: hooks")
    return traces


def test_close_removes_opacus_and_the_model_can_be_wrapped_again(tiny: SimpleNamespace) -> None:
    model, batch = _model_and_batch(tiny, "bert")
    pool = tiny.make_batch("classification", lengths=[4, 6, 8] * 8, seed=5)
    assert _opacus_traces(model) == []

    first = _private(model, _loader_over(pool, batch_size=6), noise_multiplier=1.0, lr=0.05)
    hook_count = sum(len(m._forward_hooks) for m in model.modules())
    assert hook_count > 0
    for i, (ids, mask, labels) in enumerate(first.data_loader):
        if i == 3:
            break
        if labels.shape[0] == 0:
            first.backward(torch.empty(0))
        else:
            logits = first.module(input_ids=ids, attention_mask=mask).logits
            first.backward(per_example_loss(logits, labels, task="classification"))
        first.optimizer.step()
        first.optimizer.zero_grad()
    # a stray forward without backward leaves captured activations behind; close() clears them
    first.module(**batch.inputs)
    first.close()
    first.close()  # idempotent
    assert _opacus_traces(model) == []
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(PrivacyError, match="after close"):
        first.backward(tiny.losses_of(model, batch))

    # round 2 on the same model object: hooks are attached once, gradients are right again
    reference = tiny.reference_grads(model, batch)
    second = _private(model, _loader_over(batch))
    assert sum(len(m._forward_hooks) for m in model.modules()) == hook_count
    second.backward(tiny.losses_of(second.module, batch))
    for name, p in _trainable(model).items():
        torch.testing.assert_close(p.grad_sample, reference[name], rtol=1e-9, atol=1e-12)
    second.close()
    assert _opacus_traces(model) == []


def test_make_private_twice_without_close_is_refused(tiny: SimpleNamespace) -> None:
    model, batch = _model_and_batch(tiny, "bert")
    session = _private(model, _loader_over(batch))
    with pytest.raises(DPCompatibilityError, match=r"close\(\)"):
        _private(model, _loader_over(batch))
    session.close()
    _private(model, _loader_over(batch)).close()


class _IntDataset(torch.utils.data.Dataset[int]):
    """Examples Opacus' DPDataLoader cannot inspect (it iterates dataset[0])."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        return index


def test_failed_make_private_leaves_the_model_clean(tiny: SimpleNamespace) -> None:
    model, batch = _model_and_batch(tiny, "bert")
    with pytest.raises(TypeError):
        _private(model, DataLoader(_IntDataset(), batch_size=2))
    assert _opacus_traces(model) == []
    _private(model, _loader_over(batch)).close()


def test_session_is_a_context_manager(tiny: SimpleNamespace) -> None:
    model, batch = _model_and_batch(tiny, "bert")
    with _private(model, _loader_over(batch)) as session:
        session.backward(tiny.losses_of(session.module, batch))
        session.optimizer.step()
    assert session.closed and _opacus_traces(model) == []


# ---------------------------------------------------------------------------- guards


def test_ghost_step_after_plain_backward_is_refused(tiny: SimpleNamespace) -> None:
    """In ghost mode loss.backward() would skip clipping; the step must refuse, not update."""
    model, batch = _model_and_batch(tiny, "bert")
    session = _private(model, _loader_over(batch), grad_sample_mode="ghost", noise_multiplier=1.0)
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    tiny.losses_of(session.module, batch).mean().backward()
    with pytest.raises(PrivacyError, match=r"without DPSession.backward"):
        session.optimizer.step()
    for name, p in _trainable(model).items():
        assert torch.equal(p.detach(), before[name])
    assert session.steps == 0
    session.close()


def test_max_steps_refuses_the_step_beyond_the_charge(tiny: SimpleNamespace) -> None:
    model, batch = _model_and_batch(tiny, "bert")
    session = _private(model, _loader_over(batch), noise_multiplier=1.0, max_steps=1)
    session.backward(tiny.losses_of(session.module, batch))
    session.optimizer.step()
    session.optimizer.zero_grad()
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    session.backward(tiny.losses_of(session.module, batch))
    with pytest.raises(BudgetExceededError, match="max_steps=1"):
        session.optimizer.step()
    assert session.steps == 1
    for name, p in _trainable(model).items():
        assert torch.equal(p.detach(), before[name])
    session.close()


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_is_a_noise_only_step(tiny: SimpleNamespace, mode: str) -> None:
    model, batch = _model_and_batch(tiny, "bert")
    for sigma, should_move in ((0.0, False), (1.0, True)):
        before = {n: p.detach().clone() for n, p in _trainable(model).items()}
        session = _private(
            model, _loader_over(batch), grad_sample_mode=mode, noise_multiplier=sigma, lr=0.1
        )
        loss = session.backward(torch.empty(0, dtype=torch.float64))
        assert float(loss) == 0.0
        session.optimizer.step()
        assert session.steps == 1
        session.close()
        moved = [not torch.equal(p.detach(), before[n]) for n, p in _trainable(model).items()]
        assert all(moved) if should_move else not any(moved)


def test_backward_rejects_bad_losses(tiny: SimpleNamespace) -> None:
    model, batch = _model_and_batch(tiny, "bert")
    session = _private(model, _loader_over(batch))
    losses = tiny.losses_of(session.module, batch)
    with pytest.raises(PrivacyError, match=r"shape \(B,\)"):
        session.backward(losses.mean())
    with pytest.raises(PrivacyError, match="do not require grad"):
        session.backward(losses.detach())
    session.close()


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_a_non_finite_example_contributes_nothing_and_the_step_goes_on(
    tiny: SimpleNamespace, mode: str
) -> None:
    """Raising would tell a coordinator whether an overflowing example is in the batch."""
    model, batch = _model_and_batch(tiny, "bert")
    clean = _private(model, _loader_over(batch), grad_sample_mode=mode)
    clean.backward(tiny.losses_of(clean.module, batch))
    rows = {n: p.grad_sample.detach().clone() for n, p in _trainable(model).items()}
    clean.close()
    session = _private(model, _loader_over(batch), grad_sample_mode=mode)
    losses = tiny.losses_of(session.module, batch)
    poison = torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0], dtype=losses.dtype)
    logged = session.backward(losses * poison)
    assert torch.isfinite(logged)
    for name, p in _trainable(model).items():
        assert torch.equal(p.grad_sample[1], torch.zeros_like(p.grad_sample[1]))
        keep = [0, 2, 3, 4]
        torch.testing.assert_close(p.grad_sample[keep], rows[name][keep])
    session.optimizer.step()
    assert all(bool(torch.isfinite(p).all()) for p in _trainable(model).values())
    session.close()


# the model is float64: a loss of ~1e300 is finite, its gradient's squared norm is not
@pytest.mark.parametrize("poison", [float("nan"), 1e300], ids=["nan-loss", "overflowing-gradient"])
def test_ghost_mode_runs_the_step_again_without_a_non_finite_example(
    tiny: SimpleNamespace, poison: float
) -> None:
    """Ghost clipping cannot zero one example (its activations enter the second pass), so the
    step is undone and run again on the other four: the same step as hooks' zeroed row."""
    model, batch = _model_and_batch(tiny, "bert")
    weights = torch.tensor([1.0, poison, 1.0, 1.0, 1.0], dtype=torch.float64)
    stepped = {}
    for mode in ("hooks", "ghost"):
        private = copy.deepcopy(model)
        session = _private(private, _loader_over(batch), grad_sample_mode=mode, max_grad_norm=0.5)
        if mode == "hooks":
            session.backward(tiny.losses_of(session.module, batch) * weights)
        else:
            with pytest.raises(NonFiniteExamplesError) as caught:
                session.backward(tiny.losses_of(session.module, batch) * weights)
            assert caught.value.finite.tolist() == [True, False, True, True, True]
            assert all(p.grad is None or not p.grad.any() for p in _trainable(private).values())
            kept = batch.subset([0, 2, 3, 4])
            session.backward(tiny.losses_of(session.module, kept))
        session.optimizer.step()
        session.close()
        stepped[mode] = _trainable(private)
    start = _trainable(model)
    assert any(not torch.equal(p, start[name]) for name, p in stepped["ghost"].items())
    for name, p in stepped["hooks"].items():
        torch.testing.assert_close(stepped["ghost"][name], p, msg=name)


def test_private_backward_drops_non_finite_examples_in_every_mode(tiny: SimpleNamespace) -> None:
    from fedpeft.client.train import private_backward

    model, batch = _model_and_batch(tiny, "bert")
    loader = _loader_over(batch)
    ids, mask, labels = next(iter(loader))
    rows = torch.arange(5)  # which example each row is, through the re-run
    weights = torch.tensor([1.0, float("nan"), 1.0, float("nan"), 1.0])
    for mode in MODES:
        session = _private(copy.deepcopy(model), loader, grad_sample_mode=mode)

        def losses_of(b: Sequence[torch.Tensor], session: DPSession = session) -> torch.Tensor:
            logits = session.module(input_ids=b[0], attention_mask=b[1]).logits
            return per_example_loss(logits, b[2], task="classification") * weights[b[3]]

        loss, used = private_backward(
            session, (ids, mask, labels, rows), losses_of, device=torch.device("cpu")
        )
        assert torch.isfinite(loss), mode
        assert used[3].tolist() == ([0, 2, 4] if mode == "ghost" else [0, 1, 2, 3, 4]), mode
        session.optimizer.step()
        session.close()


def test_data_loader_is_poisson_sampled(tiny: SimpleNamespace) -> None:
    model, _ = _model_and_batch(tiny, "bert")
    pool = tiny.make_batch("classification", lengths=[5] * 40, seed=2)
    loader = _loader_over(pool, batch_size=8)
    session = _private(model, loader)
    assert isinstance(session.data_loader, PoissonDataLoader)
    assert isinstance(session.data_loader.batch_sampler, PoissonBatchSampler)
    assert session.sample_rate == poisson_sample_rate(loader) == pytest.approx(1 / 5)
    assert session.data_loader.sample_rate == session.sample_rate
    assert session.expected_batch_size == 8
    assert len(session.data_loader) == 5
    sizes = {len(labels) for _ in range(5) for *_, labels in session.data_loader}
    assert len(sizes) > 1  # Poisson batches vary in size
    # the session's loader is no plain loader to wrap again
    problems = find_dp_problems(model, data_loader=session.data_loader)
    assert any("already Poisson-sampled (a PoissonDataLoader)" in p for p in problems)
    session.close()


# ---------------------------------------------------------------------------- validation


def test_validation_lists_every_problem(tiny: SimpleNamespace) -> None:
    model = tiny.build_bert_classifier(use_dora=True, dtype=torch.float32)
    embeddings = model.get_input_embeddings()
    embeddings.weight.requires_grad_(True)
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    stale = nn.Parameter(trainable[0].detach().clone())  # a copy, as after a late .to()
    optimizer = torch.optim.SGD([stale, *trainable[1:]], lr=0.1)
    batch = tiny.make_batch("classification", lengths=[4, 4], seed=0)

    with pytest.raises(DPCompatibilityError) as info:
        make_private(
            module=model,
            optimizer=optimizer,
            data_loader=_loader_over(batch),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    message = str(info.value)
    assert "5 problems" in message
    for fragment in (
        "eval mode",
        "DoRA",
        "use_dora=False",
        "embedding weights are trainable",
        "opacus#820",
        "missing from the optimizer",
    ):
        assert fragment in message, fragment
    assert len(find_dp_problems(model, optimizer=optimizer)) == 5


def test_lora_on_embeddings_is_rejected(tiny: SimpleNamespace) -> None:
    model = tiny.build_bert_classifier(target_modules=("query", "value", "word_embeddings"))
    problems = find_dp_problems(model)
    assert any("LoRA is applied to embedding layers" in p for p in problems)


def test_frozen_parameters_in_optimizer_and_bad_loaders_are_rejected(tiny: SimpleNamespace) -> None:
    model, batch = _model_and_batch(tiny, "bert")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # includes frozen base weights
    assert any("frozen parameters" in p for p in find_dp_problems(model, optimizer=optimizer))
    dp_loader = DPDataLoader.from_data_loader(_loader_over(batch))
    assert any(
        "already Poisson-sampled (a DPDataLoader)" in p
        for p in find_dp_problems(model, data_loader=dp_loader)
    )


def test_invalid_settings_are_listed_together(tiny: SimpleNamespace) -> None:
    model, batch = _model_and_batch(tiny, "bert")
    with pytest.raises(PrivacyConfigError) as info:
        _private(
            model,
            _loader_over(batch),
            noise_multiplier=-1.0,
            max_grad_norm=0.0,
            grad_sample_mode="ew",
            loss_reduction="avg",
            max_steps=-2,
            noise_key=b"short",
            sample_rate=1.5,
        )
    message = str(info.value)
    for fragment in (
        "noise_multiplier=-1.0",
        "max_grad_norm=0.0",
        "grad_sample_mode='ew'",
        "loss_reduction='avg'",
        "max_steps=-2",
        "noise_key must be None or 32 bytes, got 5 bytes",
        "sample_rate=1.5",
    ):
        assert fragment in message, fragment
    assert _opacus_traces(model) == []


# ---------------------------------------------------------------------------- randomness, rate

OTHER_KEY = bytes(range(1, 33))


def _linear_model() -> nn.Module:
    """A plain float64 linear layer, 10,050 trainable floats, the same on every call."""
    torch.manual_seed(0)
    return nn.Linear(200, 50, dtype=torch.float64).train()


def _linear_session(
    mode: str, *, num_examples: int = 40, **kwargs: object
) -> tuple[nn.Module, DPSession, torch.Tensor]:
    """``num_examples`` (40: its own q would be 1/3) through a loader of batch_size 16."""
    x = torch.randn(
        num_examples, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    model = _linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    settings: dict[str, object] = {"noise_multiplier": 1.3, "max_grad_norm": 0.7}
    settings.update(kwargs)
    session = make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(x), batch_size=16),
        grad_sample_mode=mode,
        **settings,
    )
    return model, session, x


def _noisy_step(model: nn.Module, session: DPSession, x: torch.Tensor, kind: str) -> torch.Tensor:
    """One step whose clipped gradient sum is zero; returns -Δparameters (= noise / E)."""
    before = [p.detach().clone() for p in model.parameters()]
    if kind == "empty":
        session.backward(torch.empty(0, dtype=torch.float64))
    else:  # a real forward and backward whose per-example gradients are all zero
        session.backward((session.module(x[:6]) * 0.0).sum(dim=1))
    session.optimizer.step()
    session.optimizer.zero_grad()
    return torch.cat(
        [(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)]
    )


@pytest.mark.parametrize("kind", ["empty", "zero-gradient"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", MODES)
def test_noise_has_std_sigma_c_over_the_expected_batch(
    mode: str, reduction: str, kind: str
) -> None:
    model, session, x = _linear_session(
        mode, loss_reduction=reduction, sample_rate=0.25, noise_key=KEY
    )
    assert session.expected_batch_size == 16  # the loader's batch_size, not floor(0.25 * 40)
    noise = torch.cat([_noisy_step(model, session, x, kind) for _ in range(3)]).numpy()
    session.close()
    std = 1.3 * 0.7 / (16 if reduction == "mean" else 1)
    n = noise.size  # 30,150
    assert abs(noise.mean()) < 4 * std / math.sqrt(n)
    assert abs(noise.std() / std - 1) < 4 * math.sqrt(1 / (2 * n))
    assert stats.kstest(noise / std, "norm").pvalue > 1e-3
    assert len(set(noise[:10_050].tolist()) & set(noise[10_050:].tolist())) == 0  # fresh draws


def test_one_key_gives_the_same_noise_in_every_mode() -> None:
    """The noise depends on the key and the parameters' order only, not on the mode."""
    updates = []
    for mode in MODES:
        model, session, x = _linear_session(mode, noise_key=KEY)
        updates.append(_noisy_step(model, session, x, "empty"))
        session.close()
    assert all(torch.equal(updates[0], other) for other in updates[1:])
    model, session, x = _linear_session("hooks", noise_key=OTHER_KEY)
    assert not torch.equal(updates[0], _noisy_step(model, session, x, "empty"))
    session.close()


def test_without_a_key_every_session_draws_fresh_noise() -> None:
    draws = []
    for _ in range(2):
        model, session, x = _linear_session("hooks")
        draws.append(_noisy_step(model, session, x, "empty"))
        session.close()
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("mode", MODES)
def test_same_noise_key_gives_bit_identical_updates(tiny: SimpleNamespace, mode: str) -> None:
    base = tiny.build_bert_classifier(dtype=torch.float32)
    pool = tiny.make_batch("classification", lengths=[4, 6, 8] * 8, seed=5)

    def run(key: bytes, torch_seed: int) -> tuple[dict[str, torch.Tensor], list[object]]:
        model = copy.deepcopy(base)
        torch.manual_seed(torch_seed)  # torch's generators must play no part
        session = _private(
            model,
            _loader_over(pool, batch_size=6),
            grad_sample_mode=mode,
            noise_multiplier=1.0,
            lr=0.05,
            noise_key=key,
        )
        batches = []
        for ids, mask, labels in session.data_loader:  # 4 Poisson batches
            batches.append(ids.tolist())
            if labels.shape[0] == 0:
                session.backward(torch.empty(0))
            else:
                logits = session.module(input_ids=ids, attention_mask=mask).logits
                session.backward(per_example_loss(logits, labels, task="classification"))
            session.optimizer.step()
            session.optimizer.zero_grad()
        session.close()
        return {n: p.detach().clone() for n, p in _trainable(model).items()}, batches

    first, first_batches = run(KEY, 0)
    again, again_batches = run(KEY, 1)
    other, other_batches = run(OTHER_KEY, 0)
    assert again_batches == first_batches and other_batches != first_batches
    for name, value in first.items():
        assert torch.equal(again[name], value), name
    assert all(not torch.equal(other[name], value) for name, value in first.items())


@pytest.mark.parametrize("mode", MODES)
def test_no_draw_comes_from_opacus_torch_generator_paths(
    tiny: SimpleNamespace, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a torch-generator path of Opacus was used")

    monkeypatch.setattr(opacus.optimizers.optimizer, "_generate_noise", refuse)
    monkeypatch.setattr(
        opacus.optimizers.optimizer_fast_gradient_clipping, "_generate_noise", refuse
    )
    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", refuse)
    model, _ = _model_and_batch(tiny, "bert")
    pool = tiny.make_batch("classification", lengths=[4, 6, 8] * 4, seed=5)
    session = _private(
        model, _loader_over(pool, batch_size=4), grad_sample_mode=mode, noise_multiplier=1.0
    )
    for ids, mask, labels in session.data_loader:
        if labels.shape[0] == 0:
            session.backward(torch.empty(0))
        else:
            logits = session.module(input_ids=ids, attention_mask=mask).logits
            session.backward(per_example_loss(logits, labels, task="classification"))
        session.optimizer.step()
        session.optimizer.zero_grad()
    assert session.steps == 3
    session.close()


def test_explicit_sample_rate_gives_batches_of_mean_size_q_n(tiny: SimpleNamespace) -> None:
    model, _ = _model_and_batch(tiny, "bert")
    n, q = 60, 0.15
    pool = tiny.make_batch("classification", lengths=[5] * n, seed=2)
    loader = _loader_over(pool, batch_size=4)  # its own rate would be 1/15
    session = _private(model, loader, sample_rate=q, noise_key=KEY)
    assert session.sample_rate == session.data_loader.sample_rate == q
    assert session.expected_batch_size == 4  # the loader's batch_size, not floor(0.15 * 60)
    assert len(session.data_loader) == 6  # floor(1 / q) batches per pass, as Opacus
    sizes = np.array([len(labels) for _ in range(50) for *_, labels in session.data_loader])
    assert len(sizes) == 300
    assert abs(sizes.mean() - q * n) < 4 * math.sqrt(n * q * (1 - q) / len(sizes))
    session.close()


def test_the_mean_divisor_is_the_batch_size_setting_whatever_n_and_q() -> None:
    """The noise in an update is σ·C/B with B the loader's batch_size at any N and q.

    Opacus divides by int(q·N): its noise scale σ·C/⌊qN⌋ would tell a coordinator holding one
    update the site's N to within 1/q, and a divisor computed from the private N is not
    post-processing of the noisy sum under add/remove adjacency.
    """
    stds = {}
    for n, rate in ((40, 0.25), (640, 0.25), (640, 0.01), (3, 0.1)):
        model, session, x = _linear_session(
            "hooks", num_examples=n, sample_rate=rate, noise_key=KEY
        )
        assert session.expected_batch_size == 16, (n, rate)
        noise = torch.cat([_noisy_step(model, session, x, "empty") for _ in range(3)]).numpy()
        session.close()
        stds[(n, rate)] = float(noise.std())
    # the same key gives the same noise draws: the updates agree to rounding at every N and q
    assert max(stds.values()) / min(stds.values()) - 1 < 1e-9, stds
    assert abs(stds[(40, 0.25)] / (1.3 * 0.7 / 16) - 1) < 4 * math.sqrt(1 / (2 * 30_150))


def test_without_a_rate_q_is_one_over_the_loader_length(tiny: SimpleNamespace) -> None:
    model, _ = _model_and_batch(tiny, "bert")
    # 98 examples in batches of 2: q = 1/49, and 1 / (1 / 49) must give 49 steps, not 48
    pool = tiny.make_batch("classification", lengths=[3] * 98, seed=4)
    session = _private(model, _loader_over(pool, batch_size=2))
    assert (session.sample_rate, session.expected_batch_size) == (1 / 49, 2)
    assert len(session.data_loader) == 49
    session.close()


def test_bad_noise_keys_and_sample_rates_are_refused_by_name(tiny: SimpleNamespace) -> None:
    model, batch = _model_and_batch(tiny, "bert")
    keys = [(b"k" * 16, "16 bytes"), ("k" * 32, "str"), (bytearray(32), "bytearray"), (7, "int")]
    for key, got in keys:
        with pytest.raises(
            PrivacyConfigError, match=f"noise_key must be None or 32 bytes, got {got}"
        ) as info:
            _private(model, _loader_over(batch), noise_key=key)
        assert "kkkk" not in str(info.value)  # the message never echoes a key
    for rate in (0, 0.0, -0.5, 1.0001, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(PrivacyConfigError, match=r"sample_rate=.* must be None .* in \(0, 1\]"):
            _private(model, _loader_over(batch), sample_rate=rate)
    assert _opacus_traces(model) == []


# ---------------------------------------------------------------------------- (f) learning


def _presence_task(n: int, *, seed: int, length: int = 8, signal: int = 7) -> TensorDataset:
    """Label 1 iff the sequence contains the signal token (3 copies at random positions)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 300, (n, length), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    for i in torch.nonzero(labels).flatten().tolist():
        ids[i, torch.randperm(length - 1, generator=g)[:3] + 1] = signal
    ids[:, 0] = 2  # a fixed first token, like [CLS]
    return TensorDataset(ids, torch.ones_like(ids), labels)


def test_dp_training_beats_chance(tiny: SimpleNamespace) -> None:
    torch.manual_seed(0)
    train, test = _presence_task(256, seed=1), _presence_task(256, seed=2)
    model = tiny.build_bert_classifier(dtype=torch.float32, initializer_range=0.2)
    loader = DataLoader(train, batch_size=32)
    sample_rate, steps = poisson_sample_rate(loader), 3 * len(loader)  # 3 epochs, 24 steps
    # sigma from calibrate_noise_multiplier(target_epsilon=8, delta=1e-5, sample_rate=1/8,
    # steps=24) (PRV); fixed here to keep the test fast, checked below.
    sigma = 0.762939453125
    assert 7.5 < compute_epsilon([(sigma, sample_rate, steps)], delta=1e-5) <= 8.0

    def accuracy() -> float:
        ids, mask, labels = test.tensors
        model.eval()
        with torch.no_grad():
            predictions = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        model.train()
        return float((predictions == labels).float().mean())

    assert accuracy() < 0.6
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    session = make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        max_steps=steps,
        # a fixed key: the same sampling and noise every run, so the test does not pass or
        # fail by the draw (a random key gave 0.63 once in three full runs)
        noise_key=bytes(32),
    )
    while session.steps < steps:
        for ids, mask, labels in session.data_loader:
            if session.steps == steps:
                break
            if labels.shape[0] == 0:
                session.backward(torch.empty(0))
            else:
                logits = session.module(input_ids=ids, attention_mask=mask).logits
                session.backward(per_example_loss(logits, labels, task="classification"))
            session.optimizer.step()
            session.optimizer.zero_grad()
    session.close()
    assert session.steps == steps
    assert accuracy() >= 0.8
