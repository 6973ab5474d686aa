"""The opacus#820 guard for chat fine-tuning: a SmolLM2-shaped Llama, response-only labels.

SmolLM2 differs from the Llama of ``test_dp.py`` in grouped-query attention (fewer key/value
heads than query heads, so ``v_proj`` is narrower than ``q_proj``) and tied input/output
embeddings; chat rows score only the assistant's tokens. Per-sample gradients of every LoRA
tensor under Opacus must still equal one backward pass per unpadded example of
:func:`fedpeft.losses.per_example_loss` (the mean over that example's response tokens).
"""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpeft.config import DataConfig
from fedpeft.data import collate, tokenize
from fedpeft.losses import IGNORE_INDEX
from fedpeft.privacy.dp import make_private

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
    [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c?"},
        {"role": "assistant", "content": "dd"},
    ],
    [
        {"role": "user", "content": "tell me a long story please"},
        {"role": "assistant", "content": "no"},
    ],
]


def _chat_batch(tiny: SimpleNamespace) -> tuple[object, int]:
    from fedpeft.model import _byte_tokenizer

    tokenizer = _byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = TEMPLATE
    items = tokenize(
        datasets.Dataset.from_list([{"messages": c} for c in CHATS]),
        tokenizer,
        config=DataConfig(),
        task="causal_lm",
        max_length=64,
    )
    ids, mask, labels = collate(list(items), pad_id=int(tokenizer.pad_token_id))
    batch = tiny.Batch(
        task="causal_lm",
        inputs={"input_ids": ids, "attention_mask": mask},
        labels=labels,
        lengths=[len(item[0]) for item in items],
    )
    return batch, len(tokenizer)


def _smollm2_like(vocab: int) -> nn.Module:
    """2 Llama blocks with SmolLM2's shape ratios: 3:1 query to key/value heads, tied
    embeddings; float64, LoRA r=4 on q_proj/v_proj (lora.llama's targets)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        attn_implementation="eager",
    )
    base = LlamaForCausalLM(config).to(torch.float64)
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


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_grads_of_a_gqa_llama_on_chat_rows(tiny: SimpleNamespace, mode: str) -> None:
    batch, vocab = _chat_batch(tiny)
    # the masks are what the test is about: prompt and padding unscored, some tokens scored
    assert ((batch.labels != IGNORE_INDEX).sum(dim=1) > 0).all()
    assert ((batch.labels == IGNORE_INDEX) & (batch.inputs["attention_mask"] == 1)).any()
    model = _smollm2_like(vocab)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    v = model.base_model.model.model.layers[0].self_attn.v_proj
    assert q.lora_B["default"].weight.shape[0] == 3 * v.lora_B["default"].weight.shape[0]
    tiny.perturb_lora_b(model, seed=1)
    reference = tiny.reference_grads(model, batch)
    assert any("lora_A" in n and g.abs().max() > 0 for n, g in reference.items())

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(reference) and all(".lora_" in n for n in trainable)
    dataset = TensorDataset(batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.labels)
    session = make_private(
        module=model,
        optimizer=torch.optim.SGD(list(trainable.values()), lr=1.0),
        data_loader=DataLoader(dataset, batch_size=len(dataset)),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
    )
    session.backward(tiny.losses_of(session.module, batch))
    for name, p in trainable.items():
        assert p.grad_sample.shape == (batch.size, *p.shape), name
        # RMSNorm computes in float32 even in a float64 model: ~1e-7 relative
        torch.testing.assert_close(
            p.grad_sample,
            reference[name],
            rtol=1e-5,
            atol=1e-6 * float(reference[name].abs().max()),
            msg=lambda m, n=name: f"{n}: {m}",
        )
    session.close()
