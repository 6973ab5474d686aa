"""Generated answers: the prompts a site publishes, greedy generation, and ``fedpeft generate``.

This module owns three things:

- *which prompts a site publishes* (:func:`published_prompts`): a deployed site only those in
  the file its node config ``eval-prompts`` names; a simulation partition the prompts of its
  first ``data.eval_prompts`` held-out examples. Nothing the coordinator sends adds a prompt:
  a generated text is a release about the site's data, so the site alone chooses it;
- *greedy generation* (:func:`generate_answers`) with a model in memory, on the model's
  device, prompts formatted by :func:`fedpeft.data.prompt_ids` exactly as training formats
  them (the chat template when the tokenizer has one);
- *a folder's model for a quick look* (:func:`load_folder`, :func:`answer`): an export of
  ``fedpeft export`` (adapter + ``base/``, or ``--merge``) or a run directory, loaded with
  plain ``transformers`` + ``peft``.

When a site generates (once per round it trained, bound like its evaluation figures, and
never under secure aggregation) is :mod:`fedpeft.client.release`'s business; what the server keeps
(``RUN_DIR/generations.jsonl``) is :mod:`fedpeft.server.rundir`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft import constants as K
from fedpeft.config import ConfigError, FedPeftConfig

if TYPE_CHECKING:  # imported where used: the ClientApp loads this module per message
    import datasets
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "GENERATIONS_FILE",
    "answer",
    "generate_answers",
    "load_folder",
    "published_prompts",
    "read_prompts",
]

GENERATIONS_FILE = "generations.jsonl"  # RUN_DIR/generations.jsonl: round, site, prompt, answer


def _check(prompts: Sequence[str], *, source: str, fix: str) -> tuple[str, ...]:
    problems = []
    if len(prompts) > K.EVAL_PROMPTS_MAX:
        problems.append(f"{len(prompts)} prompts; allowed at most {K.EVAL_PROMPTS_MAX}")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            problems.append(f"prompt {i + 1} is empty")
        elif len(prompt) > K.EVAL_PROMPT_CHARS_MAX:
            problems.append(
                f"prompt {i + 1} has {len(prompt)} characters; allowed at most "
                f"{K.EVAL_PROMPT_CHARS_MAX}"
            )
    if problems:
        raise ConfigError(f"{source}: {'; '.join(problems)}. {fix}")
    return tuple(prompts)


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """The prompts in ``path``: ``.txt`` one a line (blank lines skipped), or ``.jsonl`` with
    one JSON string or ``{"prompt": "…"}`` object a line.

    Raises
    ------
    ConfigError
        For a missing or unreadable file, another suffix, more than
        :data:`~fedpeft.constants.EVAL_PROMPTS_MAX` prompts, an empty one, or one longer than
        :data:`~fedpeft.constants.EVAL_PROMPT_CHARS_MAX` characters.
    """
    file = Path(path).expanduser()
    source = f"node config {K.NODE_EVAL_PROMPTS}={str(path)!r}"
    fix = (
        f"Give a .txt (one prompt a line) or .jsonl file of 1 to {K.EVAL_PROMPTS_MAX} prompts, "
        f"or remove {K.NODE_EVAL_PROMPTS} to publish none."
    )
    if file.suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"{source} has suffix {file.suffix!r}; allowed: .txt, .jsonl. {fix}")
    try:
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{source} cannot be read ({err}). {fix}") from None
    if file.suffix == ".txt":
        return _check(lines, source=source, fix=fix)
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}: line {number} is not JSON ({err}). {fix}") from None
        if isinstance(value, dict):
            value = value.get("prompt")
        if not isinstance(value, str):
            raise ConfigError(
                f'{source}: line {number} is neither a JSON string nor {{"prompt": "…"}}. {fix}'
            )
        prompts.append(value)
    return _check(prompts, source=source, fix=fix)


def published_prompts(
    config: FedPeftConfig,
    node_config: Mapping[str, object],
    held_out: datasets.Dataset,
) -> tuple[str, ...]:
    """The prompts this site publishes for generated answers (empty: it generates nothing).

    A deployed site (no ``partition-id``) publishes the file its node config
    ``eval-prompts`` names; the run's ``data.eval_prompts`` does not reach it. A simulation
    partition publishes that file too when set, else the prompts of its first
    ``data.eval_prompts`` held-out examples. A classification run publishes nothing.
    """
    if config.model.task != "causal_lm":
        return ()
    path = node_config.get(K.NODE_EVAL_PROMPTS)
    if path:
        return read_prompts(str(path))
    if K.NODE_PARTITION_ID not in node_config or config.data.eval_prompts == 0:
        return ()
    count = min(config.data.eval_prompts, len(held_out))
    column = held_out.select(range(count))[config.data.prompt_column]
    prompts = [str(p)[: K.EVAL_PROMPT_CHARS_MAX] for p in column]
    return tuple(p for p in prompts if p.strip())


def generate_answers(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    max_prompt_tokens: int | None = None,
) -> tuple[str, ...]:
    """Greedy answers of ``model`` (on its own device) to ``prompts``, special tokens dropped.

    Each prompt runs alone (no padding, so an answer does not depend on the others) through
    ``generate(do_sample=False, num_beams=1)``; the model's own generation settings (e.g. a
    repetition penalty) apply as they do for anyone who calls ``generate`` on the export.
    ``max_prompt_tokens`` keeps the last tokens of a longer prompt (the site's
    ``model.max_length``, what it trained on). The forward runs in the model's dtype, without
    autocast, so the answers are those a user of the exported (float32) model gets.
    """
    import torch

    from fedpeft.data import prompt_ids

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    try:
        for prompt in prompts:
            ids = prompt_ids(tokenizer, prompt)
            if max_prompt_tokens is not None:
                ids = ids[-max_prompt_tokens:]
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, L)
            with torch.no_grad():
                # PeftModel forwards generate to the base model (stubs do not say so)
                out = model.generate(  # type: ignore[operator]
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = out[0, len(ids) :]  # (T,) the answer after the prompt
            answers.append(str(tokenizer.decode(new_tokens, skip_special_tokens=True)))
    finally:
        model.train(was_training)
    return tuple(answers)


def _folders(folder: Path) -> tuple[Path, Path | None]:
    """``(base or merged model folder, adapter folder or None)`` of ``folder``."""
    if (folder / "config.yaml").is_file() and (folder / "adapter").is_dir():
        return folder / "base", folder / "adapter"  # a run directory
    if (folder / "adapter_config.json").is_file():
        for base in (folder / "base", folder.parent / "base"):  # an export; RUN_DIR/adapter
            if (base / "config.json").is_file():
                return base, folder
        raise ConfigError(
            f"{folder} holds an adapter but no base model beside it (base/ or ../base); give "
            "the folder 'fedpeft export' wrote, or the run directory"
        )
    if (folder / "config.json").is_file():
        return folder, None  # 'fedpeft export --merge'
    raise ConfigError(
        f"{folder} is neither a 'fedpeft export' folder (adapter + base/, or --merge) nor a "
        "run directory; export the run with 'fedpeft export RUN_DIR --out DIR' first"
    )


def load_folder(
    folder: str | Path, *, device: str = "cpu"
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """The causal LM in ``folder`` and its tokenizer, loaded with plain transformers + peft.

    Raises
    ------
    ConfigError
        If ``folder`` is not an export or run directory, or its model is not a causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fedpeft.model import resolve_device

    base, adapter = _folders(Path(folder).expanduser())
    architectures = AutoConfig.from_pretrained(str(base)).architectures or []
    if not any(name.endswith("ForCausalLM") for name in architectures):
        raise ConfigError(
            f"{base} holds {architectures or 'an unnamed architecture'}; generate needs a "
            "causal LM (a run with model.task=causal_lm)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(str(base))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.to(resolve_device(device)).eval()
    return model, tokenizer  # type: ignore[return-value]  # a causal LM, checked above


def answer(
    folder: str | Path, prompt: str, *, max_new_tokens: int = 64, device: str = "cpu"
) -> str:
    """The greedy answer of the model in ``folder`` (:func:`load_folder`) to ``prompt``."""
    if not 1 <= max_new_tokens <= K.MAX_NEW_TOKENS_MAX:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: allowed 1 to {K.MAX_NEW_TOKENS_MAX}")
    model, tokenizer = load_folder(folder, device=device)
    (text,) = generate_answers(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)
    return text
