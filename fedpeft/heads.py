"""A mean-pooling sequence classifier for BERT-family sentence encoders.

Hugging Face's ``BertForSequenceClassification`` classifies the *pooler* output: a pretrained
tanh layer on the first token. Sentence encoders such as all-MiniLM-L6-v2 (the embedded
default) were trained to be read by a masked *mean* over all tokens instead, and their pooler
is nearly constant: on Rotten Tomatoes its outputs vary by 0.70 (mean distance to their
centre) around a centre of norm 1.04, against 3.42 around 1.73 for the mean of the tokens. A
linear head on the pooler barely moves under label-skewed federated training, while one on
the mean learns in a round (``benchmarks/README.md``).

The head's code lives in :mod:`fedpeft.modeling_fedpeft`, a file that imports only torch and
transformers and is copied beside every saved model (see there). This module registers it:

- with ``transformers``' Auto classes, so fedpeft's own processes load a mean-pooling folder
  with ``AutoModelForSequenceClassification.from_pretrained`` after ``import fedpeft.heads``;
- with ``register_for_auto_class``, so every ``save_pretrained`` of the model or its config
  copies ``modeling_fedpeft.py`` into the folder and names it in ``config.json``'s
  ``auto_map``: plain ``transformers`` (no fedpeft) then loads that folder with
  ``trust_remote_code=True`` and refuses it, saying to pass that, without.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig

from fedpeft.modeling_fedpeft import (
    MODEL_TYPE,
    BertMeanPoolingConfig,
    BertMeanPoolingForSequenceClassification,
    masked_mean,
)

__all__ = [
    "MODEL_TYPE",
    "BertMeanPoolingConfig",
    "BertMeanPoolingForSequenceClassification",
    "masked_mean",
    "mean_pooling_config",
]


def mean_pooling_config(config: BertConfig) -> BertMeanPoolingConfig:
    """The same BERT settings under :data:`MODEL_TYPE`."""
    values = config.to_dict()
    values.pop("model_type", None)
    values.pop("auto_map", None)  # set again by save_pretrained (register_for_auto_class)
    values["architectures"] = [BertMeanPoolingForSequenceClassification.__name__]
    return BertMeanPoolingConfig(**values)


AutoConfig.register(MODEL_TYPE, BertMeanPoolingConfig, exist_ok=True)
AutoModelForSequenceClassification.register(
    BertMeanPoolingConfig, BertMeanPoolingForSequenceClassification, exist_ok=True
)
# unannotated in transformers; called on our subclasses, so untyped_calls_exclude misses them
BertMeanPoolingConfig.register_for_auto_class("AutoConfig")  # type: ignore[no-untyped-call]
BertMeanPoolingForSequenceClassification.register_for_auto_class(  # type: ignore[no-untyped-call]
    "AutoModelForSequenceClassification"
)
