"""A mean-pooling sequence classifier for BERT-family sentence encoders.

Hugging Face's ``BertForSequenceClassification`` classifies the *pooler* output: a pretrained
tanh layer on the first token. Sentence encoders such as all-MiniLM-L6-v2 (the embedded
default) were trained to be read by a masked *mean* over all tokens instead, and their pooler
is nearly constant: on Rotten Tomatoes its outputs vary by 0.70 (mean distance to their
centre) around a centre of norm 1.04, against 3.42 around 1.73 for the mean of the tokens. A
linear head on the pooler barely moves under label-skewed federated training, while one on
the mean learns in a round (``benchmarks/README.md``).

:class:`BertMeanPoolingForSequenceClassification` is ``BertForSequenceClassification`` with
the mean as the head's input; its parameters and names are BERT's (``bert.*``,
``classifier.*``), so peft adapters and Opacus treat it like the original. Its config has
its own ``model_type`` (:data:`MODEL_TYPE`), registered with ``transformers``' Auto classes
when this module is imported: a merged export reloads with
``AutoModelForSequenceClassification.from_pretrained`` after ``import fedpeft.heads``, and
fails loudly (unknown model type) rather than silently falling back to the pooler head.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)
from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = [
    "MODEL_TYPE",
    "BertMeanPoolingConfig",
    "BertMeanPoolingForSequenceClassification",
    "masked_mean",
]

MODEL_TYPE = "fedpeft-bert-mean-pooling"


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, H) over the positions where ``attention_mask`` (B, T) is 1."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    # clamp: an all-padding row (never produced by the collate) divides by 1, not 0
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class BertMeanPoolingConfig(BertConfig):
    """``BertConfig`` under its own model type, so Auto classes pick the mean-pooling head."""

    model_type = MODEL_TYPE


class BertMeanPoolingForSequenceClassification(BertForSequenceClassification):
    """``BertForSequenceClassification`` whose head reads the masked mean of the last layer."""

    config_class = BertMeanPoolingConfig

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        outputs = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            **kwargs,
        )
        pooled = masked_mean(outputs.last_hidden_state, attention_mask)  # (B, H)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def mean_pooling_config(config: BertConfig) -> BertMeanPoolingConfig:
    """The same BERT settings under :data:`MODEL_TYPE`."""
    values = config.to_dict()
    values.pop("model_type", None)
    values["architectures"] = [BertMeanPoolingForSequenceClassification.__name__]
    return BertMeanPoolingConfig(**values)


AutoConfig.register(MODEL_TYPE, BertMeanPoolingConfig, exist_ok=True)
AutoModelForSequenceClassification.register(
    BertMeanPoolingConfig, BertMeanPoolingForSequenceClassification, exist_ok=True
)
