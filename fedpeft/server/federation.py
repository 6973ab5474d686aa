"""The coordinator's round loop: one federation's state and the steps of a round.

Each round it samples sites, sends them the global adapter (one flat float32 array),
validates their replies, aggregates the accepted deltas with the configured strategy,
asks sites to evaluate the new adapter on their held-out data, and writes the run
directory (metrics, PEFT adapter, checkpoint). Sites that fail or send bad updates are
logged and recorded; the round goes on without them.

A federation has an id of its own, made at its first start and kept in ``federation.json``
and every checkpoint; it travels with every train instruction and is the key sites charge
their privacy ledgers under. A restarted ServerApp continues it after its latest checkpoint
(:mod:`fedpeft.server.resume`), so a round that was under way at the crash is trained again
from the same checkpoint and charged once.

Evaluation asks only the sites that trained in the round (a site evaluates nothing else, see
:mod:`fedpeft.client.release`); under secure aggregation it is a secure sum of their figures.
With a coordinator key every train and evaluate instruction is signed, so sites that trust
only that coordinator can tell its instructions from anyone else's.

The loop is fedpeft's own rather than ``flwr.serverapp.strategy.Strategy.start`` because
a round here has more exchanges than one train and one evaluate (secure aggregation)
and must checkpoint after every round; it uses Flower's ``Grid`` for all messaging.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.serverapp import Grid

from fedpeft import constants as K
from fedpeft.broadcast import Broadcast, encode
from fedpeft.config import ConfigError, FedPeftConfig, to_yaml
from fedpeft.export import BASE_DIR, describe_adapter, write_base
from fedpeft.instructions import Signer, config_digest
from fedpeft.lineage import adapter_sha256
from fedpeft.model import (
    AdapterLayout,
    LoadedModel,
    build_model,
    get_flat,
    save_adapter,
    scheduled,
)
from fedpeft.report import write_report
from fedpeft.server.aggregation import (
    Aggregation,
    EvalOutcome,
    EvalRequest,
    PlainAggregation,
    RoundOutcome,
    RoundRequest,
)
from fedpeft.server.privacy_report import PrivacyReport
from fedpeft.server.progress import Progress
from fedpeft.server.resume import resume_point
from fedpeft.server.rounds import RoundRecord
from fedpeft.server.rundir import ABORTED_FILE, FEDERATION_FILE, Checkpoint, RunDir
from fedpeft.server.secure_aggregation import SecureAggregation
from fedpeft.server.strategies import Strategy, make_strategy, widen
from fedpeft.server.trail import CoordinatorTrail

logger = logging.getLogger(__name__)

NODE_WAIT_POLL_S = 1.0


class FederationAborted(RuntimeError):
    """The federation cannot go on (too few sites, or none that can train); says why."""


#: Error codes by which a site refuses for a reason that repeats identically every round
#: (its node config, its rules, its budget): a round in which every connected site's latest
#: answer was one of these cannot be followed by a better one. A failure (``site-failed``,
#: ``protocol-error``, a timeout, a rejected update) may be transient and never counts.
STANDING_REFUSALS = frozenset(
    {
        K.ERR_BUDGET,
        K.ERR_LEDGER_REQUIRED,
        K.ERR_CEILING_REQUIRED,
        K.ERR_DP_REQUIRED,
        K.ERR_DELTA,
        K.ERR_DELTA_REQUIRED,
        K.ERR_SECAGG_REQUIRED,
        K.ERR_SIGNATURE,
        K.ERR_SITE_CONFIG,
    }
)


def wait_for_nodes(grid: Grid, *, minimum: int, timeout: float) -> list[int]:
    """Connected node ids, once at least ``minimum`` are connected (or raise after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise FederationAborted(
                f"only {len(nodes)} site(s) connected after {timeout:.0f} s; "
                f"federation.min_sites={minimum}"
            )
        time.sleep(NODE_WAIT_POLL_S)


def sample_nodes(
    rng: np.random.Generator, nodes: Sequence[int], *, fraction: float, minimum: int
) -> list[int]:
    """``max(ceil(fraction · n), minimum)`` distinct nodes, capped at n."""
    count = min(len(nodes), max(math.ceil(fraction * len(nodes)), minimum))
    # Sample positions, not ids: node ids are 64-bit unsigned and must stay Python ints.
    picks = rng.choice(len(nodes), size=count, replace=False)
    return sorted(int(nodes[int(i)]) for i in picks)


class Federation:
    """State of one federation on the server and the steps of a round."""

    def __init__(
        self,
        grid: Grid,
        config: FedPeftConfig,
        run_dir: RunDir,
        progress: Progress,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        transport: dict[str, str] | None = None,
    ) -> None:
        self.grid = grid
        self.config = config
        self.run_dir = run_dir
        self.progress = progress
        # The server's copy of the model only lays out, initialises and saves the adapter.
        self.loaded: LoadedModel = build_model(
            config.model, config.lora, seed=config.seed, device=torch.device("cpu")
        )
        self.strategy: Strategy = make_strategy(config.strategy, self.loaded.layout)
        self.global_flat = get_flat(self.loaded.peft_model, self.loaded.layout)
        self.rng = np.random.default_rng(config.seed)
        self.aggregation: Aggregation = (
            SecureAggregation(config.secagg) if config.secagg.enabled else PlainAggregation()
        )
        self.privacy = PrivacyReport(config)
        self.next_round = 1
        self.federation_id = uuid.uuid4().hex
        self.signer = (
            Signer(signing_key, config_digest(to_yaml(config))) if signing_key is not None else None
        )
        # how messages travel, for the report: TLS and node authentication as configured
        self.transport = {**(transport or {}), "signed": "yes" if self.signer else "no"}
        self.audit_head: dict[str, Any] | None = None  # audit.jsonl's last line, checkpointed
        self.refusing: dict[str, str] = {}  # node id → its latest train answer, a refusal

    def note_answers(self, failures: Mapping[str, str], contributors: Sequence[int]) -> None:
        """Track each sampled node's latest train answer: a standing refusal or not."""
        for node in contributors:
            self.refusing.pop(str(node), None)
        for failed, reason in failures.items():
            if reason.split(":", 1)[0] in STANDING_REFUSALS:
                self.refusing[failed] = reason
            else:  # a failure that may pass: this node may train next round
                self.refusing.pop(failed, None)

    def none_can_train(self, nodes: Sequence[int], contributors: Sequence[int]) -> str | None:
        """Why no site can train, or None.

        The rule: a round without a single usable update in which *every connected* site's
        latest train answer was a standing refusal (:data:`STANDING_REFUSALS`). One
        transient failure, a timeout, or a site not sampled yet keeps the federation going;
        budgets that ran out after rounds that trained end it normally, not as an abort.
        """
        if contributors or not nodes or not all(str(n) in self.refusing for n in nodes):
            return None
        codes = {self.refusing[str(n)].split(":", 1)[0] for n in nodes}
        if codes == {K.ERR_BUDGET} and any(r.updated for r in self.run_dir.read_rounds()):
            # the budgets were spent on rounds that trained: the federation's normal end
            # ("no site left with privacy budget"), not a federation that could never train
            return None
        reasons: dict[str, list[str]] = {}
        for node in nodes:
            reasons.setdefault(self.refusing[str(node)], []).append(str(node))
        listed = "; ".join(f"{len(ids)} site(s): {reason}" for reason, ids in reasons.items())
        return f"no site can train: every connected site refused ({listed})"

    def abort(self, round_number: int, reason: str) -> None:
        """Record why the federation ends (``aborted.json``) and raise FederationAborted."""
        self.run_dir.write_json(
            ABORTED_FILE,
            {"round": round_number, "reason": reason, "refusals": dict(self.refusing)},
        )
        self.progress.message(f"federation ended at round {round_number}: {reason}")
        raise FederationAborted(reason)

    # --- checkpoints ---------------------------------------------------------------------
    def checkpoint(self, round_number: int) -> None:
        state = {
            "strategy": self.strategy.state_dict(),
            "rng": self.rng.bit_generator.state,
            "privacy": self.privacy.state_dict(),
            "federation_id": self.federation_id,
            "audit_head": self.audit_head,
        }
        self.run_dir.save_checkpoint(Checkpoint(round_number, self.global_flat, state))

    def resume(self) -> None:
        """Continue the federation of ``run_dir`` after its latest checkpoint.

        Raises
        ------
        ConfigError
            As :func:`fedpeft.server.resume.resume_point` does: not a run directory, another
            configuration, or a checkpoint of another model or federation.
        """
        point = resume_point(self.run_dir, self.config, adapter_size=self.global_flat.size)
        self.federation_id = point.federation_id
        checkpoint = point.checkpoint
        if checkpoint is None:
            logger.info("resuming %s: no finished round, starting at round 1", self.run_dir.path)
            return
        self.global_flat = checkpoint.global_flat
        self.strategy.load_state_dict(checkpoint.state["strategy"])
        self.rng.bit_generator.state = checkpoint.state["rng"]
        self.privacy.load_state_dict(checkpoint.state["privacy"])
        self.next_round = checkpoint.round + 1
        logger.info("resuming %s after round %d", self.run_dir.path, checkpoint.round)

    def write_round(self, figures: dict[str, Any]) -> RoundRecord:
        """Write a finished round: adapter, its metrics line, privacy.json, model card.

        The adapter is saved to a temporary folder first so that its hash goes into the
        round's record, and the model card (which reads that record) is written beside it
        before the folder replaces ``adapter/``: card and adapter change together.
        """
        tmp = self.run_dir.adapter_writer()
        save_adapter(self.loaded, self.global_flat, tmp)
        record = RoundRecord(**figures, adapter_sha256=adapter_sha256(tmp))
        self.run_dir.append_metrics(record)
        self.run_dir.write_json("privacy.json", self.privacy.as_json())
        describe_adapter(tmp, self.run_dir.path)  # names RUN_DIR/base; model card README.md
        self.run_dir.commit_adapter(tmp)
        return record

    def write_report(self) -> None:
        """Rewrite ``report.html``; a report that cannot be written does not end the run."""
        try:
            write_report(self.run_dir.path)
        except Exception:  # the round's files are written; the page can be rebuilt later
            logger.exception(
                "report.html not written after this round; 'fedpeft report %s' rebuilds it",
                self.run_dir.path,
            )

    def broadcast(self) -> Broadcast:
        """The global adapter as it goes down: without the LoRA factors still at their start."""
        return encode(self.global_flat, self.loaded.layout, seed=self.config.seed)

    # --- one round ------------------------------------------------------------------------
    def train_round(self, round_number: int, nodes: list[int]) -> RoundOutcome:
        """Train, aggregate and apply one round; the aggregation's outcome."""
        fed = self.config.federation
        full = self.strategy.trained_layout()
        trained = self.trained_in(round_number)
        request = RoundRequest(
            round_number=round_number,
            nodes=nodes,
            global_flat=self.global_flat,
            trained=trained,
            min_sites=fed.min_sites,
            timeout=fed.round_timeout,
            federation_id=self.federation_id,
            broadcast=self.broadcast(),
            signer=self.signer,
        )
        outcome = self.aggregation.run_round(self.grid, request)
        if outcome.mean_delta is not None:
            # a round that trained a part (the head alone) leaves the rest where it is
            mean_delta = widen(outcome.mean_delta, trained, full)
            self.global_flat = self.strategy.apply(self.global_flat, mean_delta)
        else:
            self.progress.message(
                f"round {round_number}: {len(outcome.contributors)} usable update(s), "
                f"federation.min_sites={fed.min_sites}; global adapter unchanged"
            )
        return outcome

    def trained_in(self, round_number: int) -> AdapterLayout:
        """What the sites train in ``round_number``, as ``train.trainable`` says for that round
        (its last entry repeats): the strategy's tensors, the biases and the head, or the
        head alone."""
        schedule = self.config.train.trainable
        return scheduled(
            self.strategy.trained_layout(), schedule[min(round_number, len(schedule)) - 1]
        )

    def train_figures(self, nodes: list[int], outcome: RoundOutcome) -> dict[str, Any]:
        """The training fields of the round's :class:`RoundRecord`."""
        return {
            "sites_sampled": len(nodes),
            "sites_replied": len(outcome.contributors),
            "sites_failed": len(outcome.failures),
            "sites_dropped": len(outcome.dropped),
            "failures": outcome.failures,
            "updated": outcome.mean_delta is not None,
            "train_loss": outcome.train_loss,
            "bytes_down": outcome.bytes_down,
            "bytes_up": outcome.bytes_up,
            "site_metrics": outcome.site_metrics,
            "secagg": self.config.secagg.enabled,
            "secagg_params": outcome.secagg_params,
        }

    def available(self, nodes: list[int]) -> list[int]:
        """Connected nodes minus those that refused a round for their privacy budget."""
        return [n for n in nodes if str(n) not in self.privacy.exhausted]

    def evaluate_round(self, round_number: int, trained: list[int]) -> EvalOutcome | None:
        """Held-out figures of the adapter after ``round_number``, from sites that trained it.

        A site evaluates only a round it was charged for (once, one adapter), so the server
        asks among that round's contributors; under secure aggregation at least
        ``federation.min_sites`` of them, and it learns only the sum of their figures.
        """
        fed = self.config.federation
        minimum = fed.min_sites if self.config.secagg.enabled else 1
        if fed.fraction_evaluate == 0 or len(trained) < minimum:
            return None  # not asked
        chosen = sample_nodes(self.rng, trained, fraction=fed.fraction_evaluate, minimum=minimum)
        return self.aggregation.evaluate(
            self.grid,
            EvalRequest(
                round_number=round_number,
                nodes=chosen,
                global_flat=self.global_flat,
                broadcast=self.broadcast(),
                federation_id=self.federation_id,
                timeout=fed.round_timeout,
                min_sites=fed.min_sites,
                signer=self.signer,
            ),
        )

    def eval_figures(self, outcome: EvalOutcome | None) -> dict[str, Any]:
        """The evaluation fields of the round's :class:`RoundRecord`."""
        if outcome is None:
            return {"eval_loss": None, "eval_accuracy": None, "eval_sites": 0, "eval_bytes_down": 0}
        causal = self.config.model.task == "causal_lm" and outcome.loss is not None
        return {
            "eval_loss": outcome.loss,
            "eval_accuracy": outcome.accuracy,
            "eval_sites": outcome.sites,
            "eval_bytes_down": outcome.bytes_down,
            "eval_failures": outcome.failures or None,
            "eval_perplexity": float(math.exp(min(outcome.loss, 50.0)))
            if causal and outcome.loss is not None
            else None,
            "eval_generations": sum(len(p) for p in outcome.generations.values()) or None,
        }

    def run(self) -> list[RoundRecord]:
        config, fed = self.config, self.config.federation
        self.run_dir.write_config(to_yaml(config))
        self.run_dir.write_json(
            FEDERATION_FILE, {"federation_id": self.federation_id, "transport": self.transport}
        )
        write_base(self.run_dir.path / BASE_DIR, config.model)  # the base every adapter names
        trail = CoordinatorTrail(self.run_dir.path)  # audit.jsonl (fedpeft.server.trail)
        trail.start(config, federation_id=self.federation_id, next_round=self.next_round)
        self.progress.start(
            rounds=fed.rounds,
            sites=fed.num_sites,
            run_dir=str(self.run_dir.path),
            adapter_floats=self.loaded.layout.size,
        )
        for round_number in range(self.next_round, fed.rounds + 1):
            start = time.perf_counter()
            nodes = wait_for_nodes(self.grid, minimum=fed.min_sites, timeout=fed.round_timeout)
            usable = self.available(nodes)
            if len(usable) < fed.min_sites:  # budgets spent: the designed end, not an abort
                self.progress.message(
                    f"federation ended before round {round_number}: {len(usable)} site(s) left "
                    f"with privacy budget, federation.min_sites={fed.min_sites} "
                    f"({len(self.privacy.exhausted)} exhausted: "
                    f"{', '.join(sorted(self.privacy.exhausted))})"
                )
                break
            sampled = sample_nodes(self.rng, usable, fraction=fed.fraction, minimum=fed.min_sites)
            phases = {"nodes": time.perf_counter() - start}
            self.progress.round_started(round_number, sampled=len(sampled))
            self.progress.phase_started("training")
            trained = self.train_round(round_number, sampled)
            phases["train"] = time.perf_counter() - start - sum(phases.values())
            contributors = [int(n) for n in trained.contributors]
            self.progress.phase_started("evaluation")
            evaluated = self.evaluate_round(round_number, contributors)
            phases["evaluate"] = time.perf_counter() - start - sum(phases.values())
            self.privacy.observe(round_number, trained.site_metrics, trained.failures)
            # what sites published about their data goes to sites.json, answers to
            # generations.jsonl: neither is a figure of metrics.jsonl
            self.run_dir.record_declarations(round_number, trained.declarations)
            self.run_dir.record_generations(
                round_number, evaluated.generations if evaluated is not None else {}
            )
            epsilons = self.privacy.epsilons()
            record = self.write_round(
                {
                    "round": round_number,
                    "rounds": fed.rounds,
                    **self.train_figures(sampled, trained),
                    **self.eval_figures(evaluated),
                    "phase_seconds": {k: round(v, 4) for k, v in phases.items()},
                    "epsilon": epsilons,
                    "epsilon_max": max(epsilons.values()) if epsilons else None,
                    "seconds": time.perf_counter() - start,
                }
            )
            self.audit_head = trail.round(record, sampled=sampled, replied=contributors)
            self.checkpoint(round_number)
            self.next_round = round_number + 1
            self.write_report()
            self.progress.round_done(record)
            self.note_answers(record.failures, contributors)
            hopeless = self.none_can_train(usable, contributors)
            if hopeless is not None:
                self.abort(round_number, hopeless)
        return self.run_dir.read_rounds()


def run_federation(
    grid: Grid,
    config: FedPeftConfig,
    *,
    run_dir: str | Path,
    progress: Progress | None = None,
    resume: bool = False,
    signing_key: Ed25519PrivateKey | None = None,
    transport: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run every round of a federation and return the lines of ``metrics.jsonl`` as written
    (:meth:`RoundRecord.as_json`; ``RunDir.read_rounds`` reads them typed).

    With ``resume`` the federation whose files are in ``run_dir`` continues after its last
    finished round (see :meth:`Federation.resume`); with ``signing_key`` every instruction
    carries the coordinator's signature.
    """
    if resume and not Path(run_dir).is_dir():
        raise ConfigError(
            f"resume-from={str(run_dir)!r} does not exist; give the run directory of the "
            "federation to continue, or leave resume-from empty to start a new one"
        )
    federation = Federation(
        grid,
        config,
        RunDir(run_dir),
        progress or Progress(),
        signing_key=signing_key,
        transport=transport,
    )
    if resume:
        federation.resume()
    return [record.as_json() for record in federation.run()]
