"""What a site releases in a round: its update or its evaluation, checked, charged, packed.

A site receives the global adapter as one flat float32 array, trains the tensors the
strategy names on its own data, and replies with the *delta* of exactly those tensors,
their names and sizes, and a few figures. Base weights, raw data and per-example
gradients never leave the site. A failure becomes an error reply the server records
(:mod:`fedpeft.client.errors`); the Flower entry that routes messages here is
:mod:`fedpeft.client.app`, and a secure round's masking :mod:`fedpeft.client.secure_aggregation`.

The site's model, data and training code (torch, transformers, peft, Opacus) are imported
when a function first needs them, not with this module: a deployed SuperNode starts a fresh
process per message, and three of the four secure-aggregation stages need none of them.

A round is charged to the site's privacy ledger under the federation id the server sends
(:data:`fedpeft.constants.CFG_FEDERATION_ID`), which stays the same when a crashed server
resumes the federation under a new Flower run id.

What leaves the site, and why nothing else does (README, "What leaves a site"):

- a train reply carries the delta and the public DP parameters (ε spent, ceiling, δ, σ, q,
  steps, clip norm), and what the site's node config chose to publish about its data for the
  model card (``site-description``, ``site-license``, ``site-rows``; nothing when unset).
  Its example count only under plain aggregation (for weighting); the train loss only
  without DP and without secure aggregation (a mean loss over private batches has no bounded
  sensitivity and is not noised); no timing (the server sees when a reply arrives, nothing
  finer);
- an evaluation is made at most once per round the site was charged for, of one adapter
  (the ledger records it); under secure aggregation its figures go only inside a secure sum
  (:data:`fedpeft.constants.TASK_EVALUATE`), never in the clear;
- a plain evaluation of a causal LM carries the global adapter's greedy answers to the
  prompts the site published (node config ``eval-prompts``; :mod:`fedpeft.generate`), and
  nothing when it published none; a secure evaluation never carries a text;
- an error reply carries a fixed code and message (:mod:`fedpeft.client.errors`).

Before anything is charged, the site checks its own rules (:mod:`fedpeft.client.rules`,
:mod:`fedpeft.client.budget`) and, when its node config names ``coordinator-public-key``,
the coordinator's signature of the instruction (:mod:`fedpeft.instructions`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from numpy.typing import NDArray

from fedpeft import constants as K
from fedpeft.client.errors import SiteRefusal
from fedpeft.client.rules import SiteRules, require_privacy, site_declaration, site_rules
from fedpeft.config import FedPeftConfig, as_dict, to_yaml
from fedpeft.instructions import config_digest, verify_content
from fedpeft.privacy.binding import adapter_digest, release_binding, release_key, release_seed

if TYPE_CHECKING:  # imported where used: see the module docstring
    from fedpeft.client.site import Site
    from fedpeft.client.train import EvalResult
    from fedpeft.model import AdapterLayout

_FEDERATION_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def ledger_run_id(msg: Message) -> str:
    """The key of this round's federation in the site's ledger: the server's federation id."""
    value = msg.content.config_records[K.CONFIG].get(K.CFG_FEDERATION_ID, "")
    if not isinstance(value, str) or not _FEDERATION_ID.fullmatch(value):
        raise SiteRefusal(
            K.ERR_BAD_INSTRUCTION,
            f"instruction has {K.CFG_FEDERATION_ID}={value!r}; allowed: 1 to 128 letters, "
            "digits, '.', '_' or '-' (the server and this site run different fedpeft versions)",
        )
    return value


def _round(msg: Message) -> int:
    value = msg.content.config_records[K.CONFIG].get(K.CFG_ROUND)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SiteRefusal(K.ERR_BAD_INSTRUCTION, f"instruction has round={value!r}")
    return value


def verify_instruction(msg: Message, config: FedPeftConfig, rules: SiteRules, task: str) -> None:
    """Refuse (``SignatureError``) an instruction the trusted coordinator did not sign.

    Without ``coordinator-public-key`` in the node config every instruction is accepted.
    """
    if rules.coordinator_key is not None:
        verify_content(
            msg.content,
            rules.coordinator_key,
            task=task,
            config_sha256=config_digest(to_yaml(config)),
        )


def release_settings(site: Site, dp: dict[str, object] | None) -> dict[str, object]:
    """Everything the site's release depends on besides the adapter, names and round: the
    resolved configuration (where files go aside), its DP plan, and its own node settings."""
    config = as_dict(site.config)
    for key in ("output_dir", "experiment_name"):
        config.pop(key, None)
    config["privacy"].pop("ledger_dir", None)  # where the ledger is, not what is released
    return {
        "config": config,
        "dp": dp,
        "site": {
            "name": site.name,
            "rank": site.rank,
            "device": str(site.device),
            "num_train": site.data.num_train,
        },
    }


