"""The mean-pooling BERT sequence classifier, as a file that stands alone.

This file imports only ``torch`` and ``transformers``, never ``fedpeft``: it is copied
verbatim beside every base model and merged model fedpeft writes (``modeling_fedpeft.py``,
named by the folder's ``config.json`` ``auto_map``), so that plain ``transformers`` loads
them with ``trust_remote_code=True`` and runs exactly this head. It is the single source of
the head's code; :mod:`fedpeft.heads` imports it from here and registers it with the Auto
classes for fedpeft's own processes.

``BertForSequenceClassification`` classifies the *pooler* output (a tanh layer on the first
token); :class:`BertMeanPoolingForSequenceClassification` classifies the masked mean of the
last layer instead, as sentence encoders such as all-MiniLM-L6-v2 are trained to be read. Its
parameters and names are BERT's (``bert.*``, ``classifier.*``). Its config has its own
``model_type`` (:data:`MODEL_TYPE`), so a loader that does not know the head fails loudly
(unknown model type, or "pass ``trust_remote_code=True``") rather than silently falling back
to the pooler head.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification
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

    def forward(
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
