"""``fedpeft audit``: an empirical lower bound on ε from one run of fedpeft's own DP-SGD.

Every ε fedpeft reports is Opacus' accountant applied to the recorded history: it proves the
arithmetic, not that the training does what the arithmetic assumes (opacus#820: LoRA updates
silently wrong while loss and ε looked normal). This module runs the one-run audit of Steinke,
Nasr and Jagielski (NeurIPS 2023) on the training a site actually runs, and compares the
lower bound it proves with the ε the site's ledger claims. The statistics (guesses, Theorem
3.1, the bound) are :mod:`fedpeft.privacy.audit`; this module owns the canaries, the training
run and the report.

What is audited is a simulated site's own path, end to end: site 0's training split of the
configured dataset (as ``fedpeft simulate`` partitions it), the configured model and adapter
(:func:`fedpeft.model.build_model`) and the tensors the strategy trains; the site's privacy
plan (:func:`fedpeft.client.budget.site_budget`: δ, the sampling rate q and σ calibrated for
``federation.rounds × train.local_steps`` steps against ``privacy.epsilon``); each round
charged to a :class:`~fedpeft.privacy.ledger.PrivacyLedger` before it trains, its randomness
keyed from the site secret and the round's binding as a site keys it; and DP-SGD through
:func:`fedpeft.privacy.dp.make_private` (Opacus' per-sample clipping, Gaussian noise from the
keyed ChaCha20 stream, Poisson sampling at q), stepped with :meth:`~fedpeft.privacy.dp.
DPSession.backward` exactly as :func:`fedpeft.client.train.train_local` steps it. The claimed
ε is read back from that ledger. Nothing of DP-SGD is re-implemented here: a mistake in
clipping, noise, sampling, scaling or calibration shows as a lower bound above the claim.

The m canaries are extra training examples, each included independently with probability ½
(drawn before training, independently of everything else); the sampling rate and δ are fixed
from the real examples plus all m canaries, so they do not depend on which were included. Two
kinds (``kind``):

- ``"dirac"`` (default), white-box gradient canaries: canary i's per-example gradient is
  replaced by ``DIRAC_NORM × max_grad_norm`` times a one-hot vector on its own coordinate of a
  trained LoRA tensor (distinct canaries, distinct coordinates, so their directions are
  orthogonal). The replacement happens after :meth:`DPSession.backward` has left Opacus'
  per-sample gradients in ``p.grad_sample`` and before ``optimizer.step()`` clips, sums and
  noises them. Training uses plain SGD (no momentum, no weight decay) at the configured
  learning rates, so ``-Δθ_i · B / lr`` (B the session's "mean" divisor, the loader's
  batch_size) is exactly the noisy clipped-gradient sum along canary i's direction: canary i's
  clipped contribution each time it is sampled, plus the Gaussian noise and the real
  examples' gradients on that coordinate. That sum is its score. This is the strongest
  canary the threat model of DP-SGD allows (any per-example gradient of norm up to C, here
  clipped to exactly C), it isolates the mechanism from the model (the optimiser only
  post-processes the noisy sums), and it is cheap on a CPU: a canary is one coordinate, so
  thousands fit in one run. The gradient is deliberately larger than C: with clipping in
  place its size does not matter; a missing or loosened clip makes it stand out. Ghost
  clipping never materialises per-sample gradients, so Dirac canaries need
  ``privacy.clipping=hooks`` or ``functorch``.
- ``"input"``, black-box canaries: mislabelled random examples (random letter strings with
  random labels; a random response for a causal LM), trained on like any other example with
  the configured optimiser, in any clipping mode. Score: the drop of each canary's loss from
  the initial to the final model. Much weaker: on a small model and a few steps the bound is
  usually 0 even without noise.

Guesses and the bound are those of :func:`fedpeft.privacy.audit.audit_bound` (a fixed grid of
guess counts, Bonferroni-corrected). The claim is rejected (a "VIOLATION") when its adjusted
p-value is below β, i.e. when the bound exceeds the claimed ε. A consistent audit is not proof
of privacy: it only fails to find a contradiction; with few steps and strong noise the bound
is far below the claim even for a correct implementation.

Cost: one training run of ``federation.rounds × train.local_steps`` steps whose batches also
carry about ``q · m / 2`` canaries.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import DataLoader, Dataset

from fedpeft import constants as K
from fedpeft.config import ConfigError, FedPeftConfig, as_dict
from fedpeft.names import Optimizer
from fedpeft.privacy.audit import DEFAULT_BETA, AuditBound, audit_bound

if TYPE_CHECKING:
    from fedpeft.client.budget import SiteBudget

__all__ = [
    "AUDIT_FILE",
    "CANARY_KINDS",
    "DEFAULT_CANARIES",
    "DIRAC_NORM",
    "EXIT_VIOLATION",
    "AuditResult",
    "run_audit",
]

#: Canary designs: white-box gradient canaries (default) and black-box input canaries.
CANARY_KINDS: Final[tuple[str, ...]] = ("dirac", "input")
#: Default number of canaries: enough for a bound of about 3 if every guess were right,
#: cheap on a CPU (about q · 500 extra examples per step).
DEFAULT_CANARIES: Final[int] = 1000
#: A Dirac canary's gradient norm, in units of ``max_grad_norm``; see the module docstring.
DIRAC_NORM: Final[float] = 10.0
#: The report written to the audit's run directory.
AUDIT_FILE: Final[str] = "audit.json"
#: Exit code of ``fedpeft audit`` when the bound contradicts the claim.
EXIT_VIOLATION: Final[int] = 3

_SITE = "site-0"
_PAPER = (
    "Steinke, Nasr, Jagielski: Privacy Auditing with One (1) Training Run, NeurIPS 2023 "
    "(arXiv:2305.08846), Theorem 3.1"
)

Marked = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class AuditResult:
    """What one audit found, as ``audit.json`` records it.

    Attributes
    ----------
    bound : fedpeft.privacy.audit.AuditBound
        The lower bound, the guesses that gave it and the test of the claim.
    kind : {"dirac", "input"}
        The canaries used.
    claimed_epsilon : float
        ε of the ledger after every round was charged (Opacus' accountant).
    delta : float
        δ of the ledger (the δ audited).
    accountant : str
        The ledger's accountant.
    noise_multiplier : float
        σ of the site's plan.
    sample_rate : float
        Poisson rate q.
    steps : int
        DP-SGD steps trained (and charged).
    max_grad_norm : float
        Clipping norm C.
    clipping : str
        Opacus' grad-sample mode.
    model : str
        ``model.loader``.
    num_examples : int
        Real training examples of the audited site (canaries not counted).
    run_dir : pathlib.Path
        Where ``audit.json`` and the ledger were written.
    seconds : float
        Wall time of the audit.
    """

    bound: AuditBound
    kind: str
    claimed_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    clipping: str
    model: str
    num_examples: int
    run_dir: Path
    seconds: float

    @property
    def consistent(self) -> bool:
        """Whether the audit found no contradiction with the claimed ε."""
        return not self.bound.violation

    @property
    def verdict(self) -> str:
        """One line: ``consistent: lower bound 0.9 ≤ claimed 8`` or ``VIOLATION: ...``."""
        lower, claimed = self.bound.epsilon_lower_bound, self.claimed_epsilon
        if self.consistent:
            return f"consistent: lower bound {lower:.3g} ≤ claimed {claimed:.3g}"
        return f"VIOLATION: lower bound {lower:.3g} > claimed {claimed:.3g}"

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready report."""
        b = self.bound
        return {
            "verdict": self.verdict,
            "consistent": self.consistent,
            "claimed_epsilon": self.claimed_epsilon,
            "epsilon_lower_bound": b.epsilon_lower_bound,
            "delta": self.delta,
            "beta": b.beta,
            "confidence": 1.0 - b.beta,
            "p_value": b.p_value,
            "m": b.canaries,
            "canaries_included": b.included,
            "k": b.guesses,
            "k_plus": b.k_plus,
            "k_minus": b.k_minus,
            "correct": b.correct,
            "guess_sets_tried": b.candidates,
            "kind": self.kind,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "max_grad_norm": self.max_grad_norm,
            "clipping": self.clipping,
            "model": self.model,
            "num_examples": self.num_examples,
            "seconds": self.seconds,
            "method": _PAPER,
        }


class _MarkedDataset(Dataset[Marked]):
    """Examples ``(input_ids, attention_mask, labels, marker)``; marker: canary index or -1."""

    def __init__(self, items: list[Marked]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Marked:
        return self.items[index]


def _collate_marked(batch: list[Marked], *, pad_id: int) -> Marked:
    from fedpeft.data import collate

    ids, mask, labels = collate([item[:3] for item in batch], pad_id=pad_id)
    return ids, mask, labels, torch.stack([item[3] for item in batch])


def _marked(item: Sequence[torch.Tensor], marker: int) -> Marked:
    return item[0], item[1], item[2], torch.tensor(marker, dtype=torch.long)


def _check_request(
    config: FedPeftConfig, *, canaries: object, beta: object, kind: object, run_dir: Path
) -> None:
    """Raise one ConfigError listing every problem with the audit's settings."""
    problems = []
    if kind not in CANARY_KINDS:
        problems.append(f"--kind {kind!r}: allowed {list(CANARY_KINDS)}")
    if not (isinstance(canaries, int) and not isinstance(canaries, bool) and canaries >= 2):
        problems.append(
            f"--canaries {canaries!r}: must be an integer >= 2 (default {DEFAULT_CANARIES})"
        )
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 < beta < 1):
        problems.append(f"--beta {beta!r}: must be in (0, 1), e.g. {DEFAULT_BETA} for 95%")
    if not config.privacy.enabled:
        problems.append(
            "privacy.enabled=false: there is no privacy claim to audit; drop the override "
            "(DP is on by default) or set privacy.enabled=true"
        )
    if kind == "dirac" and config.privacy.clipping == "ghost":
        problems.append(
            "privacy.clipping=ghost with --kind dirac: ghost clipping never materialises the "
            "per-sample gradients Dirac canaries replace; use privacy.clipping=hooks (or "
            "functorch) or --kind input"
        )
    if config.privacy.automatic_clipping is not None:
        problems.append(
            f"privacy.automatic_clipping={config.privacy.automatic_clipping}: the audit trains "
            "with Opacus's clipping only, so its bound would not be of this training; audit "
            "with privacy.automatic_clipping=null (σ and ε are the same)"
        )
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        problems.append(
            f"--out {run_dir}: exists and is not an empty folder; an audit needs a fresh ledger, "
            "choose a new folder"
        )
    if problems:
        listing = "\n  - ".join(problems)
        raise ConfigError(f"cannot audit ({len(problems)} problem(s)):\n  - {listing}")


def _site_tables(config: FedPeftConfig) -> Any:
    """Site 0's training table, as ``fedpeft simulate`` partitions and splits the dataset."""
    from fedpeft.data import load_dataset, partition_dataset, split_site

    table = load_dataset(config.data, config.model.task, seed=config.seed)
    partitioner = partition_dataset(
        table, config.federation, config.data, config.model.task, seed=config.seed
    )
    train, _ = split_site(
        partitioner.load_partition(0),
        test_fraction=config.data.test_fraction,
        max_test=config.data.max_eval_examples,
        seed=config.seed,
        source="site 0",
    )
    return train


def _input_canaries(
    config: FedPeftConfig, tokenizer: Any, count: int, rng: np.random.Generator
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``count`` mislabelled random examples, tokenised as the site's data is."""
    import datasets

    from fedpeft.data import tokenize

    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))

    def text() -> str:
        return " ".join(
            "".join(rng.choice(letters, size=int(rng.integers(3, 8)))) for _ in range(6)
        )

    d = config.data
    if config.model.task == "classification":
        columns: dict[str, list[object]] = {
            d.text_column: [text() for _ in range(count)],
            d.label_column: [int(x) for x in rng.integers(0, config.model.num_labels, count)],
        }
    else:
        columns = {
            d.prompt_column: [text() for _ in range(count)],
            d.response_column: [text()[:12] for _ in range(count)],
        }
    table = datasets.Dataset.from_dict(columns)
    tokens = tokenize(
        table,
        tokenizer,
        config=config.data,
        task=config.model.task,
        max_length=config.model.max_length,
    )
    return [tokens[i] for i in range(count)]


