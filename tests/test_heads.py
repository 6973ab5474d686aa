"""The mean-pooling classification head (fedpeft.heads) and the model.pooling option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from fedpeft.config import ConfigError, compose_config
from fedpeft.heads import MODEL_TYPE, masked_mean
from fedpeft.model import MODEL_LOADERS, build_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)


def _tiny(pooling: str, *extra: str):  # noqa: ANN202 - a LoadedModel
    config = compose_config(
        ["experiment=tiny_classification", "data.path=x.csv", f"model.pooling={pooling}", *extra]
    )
    loaded = build_model(config.model, config.lora, seed=0)
    loaded.peft_model.eval()
    return loaded


def test_masked_mean_known_answer() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(masked_mean(hidden, mask), torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(masked_mean(hidden, None), torch.tensor([[104 / 3, 106 / 3]]))


def test_logits_read_the_masked_mean_of_the_last_layer() -> None:
    loaded = _tiny("mean")
    model = loaded.peft_model.base_model.model
    ids = torch.randint(5, 200, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        logits = loaded.peft_model(input_ids=ids, attention_mask=mask).logits
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        by_hand = model.classifier(masked_mean(hidden, mask))
        pooler_head = model.classifier(model.bert.pooler(hidden))
    torch.testing.assert_close(logits, by_hand)
    assert not torch.allclose(logits, pooler_head)  # the pooler is not what the head reads


@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_padding_does_not_change_an_examples_logits(pooling: str) -> None:
    loaded = _tiny(pooling)
    ids = torch.randint(5, 200, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        padded = loaded.peft_model(input_ids=ids, attention_mask=mask).logits[0]
        alone = loaded.peft_model(input_ids=ids[:1, :6], attention_mask=mask[:1, :6]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)


def test_merged_model_reloads_through_auto_classes(tmp_path: Path) -> None:
    loaded = _tiny("mean")
    with torch.no_grad():
        for name, p in loaded.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: the merge must carry it
    ids = torch.randint(5, 200, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = loaded.peft_model(input_ids=ids, attention_mask=mask).logits
    merged = loaded.peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.model_type == MODEL_TYPE
    with torch.no_grad():
        got = reloaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_mean_pooling_on_a_non_bert_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model.pooling=mean .*tiny_llama.*model.pooling=model"):
        compose_config(
            [
                "experiment=tiny_classification",
                "model=tiny_llama",
                "model.task=classification",
                "model.pooling=mean",
            ]
        )
    with pytest.raises(ConfigError, match=r"model.pooling='max': allowed \['model', 'mean'\]"):
        compose_config(["experiment=tiny_classification", "model.pooling=max"])


def test_mean_pooling_on_a_local_non_bert_folder_is_a_config_error(tmp_path: Path) -> None:
    llama = compose_config(
        [
            "experiment=tiny_classification",
            "model=tiny_llama",
            "model.task=classification",
            "data.path=x",
        ]
    )
    base, tokenizer = MODEL_LOADERS["tiny_llama"](llama.model)
    folder = tmp_path / "llama"
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = compose_config(
        [
            "experiment=tiny_classification",
            "model=local",
            f"model.path={folder}",
            "model.pooling=mean",
            "data.path=x.csv",
        ]
    )
    with pytest.raises(ConfigError, match=r"needs a BERT-family model, but .* is 'llama'"):
        build_model(config.model, config.lora, seed=0)