def _global_flat(msg: Message, site: Site) -> NDArray[np.float32]:
    """The global adapter in ``msg``, rebuilt and checked, cut to this site's LoRA rank.

    The server leaves out LoRA factors still at their shared start (:mod:`fedpeft.broadcast`);
    a message without ``sent-names`` carries the whole adapter.
    """
    from fedpeft.broadcast import Broadcast, decode
    from fedpeft.ranks import slice_to_rank

    values = msg.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy()
    entries = msg.content.config_records[K.CONFIG]
    layout = site.global_layout
    try:
        if K.CFG_SENT_NAMES in entries:
            broadcast = Broadcast(
                values=values,
                sent=tuple(str(n) for n in entries[K.CFG_SENT_NAMES]),  # type: ignore[union-attr]
                derived_digest=str(entries.get(K.CFG_DERIVED_DIGEST, "")),
            )
            flat = decode(broadcast, layout, seed=site.config.seed)
        elif values.dtype != np.float32 or values.shape != (layout.size,):
            raise ValueError(
                f"global adapter has dtype {values.dtype} and shape {values.shape}, but this "
                f"site's model expects float32 ({layout.size},): site and server run different "
                "model or LoRA settings."
            )
        else:
            flat = values
    except ValueError as error:
        raise SiteRefusal(K.ERR_BAD_INSTRUCTION, str(error)) from error
    if not np.isfinite(flat).all():
        raise SiteRefusal(K.ERR_BAD_INSTRUCTION, "the global adapter holds non-finite values")
    return slice_to_rank(flat, layout, site.rank)


@dataclass(frozen=True)
class LocalUpdate:
    """A site's update for one round, before it is packed or masked."""

    delta: NDArray[np.float32]  # laid out as ``layout``
    layout: AdapterLayout | None  # the trained tensors at rank lora.r; None: evaluation figures
    metrics: dict[str, int | float]  # figures reported next to the update
    rank_slots: NDArray[np.float32]  # (lora.r,) 1.0 for the rank slots this site trained, else 0
    # Seeds the stochastic rounding of secure aggregation's quantiser: fixed per release, so a
    # retried round masks the identical quantised vector (fedpeft.privacy.quantize).
    rounding_seed: int = 0
    # What the site chose to publish about its data (node config site-*; empty: nothing).
    declaration: dict[str, str | int] = field(default_factory=dict)