class _DiracCanaries:
    """One-hot gradient canaries on distinct coordinates of the trained LoRA tensors.

    Parameters
    ----------
    params : list of (name, parameter)
        The trained tensors, in the optimiser's order.
    count : int
        m.
    norm : float
        Each canary's gradient norm (``DIRAC_NORM × C``).
    rng : numpy.random.Generator
        Picks the coordinates (before training, independently of the inclusion).
    """

    def __init__(
        self,
        params: Sequence[tuple[str, torch.nn.Parameter]],
        *,
        count: int,
        norm: float,
        rng: np.random.Generator,
    ) -> None:
        from fedpeft.model import is_bias, is_head

        # A head's coordinates carry the real examples' largest gradients, and biases large
        # ones: keep canaries on the LoRA factors, where the real signal per coordinate is
        # small, or on the biases when no LoRA trains (BitFit).
        self.params = [p for _, p in params]
        eligible = [i for i, (name, _) in enumerate(params) if not is_head(name)]
        if any(not is_bias(params[i][0]) for i in eligible):
            eligible = [i for i in eligible if not is_bias(params[i][0])]
        sizes = np.array([self.params[i].numel() for i in eligible], dtype=np.int64)
        total = int(sizes.sum())
        if count > total:
            raise ConfigError(
                f"--canaries {count}: Dirac canaries need one trained LoRA coordinate (or bias) "
                f"each and this adapter trains {total}; allowed 2 to {total}. Use fewer "
                "canaries, a larger lora.r, or --kind input."
            )
        flat = np.sort(rng.choice(total, size=count, replace=False))  # distinct coordinates
        which = np.searchsorted(np.cumsum(sizes), flat, side="right")  # index into eligible
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.param_index = np.array([eligible[w] for w in which], dtype=np.int64)  # (m,)
        self.offset = (flat - starts[which]).astype(np.int64)  # (m,) flat offset in its tensor
        # rng.choice order was sorted above; shuffle so canary index and tensor are unrelated
        order = rng.permutation(count)
        self.param_index, self.offset = self.param_index[order], self.offset[order]
        self.norm = float(norm)

    def values(self) -> NDArray[np.float64]:
        """The current value of every canary's coordinate, ``(m,)``."""
        out = np.empty(self.offset.shape[0], dtype=np.float64)
        for j, p in enumerate(self.params):
            chosen = self.param_index == j
            if chosen.any():
                flat = p.detach().reshape(-1).to("cpu", torch.float64).numpy()
                out[chosen] = flat[self.offset[chosen]]
        return out

    def inject(self, markers: torch.Tensor) -> None:
        """Replace the per-sample gradients of the batch's canary rows by their Dirac vectors.

        ``markers``: ``(B,)`` canary index of each row, -1 for real examples. Call after
        :meth:`DPSession.backward` and before ``optimizer.step()``.
        """
        rows = torch.nonzero(markers >= 0).flatten()
        if rows.numel() == 0:
            return
        ids = markers[rows].numpy()
        for j, p in enumerate(self.params):
            grad_sample = getattr(p, "grad_sample", None)
            if not isinstance(grad_sample, torch.Tensor):
                raise RuntimeError(
                    "Opacus left no per-sample gradient tensor (p.grad_sample) after "
                    "DPSession.backward; Dirac canaries need privacy.clipping=hooks or functorch."
                )
            index = rows.to(grad_sample.device)
            grad_sample[index] = 0.0  # (B, *p.shape): the canary rows carry nothing else
            mine = self.param_index[ids] == j
            if mine.any():
                coords = torch.unravel_index(
                    torch.from_numpy(self.offset[ids][mine]), tuple(p.shape)
                )
                grad_sample[(index[torch.from_numpy(mine)], *coords)] = self.norm


