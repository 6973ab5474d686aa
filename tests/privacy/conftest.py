"""Tiny in-process models and reference gradients for the privacy tests.

Models are built from config objects (no network): a 2-layer BERT classifier with hidden size 32
and a 2-layer Llama causal LM with hidden size 32, vocabulary 300, each wrapped with a peft LoRA
adapter on the query/value projections (plus the classifier head via ``modules_to_save`` for
BERT). Dropout is off everywhere so that a batched forward pass and one pass per example compute
the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedpeft.losses import IGNORE_INDEX, per_example_loss

# transformers and peft are imported inside the builders: the other test modules of this
# directory (secure aggregation) do not need them, and they take seconds to import.

VOCAB = 300
PAD = 0


@dataclass
class Batch:
    """A padded batch, and each example unpadded (for one-pass-per-example references)."""

    task: str  # "classification" or "causal_lm"
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask: (B, T)
    labels: torch.Tensor  # (B,) class ids or (B, T) token ids with -100 at padding
    lengths: list[int]

    @property
    def size(self) -> int:
        return len(self.lengths)

    def example(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Example ``i`` alone, with its padding removed."""
        n = self.lengths[i]
        inputs = {k: v[i : i + 1, :n] for k, v in self.inputs.items()}
        labels = (
            self.labels[i : i + 1] if self.task == "classification" else self.labels[i : i + 1, :n]
        )
        return inputs, labels

    def subset(self, index: list[int]) -> Batch:
        return Batch(
            task=self.task,
            inputs={k: v[index] for k, v in self.inputs.items()},
            labels=self.labels[index],
            lengths=[self.lengths[i] for i in index],
        )


def build_bert_classifier(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    use_dora: bool = False,
    target_modules: tuple[str, ...] = ("query", "value"),
    initializer_range: float = 0.02,
    pooling: str = "model",
    bias: str = "none",
) -> nn.Module:
    """Tiny BERT classifier with LoRA on q/v and a trained classifier head, in train mode.

    ``pooling="mean"`` gives :mod:`fedpeft.heads`' mean-pooling head (the embedded default's);
    ``bias="all"`` trains every bias too (peft's LoraConfig.bias; BitFit's tensors).

    ``initializer_range`` is BERT's init std; at the default 0.02 a random 32-wide BERT maps
    every input to nearly the same pooled vector, so learning tests use a larger one.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
        initializer_range=initializer_range,
    )
    if pooling == "mean":
        from fedpeft.heads import BertMeanPoolingForSequenceClassification, mean_pooling_config

        base = BertMeanPoolingForSequenceClassification(mean_pooling_config(config)).to(dtype)
    else:
        base = BertForSequenceClassification(config).to(dtype)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # puts the classifier head in modules_to_save
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        use_dora=use_dora,
        bias=bias,  # type: ignore[arg-type]  # peft's Literal
    )
    model = get_peft_model(base, lora)
    model.train()
    return model


def build_llama_lm(*, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Tiny Llama causal LM with LoRA on q/v, in train mode."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        attn_implementation="eager",
    )
    base = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
    )
    model = get_peft_model(base, lora)
    model.train()
    return model


def perturb_lora_b(model: nn.Module, *, seed: int = 1, scale: float = 0.2) -> None:
    """Move every lora_B away from its zero init, so that lora_A gets a non-zero gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def make_batch(task: str, *, lengths: list[int], seed: int = 0, num_labels: int = 2) -> Batch:
    """Right-padded random batch with the given example lengths."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=generator)
        mask[i, :n] = 1
    if task == "classification":
        labels = torch.randint(0, num_labels, (len(lengths),), generator=generator)
    else:
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return Batch(
        task=task,
        inputs={"input_ids": ids, "attention_mask": mask},
        labels=labels,
        lengths=list(lengths),
    )


def losses_of(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B,) per-example losses of ``batch`` under ``model``."""
    logits = model(**batch.inputs).logits
    return per_example_loss(logits, batch.labels, task=batch.task)  # type: ignore[arg-type]


def reference_grads(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Per-example gradients of every trainable tensor, by one backward pass per *unpadded* example.

    Returns name -> (B, *param.shape).
    """
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    per_example: dict[str, list[torch.Tensor]] = {n: [] for n in trainable}
    for i in range(batch.size):
        inputs, labels = batch.example(i)
        logits = model(**inputs).logits
        loss = per_example_loss(logits, labels, task=batch.task)[0]  # type: ignore[arg-type]
        grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
        for (name, p), g in zip(trainable.items(), grads, strict=True):
            per_example[name].append(torch.zeros_like(p) if g is None else g.detach())
    return {n: torch.stack(gs) for n, gs in per_example.items()}


def clipped_sum(
    reference: dict[str, torch.Tensor], max_grad_norm: float
) -> dict[str, torch.Tensor]:
    """sum_i min(1, C / (||g_i|| + 1e-6)) g_i, Opacus' flat clipping (same 1e-6 guard)."""
    norms = per_example_norms(reference)  # (B,)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # (B,)
    return {n: torch.einsum("i,i...->...", factor, g) for n, g in reference.items()}


def per_example_norms(reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) flat norm of each example's gradient over all trainable tensors."""
    return torch.stack(
        [g.reshape(g.shape[0], -1).norm(dim=1) for g in reference.values()], dim=1
    ).norm(dim=1)


@pytest.fixture
def tiny() -> SimpleNamespace:
    """The helpers of this conftest, as a fixture (test modules do not import conftest)."""
    return SimpleNamespace(
        Batch=Batch,
        VOCAB=VOCAB,
        PAD=PAD,
        build_bert_classifier=build_bert_classifier,
        build_llama_lm=build_llama_lm,
        perturb_lora_b=perturb_lora_b,
        make_batch=make_batch,
        losses_of=losses_of,
        reference_grads=reference_grads,
        clipped_sum=clipped_sum,
        per_example_norms=per_example_norms,
    )