def local_update(msg: Message, site: Site, *, session: str = "") -> LocalUpdate:
    """Train on the site's data as the train instruction ``msg`` asks; return the delta.

    With ``privacy.enabled`` the release is first bound and charged to the site's privacy
    ledger — refused (``BudgetExceededError``, nothing trained) when it would cross the
    site's ceiling — then trained with DP-SGD whose sampling and noise are keyed by the
    site's secret and the binding (:mod:`fedpeft.privacy.binding`): the same instruction
    repeats the same release and is charged once; any change of input is charged again with
    fresh randomness. The digest of the delta is recorded in the ledger before it is sent; a
    retry that comes out different is withheld (``ReleaseMismatchError``).

    ``session`` (secure aggregation) identifies the secure session the update is masked in
    and enters the binding: the same instruction in another session — another group of
    sites, whose sums could be subtracted — is another release, charged again with fresh
    noise. So under secure aggregation a round retried after a server crash is charged again.

    A site of rank ``r_i < lora.r`` trains the leading block of the global factors and pads
    its delta with zeros to the global trained layout (:mod:`fedpeft.ranks`); it reports its
    rank (plain aggregation) and its rank-slot indicator (``rank_slots``, secure aggregation).
    """
    from fedpeft.client.budget import site_budget
    from fedpeft.client.train import train_local
    from fedpeft.ranks import pad_to_rank, rank_indicator

    config = site.config
    instructions = msg.content.config_records[K.CONFIG]
    round_number = _round(msg)
    trained_names = [str(n) for n in instructions[K.CFG_TRAIN_NAMES]]  # type: ignore[union-attr]
    unknown = sorted(set(trained_names) - set(site.global_layout.names))
    if not trained_names or unknown:  # refused before anything is charged
        raise SiteRefusal(
            K.ERR_BAD_INSTRUCTION,
            f"the instruction names {len(unknown)} tensor(s) this site's adapter lacks "
            f"({unknown[:3]})"
            if unknown
            else "the instruction names no tensor to train",
        )
    run_id = ledger_run_id(msg)
    require_privacy(config, site_rules(site.node_config))
    declaration = site_declaration(site.node_config)  # checked before anything is charged
    global_flat = _global_flat(msg, site)
    privacy = None
    if config.privacy.enabled:
        privacy = site_budget(
            config,
            site.node_config,
            site_name=site.name,
            num_train=site.data.num_train,
            run_id=run_id,
        )
    binding = release_binding(
        federation_id=run_id,
        round_number=round_number,
        task=K.TASK_TRAIN,
        adapter_sha256=adapter_digest(global_flat.tobytes()),
        trained_names=trained_names,
        settings={
            **release_settings(site, privacy.settings() if privacy is not None else None),
            "secagg_session": session,
        },
    )
    noise_key = None
    seed = config.seed * 1_000_003 + round_number * 7919 + site.order_key
    if privacy is not None:
        privacy.charge(run_id=run_id, round_number=round_number, binding=binding)
        # Under DP the sampling and noise come from a key only the site can derive, bound to
        # every input of this release (a coordinator can neither predict nor reuse it).
        noise_key = release_key(privacy.secret, binding)
        seed = release_seed(noise_key)
    result = train_local(
        site.loaded,
        site.data.train,
        global_flat=global_flat,
        trained_names=trained_names,
        config=config.train,
        device=site.device,
        seed=seed,
        dp=privacy.dp if privacy is not None else None,
        noise_key=noise_key,
    )
    layout = site.global_layout.subset(lambda n: n in set(trained_names))
    delta = pad_to_rank(result.delta, layout, site.rank)
    if privacy is not None:
        privacy.ledger.attach_release(
            run_id=run_id,
            round=round_number,
            binding=binding,
            release=adapter_digest(delta.tobytes()),
        )
    metrics: dict[str, int | float] = {}
    if not config.secagg.enabled:  # plain aggregation: the server weighs updates by N
        metrics[K.MET_NUM_EXAMPLES] = result.num_examples
        if privacy is None:  # without DP nothing of this reply is protected anyway
            metrics[K.MET_TRAIN_LOSS] = result.train_loss
    if site.rank < config.lora.r:
        metrics[K.MET_LORA_RANK] = site.rank
    if privacy is not None:
        metrics.update(privacy.metrics())
    return LocalUpdate(
        delta=delta,
        layout=layout,
        metrics=metrics,
        rank_slots=rank_indicator(site.rank, config.lora.r),
        rounding_seed=seed,
        declaration=declaration,
    )


@dataclass(frozen=True)
class Evaluation:
    """A site's evaluation of one adapter: its figures, digest, and generated answers."""

    result: EvalResult
    digest: str  # SHA-256 of the evaluated (rank-sliced) adapter
    answers: tuple[str, ...] = ()  # to site.prompts, in order; empty: none generated


def _evaluate(msg: Message, site: Site, *, session: str = "", generate: bool = False) -> Evaluation:
    """Evaluate the instruction's adapter on the held-out split, within the site's bound;
    with ``generate``, also answer the site's published prompts (``site.prompts``) greedily.

    Under DP the site evaluates only a round it was charged for, and once per round
    (recorded in its ledger before evaluating): held-out figures are not DP, so they are
    bounded by the rounds the site trained. What is recorded is the *evaluation binding* —
    the adapter and every setting that shapes the figures — so the same round asked again
    with another adapter *or* other settings (the eval cap, the model's length, …) is refused,
    and an identical retry repeats the identical figures.

    The published prompts enter that binding when answers are generated: prompts come only
    from the site's own node config (or, in a simulation, its held-out split), never from the
    instruction, and their answers are bounded like the figures — once per trained round, of
    one adapter, at ``train.eval_max_new_tokens`` tokens each.
    """
    from fedpeft.client.budget import site_budget
    from fedpeft.client.train import evaluate_local

    round_number = _round(msg)
    run_id = ledger_run_id(msg)
    require_privacy(site.config, site_rules(site.node_config))
    global_flat = _global_flat(msg, site)
    digest = adapter_digest(global_flat.tobytes())
    prompts = site.prompts if generate else ()
    if site.config.privacy.enabled:
        privacy = site_budget(
            site.config,
            site.node_config,
            site_name=site.name,
            num_train=site.data.num_train,
            run_id=run_id,
        )
        evaluation = release_binding(
            federation_id=run_id,
            round_number=round_number,
            task=K.TASK_EVALUATE,
            adapter_sha256=digest,
            trained_names=(),
            # a second secure session for the round is a second evaluation: refused
            settings={
                **release_settings(site, None),
                "secagg_session": session,
                **({"published_prompts": list(prompts)} if prompts else {}),
            },
        )
        privacy.ledger.record_evaluation(run_id=run_id, round=round_number, adapter=evaluation)
    result = evaluate_local(
        site.loaded,
        site.data.test,
        global_flat=global_flat,
        batch_size=site.config.train.eval_batch_size,
        device=site.device,
    )
    answers: tuple[str, ...] = ()
    if prompts:
        from fedpeft.generate import generate_answers

        # evaluate_local left the global adapter set on the site's model, on site.device
        answers = generate_answers(
            site.loaded.peft_model,
            site.loaded.tokenizer,
            prompts,
            max_new_tokens=site.config.train.eval_max_new_tokens,
            max_prompt_tokens=site.config.model.max_length,
        )
    return Evaluation(result=result, digest=digest, answers=answers)