def _plan(
    config: FedPeftConfig, ledger_dir: Path, *, num_train: int, run_id: str, seed: int | None
) -> SiteBudget:
    """The site's privacy plan (fedpeft.client.budget), with a seeded secret if asked."""
    from fedpeft.client.budget import site_budget

    ledger_dir.mkdir(parents=True)
    if seed is not None:
        # The site secret keys every round's sampling and noise; a given seed repeats the audit.
        secret = hashlib.sha256(f"fedpeft/audit/secret/{seed}".encode()).digest()
        fd = os.open(
            ledger_dir / f"{_SITE}.json.secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
        )
        with os.fdopen(fd, "wb") as handle:
            handle.write(secret)
    site_config = replace(config, privacy=replace(config.privacy, ledger_dir=str(ledger_dir)))
    return site_budget(
        site_config,
        {K.NODE_PARTITION_ID: 0},
        site_name=_SITE,
        num_train=num_train,
        run_id=run_id,
    )


@torch.no_grad()
def _losses(
    loaded: Any, items: Sequence[Any], *, batch_size: int, device: torch.device
) -> NDArray[np.float64]:
    """Per-example losses of ``items`` under the model in eval mode, ``(len(items),)``."""
    from fedpeft.client.train import forward_losses
    from fedpeft.data import collate

    model = loaded.peft_model
    model.eval()
    pad_id = int(loaded.tokenizer.pad_token_id)
    out = []
    for start in range(0, len(items), batch_size):
        batch = collate([tuple(x[:3]) for x in items[start : start + batch_size]], pad_id=pad_id)
        losses, _ = forward_losses(loaded, model, batch, device)
        out.append(losses.detach().to("cpu", torch.float64))
    model.train()
    return torch.cat(out).numpy()


