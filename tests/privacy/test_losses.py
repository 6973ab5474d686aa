"""Per-example losses: each example's loss depends on that example alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.losses import IGNORE_INDEX, batch_loss, per_example_loss

pytestmark = [
    # transformers 5.23 deprecation hit by peft 0.21's get_peft_model.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

V = 11  # vocabulary of the synthetic logits


def _example(length: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (length, V) and labels (length,) for one unpadded example."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(length, V, generator=g, dtype=torch.float64),
        torch.randint(0, V, (length,), generator=g),
    )


def _pad_batch(
    examples: list[tuple[torch.Tensor, torch.Tensor]], width: int, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad examples to ``width`` with random logits and -100 labels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(examples), width, V, generator=g, dtype=torch.float64)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    for i, (lg, lb) in enumerate(examples):
        logits[i, : lg.shape[0]] = lg
        labels[i, : lb.shape[0]] = lb
    return logits, labels


def test_classification_is_cross_entropy_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=g)
    labels = torch.tensor([0, 2, 1, 1, 0])
    losses = per_example_loss(logits, labels, task="classification")
    assert losses.shape == (5,)
    for i in range(5):
        torch.testing.assert_close(losses[i], F.cross_entropy(logits[i : i + 1], labels[i : i + 1]))


def test_causal_lm_is_the_mean_over_the_examples_own_shifted_tokens() -> None:
    logits, labels = _example(6, seed=1)
    labels[4] = IGNORE_INDEX  # e.g. a prompt token: not predicted
    losses = per_example_loss(logits[None], labels[None], task="causal_lm")
    log_probs = torch.log_softmax(logits, dim=-1)
    # position t predicts token t+1; targets are labels[1:], one of them ignored
    terms = [-log_probs[t, labels[t + 1]] for t in range(5) if labels[t + 1] != IGNORE_INDEX]
    torch.testing.assert_close(losses[0], torch.stack(terms).mean())


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=2, max_value=7), min_size=1, max_size=4),
    extra=st.integers(min_value=0, max_value=5),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_causal_lm_loss_ignores_padding_and_the_other_examples(
    lengths: list[int], extra: int, seed: int
) -> None:
    examples = [_example(n, seed=seed + i) for i, n in enumerate(lengths)]
    logits, labels = _pad_batch(examples, max(lengths) + extra, seed=seed)
    batched = per_example_loss(logits, labels, task="causal_lm")
    for i, (lg, lb) in enumerate(examples):
        alone = per_example_loss(lg[None], lb[None], task="causal_lm")[0]
        torch.testing.assert_close(batched[i], alone, rtol=1e-12, atol=1e-12)


def test_causal_lm_gradient_of_one_example_touches_only_its_valid_positions() -> None:
    examples = [_example(4, seed=0), _example(7, seed=1)]
    logits, labels = _pad_batch(examples, 9, seed=2)
    logits.requires_grad_(True)
    per_example_loss(logits, labels, task="causal_lm")[0].backward()
    grad = logits.grad
    assert grad is not None
    assert grad[1].abs().max() == 0  # the other example
    assert grad[0, 3:].abs().max() == 0  # the last real token predicts nothing; then padding
    assert (grad[0, :3].abs().sum(-1) > 0).all()


def test_example_without_valid_tokens_contributes_zero() -> None:
    examples = [_example(5, seed=3), _example(2, seed=4)]
    logits, labels = _pad_batch(examples, 6, seed=5)
    labels[1, :] = IGNORE_INDEX  # nothing to predict in example 1
    logits.requires_grad_(True)
    losses = per_example_loss(logits, labels, task="causal_lm")
    assert losses[1] == 0
    assert torch.isfinite(losses).all()
    losses[1].backward()
    assert logits.grad is not None and logits.grad.abs().max() == 0


def test_batch_mean_of_token_losses_would_weight_examples_by_length() -> None:
    """Why this module exists: HF's loss is a token mean over the batch, not a mean of examples."""
    examples = [_example(3, seed=6), _example(8, seed=7)]
    logits, labels = _pad_batch(examples, 8, seed=8)
    per_example = per_example_loss(logits, labels, task="causal_lm")
    token_mean = F.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert not torch.allclose(per_example.mean(), token_mean)


def test_tiny_llama_example_loss_does_not_depend_on_padding_or_batch(tiny: SimpleNamespace) -> None:
    model = tiny.build_llama_lm()
    tiny.perturb_lora_b(model)
    model.eval()
    batch = tiny.make_batch("causal_lm", lengths=[3, 9, 5], seed=4)
    wider = tiny.make_batch("causal_lm", lengths=[3, 9, 5, 12], seed=4)
    with torch.no_grad():
        batched = tiny.losses_of(model, batch)
        in_wider = tiny.losses_of(model, wider)[:3]
        for i in range(batch.size):
            inputs, labels = batch.example(i)
            alone = per_example_loss(model(**inputs).logits, labels, task="causal_lm")[0]
            torch.testing.assert_close(batched[i], alone, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(in_wider[i], alone, rtol=1e-12, atol=1e-12)


def test_half_precision_logits_are_upcast() -> None:
    logits, labels = _example(4, seed=9)
    losses = per_example_loss(logits[None].to(torch.bfloat16), labels[None], task="causal_lm")
    assert losses.dtype == torch.float32


def test_batch_loss_reductions() -> None:
    losses = torch.tensor([1.0, 2.0, 6.0])
    assert batch_loss(losses, "mean") == 3.0
    assert batch_loss(losses, "sum") == 9.0
    assert batch_loss(torch.empty(0), "mean") == 0.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: per_example_loss(
                torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), task="regression"
            ),
            "task='regression'",
        ),
        (
            lambda: per_example_loss(
                torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), task="classification"
            ),
            r"\(B, C\)",
        ),
        (
            lambda: per_example_loss(
                torch.zeros(2, 4, V), torch.zeros(2, 5, dtype=torch.long), task="causal_lm"
            ),
            r"\(B, T, V\)",
        ),
        (
            lambda: per_example_loss(
                torch.zeros(2, 1, V), torch.zeros(2, 1, dtype=torch.long), task="causal_lm"
            ),
            "at least 2 tokens",
        ),
        (lambda: batch_loss(torch.zeros(2, 2), "mean"), r"shape \(B,\)"),
        (lambda: batch_loss(torch.zeros(2), "avg"), "reduction='avg'"),  # type: ignore[arg-type]
    ],
)
def test_bad_input_is_named(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]