def secure_evaluation(msg: Message, site: Site, *, session: str = "") -> LocalUpdate:
    """The held-out figures as the three elements a secure evaluation sums.

    ``(c · accuracy, c · min(loss, cap) / cap, c)`` with ``c = secagg.clip_range`` and
    ``cap =`` :data:`fedpeft.constants.EVAL_LOSS_CAP`: every element lies in ``[0, c]``, so
    quantisation keeps it, and the server learns only the sums — the mean accuracy and loss
    over the sites that evaluated, and how many did.
    """
    # no generated answers: a text cannot be summed, and in the clear it would be a per-site
    # release beside the secure sum (README, "What leaves a site")
    evaluation = _evaluate(msg, site, session=session)
    result, digest = evaluation.result, evaluation.digest
    c = float(site.config.secagg.clip_range)
    if result.num_examples == 0 or not (
        math.isfinite(result.loss) and math.isfinite(result.accuracy)
    ):
        vector = np.zeros(3, dtype=np.float32)  # nothing to report: counts as not evaluated
    else:
        loss = min(result.loss, K.EVAL_LOSS_CAP) / K.EVAL_LOSS_CAP
        vector = np.array([c * result.accuracy, c * loss, c], dtype=np.float32)
    return LocalUpdate(
        delta=vector,
        layout=None,
        metrics={},
        rank_slots=np.zeros(0, dtype=np.float32),
        rounding_seed=int(digest[:15], 16),
    )


def handle_train(msg: Message, site: Site) -> RecordDict:
    """Train locally and return the delta of the tensors the server asked for (plain
    aggregation only: under secure aggregation a delta leaves the site only masked)."""
    if site.config.secagg.enabled:
        raise SiteRefusal(
            K.ERR_BAD_INSTRUCTION,
            "a plain train message under secure aggregation: the delta would leave the site "
            "in the clear; only the masked stage of a secure round is answered",
        )
    update = local_update(msg, site)
    assert update.layout is not None  # a train update always has one
    content = RecordDict(
        {
            K.ARRAYS: ArrayRecord({K.ARRAY_FLAT: Array(update.delta)}),
            K.LAYOUT: ConfigRecord(
                {
                    K.LAYOUT_NAMES: list(update.layout.names),
                    K.LAYOUT_NUMELS: list(update.layout.numels),
                }
            ),
            K.METRICS: MetricRecord(dict(update.metrics)),
        }
    )
    if update.declaration:  # only what the site's node config chose to publish
        content[K.DECLARATION] = ConfigRecord(dict(update.declaration))
    return content


def handle_evaluate(msg: Message, site: Site) -> RecordDict:
    """Evaluate the global adapter on the site's held-out split (plain aggregation only).

    A site of rank ``r_i < lora.r`` evaluates the adapter's leading rank-``r_i`` block, the
    model it can run. Under secure aggregation per-site figures never leave the site in the
    clear: the server asks for a secure evaluation instead (:func:`secure_evaluation`).
    """
    if site.config.secagg.enabled:
        raise SiteRefusal(
            K.ERR_EVALUATION_REFUSED,
            "a plain evaluate message under secure aggregation: per-site figures would leave "
            "the site in the clear; only a secure evaluation is answered",
        )
    evaluation = _evaluate(msg, site, generate=True)
    result = evaluation.result
    content = RecordDict(
        {
            K.METRICS: MetricRecord(
                {
                    K.MET_NUM_EXAMPLES: result.num_examples,
                    K.MET_EVAL_LOSS: result.loss,
                    K.MET_EVAL_ACCURACY: result.accuracy,
                }
            )
        }
    )
    if evaluation.answers:  # only for prompts the site published (fedpeft.generate)
        content[K.GENERATIONS] = ConfigRecord(
            {K.GEN_PROMPTS: list(site.prompts), K.GEN_ANSWERS: list(evaluation.answers)}
        )
    return content