def run_audit(
    config: FedPeftConfig,
    *,
    canaries: int = DEFAULT_CANARIES,
    beta: float = DEFAULT_BETA,
    kind: str = "dirac",
    run_dir: str | os.PathLike[str] | None = None,
    seed: int | None = None,
) -> AuditResult:
    """Train once with canaries through fedpeft's DP-SGD; bound ε from below; compare.

    Parameters
    ----------
    config : FedPeftConfig
        The composed configuration (``privacy.enabled`` must be true); site 0 of its
        federation is audited.
    canaries : int, default 1000
        m >= 2. Dirac canaries need one trained LoRA coordinate each.
    beta : float, default 0.05
        1 - confidence of the lower bound.
    kind : {"dirac", "input"}, default "dirac"
        White-box gradient canaries or black-box input canaries (module docstring).
    run_dir : path, optional
        A new or empty folder for ``audit.json`` and the audit's own ledger; default
        ``runs/audit-<time>``.
    seed : int, optional
        Fixes the canaries, their inclusion and the site secret (so the sampling and noise):
        the same seed repeats the audit. Omitted: fresh randomness from the OS.

    Returns
    -------
    AuditResult
        Also written to ``run_dir/audit.json``.

    Raises
    ------
    ConfigError
        Listing every problem with the settings, before any work.
    """
    from fedpeft.client.train import (
        forward_losses,
        make_optimizer,
        prepare_trainable,
        private_backward,
    )
    from fedpeft.model import build_model, get_flat, resolve_device, scheduled
    from fedpeft.privacy import dp
    from fedpeft.privacy.binding import adapter_digest, release_binding, release_key, release_seed
    from fedpeft.server.strategies import make_strategy

    start = time.perf_counter()
    out = (
        Path(run_dir)
        if run_dir is not None
        else Path("runs") / f"audit-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    )
    _check_request(config, canaries=canaries, beta=beta, kind=kind, run_dir=out)
    if config.train.num_threads > 0:
        torch.set_num_threads(config.train.num_threads)
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    included = rng.random(canaries) < 0.5  # S_i: each canary in with probability 1/2

    device = resolve_device(config.train.device)
    loaded = build_model(config.model, config.lora, seed=config.seed, device=device)
    # what a steady round trains: the schedule's last entry (it repeats) of the strategy's
    layout = scheduled(
        make_strategy(config.strategy, loaded.layout).trained_layout(), config.train.trainable[-1]
    )
    trained_names = layout.names
    named = prepare_trainable(loaded, trained_names)
    clip = config.privacy.max_grad_norm
    dirac = (
        _DiracCanaries(named, count=canaries, norm=DIRAC_NORM * clip, rng=rng)
        if kind == "dirac"
        else None
    )

    from fedpeft.data import tokenize

    train_table = _site_tables(config)
    real = tokenize(
        train_table,
        loaded.tokenizer,
        config=config.data,
        task=config.model.task,
        max_length=config.model.max_length,
    )
    if dirac is not None:
        # The gradient of a Dirac canary is replaced; its input only has to run forward,
        # so every canary reuses the site's shortest example.
        shortest = min(range(len(real)), key=lambda i: int(real[i][0].shape[0]))
        canary_items = [real[shortest]] * canaries
        train_config = replace(
            config.train, optimizer=Optimizer.sgd, momentum=0.0, weight_decay=0.0
        )
    else:
        canary_items = _input_canaries(config, loaded.tokenizer, canaries, rng)
        train_config = config.train
    items = [_marked(real[i], -1) for i in range(len(real))]
    items += [_marked(canary_items[i], int(i)) for i in np.flatnonzero(included)]
    dataset = _MarkedDataset(items)

    out.mkdir(parents=True, exist_ok=True)
    # The run id enters every round's binding, so its noise key: fixed by a seed, else fresh.
    run_id = f"audit-seed-{seed}" if seed is not None else f"audit-{uuid.uuid4().hex}"
    # q and δ from the real examples plus all m canaries: independent of which were included.
    plan = _plan(config, out / "ledger", num_train=len(real) + canaries, run_id=run_id, seed=seed)
    layout = loaded.layout
    model = loaded.peft_model
    model.train()
    before_all = (
        _losses(loaded, canary_items, batch_size=config.train.eval_batch_size, device=device)
        if dirac is None
        else None
    )
    scores = np.zeros(canaries, dtype=np.float64)
    pad_id = int(loaded.tokenizer.pad_token_id)
    steps = config.train.local_steps
    for round_number in range(1, config.federation.rounds + 1):
        binding = release_binding(
            federation_id=run_id,
            round_number=round_number,
            task=K.TASK_TRAIN,
            adapter_sha256=adapter_digest(get_flat(model, layout).tobytes()),
            trained_names=list(trained_names),
            settings=plan.settings(),
        )
        plan.charge(run_id=run_id, round_number=round_number, binding=binding)  # before training
        noise_key = release_key(plan.secret, binding)
        torch.manual_seed(release_seed(noise_key))  # LoRA dropout, as a site seeds it
        optimizer = make_optimizer(named, train_config)
        lr = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
        loader: DataLoader[Marked] = DataLoader(
            dataset,
            batch_size=train_config.batch_size,
            collate_fn=partial(_collate_marked, pad_id=pad_id),
        )
        start_values = dirac.values() if dirac is not None else None
        with dp.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            grad_sample_mode=plan.clipping,  # type: ignore[arg-type]
            max_steps=steps,
            sample_rate=plan.sample_rate,
            noise_key=noise_key,
        ) as session:
            while session.steps < steps:
                for batch in session.data_loader:
                    if session.steps >= steps:
                        break
                    _, kept = private_backward(
                        session,
                        batch,
                        lambda b: forward_losses(loaded, session.module, b, device)[0],
                        device=device,
                    )
                    if dirac is not None and kept[0].shape[0]:
                        dirac.inject(kept[3])
                    session.optimizer.step()
                    session.optimizer.zero_grad()
            divisor = session.expected_batch_size
        if dirac is not None and start_values is not None:
            rates = np.array([lr[id(dirac.params[j])] for j in dirac.param_index])
            # SGD: Δθ = -lr · (clipped sum + noise) / B, so -Δθ · B / lr is the noisy sum.
            scores += (start_values - dirac.values()) * divisor / rates
    if before_all is not None:
        after = _losses(
            loaded, canary_items, batch_size=config.train.eval_batch_size, device=device
        )
        scores = before_all - after  # loss decrease: trained-on canaries drop most

    claimed = plan.ledger.epsilon()
    bound = audit_bound(
        scores, included, delta=plan.delta, beta=float(beta), claimed_epsilon=claimed
    )
    result = AuditResult(
        bound=bound,
        kind=kind,
        claimed_epsilon=claimed,
        delta=plan.delta,
        accountant=plan.ledger.accountant,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=config.federation.rounds * steps,
        max_grad_norm=plan.max_grad_norm,
        clipping=plan.clipping,
        model=config.model.loader,
        num_examples=len(real),
        run_dir=out,
        seconds=time.perf_counter() - start,
    )
    report = result.as_dict() | {"config": as_dict(config)}
    (out / AUDIT_FILE).write_text(
        json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    return result
