"""Test accuracy of federated LoRA strategies, with and without DP, between a ceiling and a floor.

One dataset is split once into a pooled held-out set and a training pool; the pool is split
into ``--sites`` non-IID sites (Dirichlet over labels, ``--alpha``). Every configuration trains
for the same ``--rounds`` rounds of ``--steps`` local steps and is evaluated on the same pooled
held-out set:

- ceiling: centralised non-private LoRA, one site holding the whole training pool and taking
  ``--steps × --sites`` steps per round (the federation's total number of steps);
- floor: each site training alone (a federation of one) for the same rounds and steps; the
  mean of their accuracies;
- probe: logistic regression on the frozen base encoder's features of the training pool,
  fitted to convergence (non-private) — what any run whose LoRA update adds nothing approaches;
- fedavg, ffa, fedsvd without DP and with DP-SGD at every site at each ε of ``--epsilons``
  (δ and the sampling rate q as configured, 1e-5 and 0.03 by default; the calibrated noise
  spending the whole ε over the run).

With ``--seeds K`` every configuration runs once per training seed (the data split stays);
the runs of one seed share their sites' DP randomness (:func:`paired_secret`), so the report's
per-seed differences against fedavg are paired. Figures are means over the seeds.

Every run is also evaluated with its LoRA factors' product removed (every ``lora_B`` at zero,
so ΔW = B·A = 0, the trained head kept): ``accuracy_without_lora``. The difference is what the
LoRA update itself adds; where it is near zero the strategies differ only in how they trained
the classifier head, and their LoRA aggregation is not what the table compares.

Federations run on the in-process grid (:mod:`fedpeft.testing`): the real ClientApp and server
round loop, without Ray. Sites read their partition from a JSONL file, like a real site, and
keep a single example as their own held-out split (sites do not evaluate here, the pooled set
does).

Usage::

    python -m benchmarks.quality            # embedded MiniLM + Rotten Tomatoes, 10 sites (~50 min
                                            # on 2 cores: 23 runs of 3 rounds x 3 steps of 64)
    python -m benchmarks.quality --quick    # tiny in-process BERT, 3 sites, 2 rounds, one ε
    python -m benchmarks.quality --strategies ffa --epsilons 8 --set privacy.max_grad_norm=3
    python -m benchmarks.quality --seeds 3  # every configuration with 3 paired training seeds

Writes ``benchmarks/results/quality.json`` and ``quality.png`` (accuracy vs ε per strategy,
with the ceiling and the floor; ``--name`` changes the stem), prints a table, and one line per
finished configuration. :func:`section` renders one such JSON as its part of
``benchmarks/README.md`` (every sweep in the results folder has one).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from benchmarks import markdown as md
from fedpeft import constants as K
from fedpeft.client.app import make_client_app
from fedpeft.client.train import EvalResult, evaluate_local, forward_losses, make_loader
from fedpeft.config import ConfigError, FedPeftConfig, compose_config
from fedpeft.data import load_dataset, partition_dataset, split_site, tokenize
from fedpeft.model import AdapterLayout, LoadedModel, build_model, split_flat
from fedpeft.server.federation import Federation
from fedpeft.server.progress import Progress
from fedpeft.server.rundir import RunDir
from fedpeft.testing import InProcessGrid

DEFAULT_OUT = Path(__file__).parent / "results"
STRATEGIES = ("fedavg", "ffa", "fedsvd")
NO_DP = "no_dp"
KINDS = ("ceiling", "floor", "federated")
PROBE_L2 = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)  # L2 weights the linear probe chooses from
PROBE_ITERATIONS = 500  # L-BFGS cap; a logistic regression on 384 features needs far fewer


@dataclass(frozen=True)
class Setting:
    """What every configuration of one benchmark run shares."""

    overrides: tuple[str, ...]  # Hydra overrides of the model, data and training
    sites: int
    rounds: int
    steps: int
    alpha: float
    epsilons: tuple[float, ...]
    strategies: tuple[str, ...]
    eval_examples: int
    secagg: bool
    quick: bool
    seeds: int  # every configuration runs once per training seed


def setting_from_args(args: argparse.Namespace) -> Setting:
    quick = bool(args.quick)
    # quick: one torch thread, faster than several for a tiny model on a shared machine
    overrides = ["model=tiny_bert", "data.max_examples=600", "train.num_threads=1"] if quick else []
    if args.max_examples is not None:
        overrides.append(f"data.max_examples={args.max_examples}")
    overrides.append(f"privacy.accountant={args.accountant or ('rdp' if quick else 'prv')}")
    overrides.extend(args.set or ())  # last: a user's --set wins over the defaults above
    return Setting(
        overrides=tuple(overrides),
        sites=args.sites or (3 if quick else 10),
        rounds=args.rounds or (2 if quick else 3),
        steps=args.steps or 3,
        alpha=args.alpha,
        epsilons=tuple(args.epsilons or ([8.0] if quick else [1.0, 3.0, 8.0])),
        strategies=tuple(args.strategies),
        eval_examples=args.eval_examples or (120 if quick else 1000),
        secagg=bool(args.secagg),
        quick=quick,
        seeds=args.seeds,
    )


def compose(setting: Setting, *extra: str) -> FedPeftConfig:
    """The configuration of one run: the setting, sites reading files, no site evaluation."""
    return compose_config(
        [
            *setting.overrides,
            "data.dataset=file",
            "data.path=unused.jsonl",  # each site reads its own file (node config data-path)
            "data.test_fraction=0.001",  # a site keeps one example as its (unused) held-out set
            f"federation.rounds={setting.rounds}",
            "federation.fraction_evaluate=0",  # the pooled held-out set is evaluated instead
            *extra,
        ]
    )


@dataclass(frozen=True)
class Pool:
    """The pooled held-out set and the sites' training files."""

    dataset: str
    test_table: Any  # datasets.Dataset
    site_files: list[Path]
    pool_file: Path
    site_sizes: list[int]


def make_pool(setting: Setting, folder: Path) -> Pool:
    """Split the dataset once: pooled held-out set, training pool, Dirichlet sites (JSONL)."""
    base = compose_config(
        [
            *setting.overrides,
            f"federation.num_sites={setting.sites}",
            "federation.partition=dirichlet",
            f"federation.alpha={setting.alpha}",
            "federation.min_sites=1",
            "secagg.enabled=false",  # only splits the data here
        ]
    )
    task, columns = base.model.task, [base.data.text_column, base.data.label_column]
    table = load_dataset(base.data, task, seed=base.seed).select_columns(columns)
    train, test = split_site(
        table,
        test_fraction=base.data.test_fraction,
        max_test=setting.eval_examples,
        seed=base.seed,
        source="the pooled dataset",
    )
    partitioner = partition_dataset(train, base.federation, base.data, task, seed=base.seed)
    folder.mkdir(parents=True, exist_ok=True)
    pool_file = folder / "pool.jsonl"
    train.to_json(str(pool_file), lines=True)
    site_files, sizes = [], []
    for site in range(setting.sites):
        part = partitioner.load_partition(site)
        path = folder / f"site{site}.jsonl"
        part.to_json(str(path), lines=True)
        site_files.append(path)
        sizes.append(len(part))
    return Pool(
        dataset=base.data.dataset,
        test_table=test,
        site_files=site_files,
        pool_file=pool_file,
        site_sizes=sizes,
    )


def without_lora(flat: np.ndarray, layout: AdapterLayout) -> np.ndarray:
    """A copy of adapter ``flat`` with every ``lora_B`` at zero: ΔW = B·A = 0, heads kept."""
    out = flat.copy()
    for name, part in split_flat(out, layout).items():  # views into ``out``
        if ".lora_B." in name:
            part[...] = 0.0
    return out


def head_inputs(
    loaded: LoadedModel, table: Any, config: FedPeftConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model's classifier head reads, ``(N, H)``, and the labels ``(N,)`` of ``table``.

    The adapter is as ``loaded`` holds it; at its start every ``lora_B`` is zero, so these are
    the frozen base encoder's features (mean-pooled tokens for the embedded MiniLM).
    """
    heads = [
        module
        for name, module in loaded.peft_model.named_modules()
        if name.endswith("modules_to_save.default")
    ]
    if len(heads) != 1:
        raise ValueError(f"expected one trained head (peft modules_to_save), found {len(heads)}")
    dataset = tokenize(
        table,
        loaded.tokenizer,
        config=config.data,
        task=config.model.task,
        max_length=config.model.max_length,
    )
    loader = make_loader(
        dataset,
        batch_size=config.train.eval_batch_size,
        pad_id=int(loaded.tokenizer.pad_token_id),
        shuffle=False,
        seed=0,
    )
    seen: list[torch.Tensor] = []
    hook = heads[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    labels = []
    loaded.peft_model.eval()  # no dropout between the encoder and the head
    try:
        with torch.no_grad():
            for batch in loader:
                forward_losses(loaded, loaded.peft_model, batch, torch.device("cpu"))
                labels.append(batch[2])
    finally:
        hook.remove()
    return torch.cat(seen).float(), torch.cat(labels)


def fit_head(
    x: torch.Tensor, y: torch.Tensor, *, num_labels: int, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``x @ W + b`` fitted to convergence (L-BFGS, full batch)."""
    weight = torch.zeros(x.shape[1], num_labels, requires_grad=True)
    bias = torch.zeros(num_labels, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=PROBE_ITERATIONS, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(setting: Setting, pool: Pool) -> dict[str, Any]:
    """The best a non-private head on the frozen encoder reaches: a bound for head-only training.

    Logistic regression on the base encoder's features of the whole training pool, its L2
    weight chosen on a tenth of the pool held out (never on the test set), then refitted on
    all of it. A federated run whose LoRA update adds nothing (``accuracy_without_lora`` equal
    to ``accuracy``) is a head on these same features: this is the level it approaches however
    long it trains (up to the luck of one held-out set, since the probe optimises the training
    loss, not test accuracy).
    """
    start = time.perf_counter()
    config = compose(setting)
    loaded = build_model(config.model, config.lora, seed=config.seed)
    pool_table = datasets.Dataset.from_json(str(pool.pool_file))
    x, y = head_inputs(loaded, pool_table, config)
    x_test, y_test = head_inputs(loaded, pool.test_table, config)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed))
    held, fit = order[: len(y) // 10], order[len(y) // 10 :]

    def accuracy(
        head: tuple[torch.Tensor, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor
    ) -> float:
        return float(((xs @ head[0] + head[1]).argmax(dim=1) == ys).float().mean())

    num_labels = config.model.num_labels
    validation = {
        l2: accuracy(fit_head(x[fit], y[fit], num_labels=num_labels, l2=l2), x[held], y[held])
        for l2 in PROBE_L2
    }
    best = max(PROBE_L2, key=lambda l2: (validation[l2], l2))  # ties: the stronger penalty
    head = fit_head(x, y, num_labels=num_labels, l2=best)
    return {
        "accuracy": accuracy(head, x_test, y_test),
        "l2": best,
        "validation_accuracy": {f"{l2:g}": a for l2, a in validation.items()},
        "features": int(x.shape[1]),
        "seconds": time.perf_counter() - start,
    }


def paired_secret(seed: int, site: int) -> bytes:
    """Site ``site``'s DP randomness key in every run of training seed ``seed``.

    Benchmark only: a real site's key is random and never known to anyone else
    (:func:`fedpeft.client.budget.site_secret`). Here the runs of one seed share their sites'
    keys and federation id, so they draw the same Poisson batches and noise seeds, and a
    difference between two strategies of one seed is not a difference of luck in sampling.
    """
    return hashlib.sha256(f"fedpeft quality benchmark: seed {seed}, site {site}".encode()).digest()


def run_federation(
    config: FedPeftConfig, files: Sequence[Path], folder: Path, pool: Pool
) -> dict[str, Any]:
    """Run one federation of ``files`` (one site each); evaluate on the pooled held-out set.

    Site randomness is paired across the runs of one ``config.seed`` (:func:`paired_secret`).
    """
    node_configs: dict[int, dict[str, Any]] = {}
    for i, path in enumerate(files):
        ledger = folder / f"ledger{i}.json"
        ledger.parent.mkdir(parents=True, exist_ok=True)
        ledger.with_name(ledger.name + ".secret").write_bytes(paired_secret(config.seed, i))
        node_configs[i + 1] = {
            K.NODE_DATA_PATH: str(path),
            K.NODE_LEDGER_PATH: str(ledger),
            # the benchmark's own sites: their ceiling is the run's ε, and the no-DP reference
            # runs are allowed (a deployed site refuses DP off unless it says so)
            K.NODE_EPSILON_MAX: config.privacy.epsilon,
            K.NODE_DELTA: config.privacy.delta or 1e-5,
            K.NODE_PRIVACY_REQUIRED: str(config.privacy.enabled).lower(),
        }
    grid = InProcessGrid(make_client_app(config), node_configs)
    federation = Federation(grid, config, RunDir(folder / "run"), Progress(stream=io.StringIO()))
    federation.federation_id = f"quality-seed{config.seed}"  # paired with the seed's other runs
    start = time.perf_counter()
    rows = federation.run()
    seconds = time.perf_counter() - start
    loaded = federation.loaded
    test = tokenize(
        pool.test_table,
        loaded.tokenizer,
        config=config.data,
        task=config.model.task,
        max_length=config.model.max_length,
    )

    def accuracy_of(flat: np.ndarray) -> EvalResult:
        return evaluate_local(
            loaded,
            test,
            global_flat=flat,
            batch_size=config.train.eval_batch_size,
            device=torch.device("cpu"),
        )

    result = accuracy_of(federation.global_flat)
    head_only = accuracy_of(without_lora(federation.global_flat, loaded.layout))
    epsilons = [e for r in rows[-1:] for e in r.epsilon.values()]
    return {
        "accuracy": result.accuracy,
        "accuracy_without_lora": head_only.accuracy,
        "loss": result.loss,
        "epsilon_spent": max(epsilons) if epsilons else None,
        "rounds_updated": sum(r.updated for r in rows),
        "seconds": seconds,
    }


def configurations(setting: Setting, pool: Pool) -> list[tuple[str, dict[str, Any]]]:
    """Every configuration: name → how to run it (kind, strategy, ε, overrides, site files)."""
    alone = [
        "federation.num_sites=1",
        "federation.min_sites=1",
        "strategy=fedavg",
        "secagg.enabled=false",  # one site: nothing to aggregate securely
        "privacy.enabled=false",  # ceiling and floor are the non-private references
    ]
    out: list[tuple[str, dict[str, Any]]] = [
        (
            "ceiling",
            {
                "kind": "ceiling",
                "strategy": "fedavg",
                "epsilon": None,
                "overrides": [*alone, f"train.local_steps={setting.steps * setting.sites}"],
                "files": [pool.pool_file],
            },
        )
    ]
    for site, path in enumerate(pool.site_files):
        out.append(
            (
                f"alone-site{site}",
                {
                    "kind": "floor",
                    "strategy": "fedavg",
                    "epsilon": None,
                    "overrides": [*alone, f"train.local_steps={setting.steps}"],
                    "files": [path],
                },
            )
        )
    federated = [
        f"federation.num_sites={setting.sites}",
        f"federation.min_sites={min(2, setting.sites)}",
        f"train.local_steps={setting.steps}",
        f"secagg.enabled={str(setting.secagg).lower()}",
    ]
    for strategy in setting.strategies:
        for epsilon in (None, *setting.epsilons):
            privacy = (
                ["privacy.enabled=false"]
                if epsilon is None
                else ["privacy.enabled=true", f"privacy.epsilon={epsilon}"]
            )
            name = f"{strategy}-{NO_DP if epsilon is None else f'eps{epsilon:g}'}"
            out.append(
                (
                    name,
                    {
                        "kind": "federated",
                        "strategy": strategy,
                        "epsilon": epsilon,
                        "overrides": [*federated, f"strategy={strategy}", *privacy],
                        "files": pool.site_files,
                    },
                )
            )
    return out


def run(setting: Setting, *, work: Path) -> dict[str, Any]:
    pool = make_pool(setting, work / "data")
    probe = linear_probe(setting, pool)
    print(
        f"linear probe: accuracy {probe['accuracy']:.3f} (L2 {probe['l2']:g}, "
        f"{probe['seconds']:.1f} s)",
        flush=True,
    )
    plan = configurations(setting, pool)
    config = compose(setting)
    seeds = [config.seed + j for j in range(setting.seeds)]
    runs: dict[str, dict[str, Any]] = {}
    for index, (seed, (name, spec)) in enumerate(
        ((seed, item) for seed in seeds for item in plan), start=1
    ):
        key = name if len(seeds) == 1 else f"{name}@{seed}"
        run_config = compose(setting, *spec["overrides"], f"seed={seed}")
        result = run_federation(run_config, spec["files"], work / key, pool)
        runs[key] = {
            "kind": spec["kind"],
            "strategy": spec["strategy"],
            "epsilon_target": spec["epsilon"],
            "seed": seed,
            **result,
        }
        spent = result["epsilon_spent"]
        privacy = f" ε spent {spent:.2f}" if spent is not None else ""
        print(
            f"[{index:>2}/{len(plan) * len(seeds)}] {key:<16} accuracy {result['accuracy']:.3f} "
            f"loss {result['loss']:.3f}{privacy} ({result['seconds']:.1f} s)",
            flush=True,
        )
    of_kind = {kind: [r for r in runs.values() if r["kind"] == kind] for kind in KINDS}
    ceilings, floors, federated = of_kind["ceiling"], of_kind["floor"], of_kind["federated"]

    def by_strategy(value: Callable[[list[dict[str, Any]]], Any]) -> dict[str, dict[str, Any]]:
        """strategy → ε key ("no_dp", "1", "8", …) → ``value`` of its runs, in seed order."""
        groups: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in setting.strategies}
        for r in federated:
            eps = NO_DP if r["epsilon_target"] is None else f"{r['epsilon_target']:g}"
            groups[r["strategy"]].setdefault(eps, []).append(r)
        return {s: {e: value(rs) for e, rs in by.items()} for s, by in groups.items()}

    accuracy = by_strategy(lambda rs: mean(r["accuracy"] for r in rs))
    per_seed = by_strategy(lambda rs: [r["accuracy"] for r in rs])
    lora_gain = by_strategy(lambda rs: mean(r["accuracy"] - r["accuracy_without_lora"] for r in rs))
    # paired: the same seed's runs share data order and noise seeds (paired_secret)
    versus = {
        strategy: {
            eps: [a - b for a, b in zip(values, per_seed["fedavg"][eps], strict=True)]
            for eps, values in by_eps.items()
        }
        for strategy, by_eps in per_seed.items()
        if strategy != "fedavg" and "fedavg" in per_seed
    }
    return {
        "benchmark": "quality",
        "setting": {
            "quick": setting.quick,
            "model": config.model.loader,
            "dataset": pool.dataset,
            "sites": setting.sites,
            "partition": "dirichlet",
            "alpha": setting.alpha,
            "rounds": setting.rounds,
            "local_steps": setting.steps,
            "batch_size": config.train.batch_size,
            "lr": config.train.lr,
            "lora_r": config.lora.r,
            "epsilons": list(setting.epsilons),
            "delta": config.privacy.delta,
            "accountant": config.privacy.accountant,
            "max_grad_norm": config.privacy.max_grad_norm,
            "overrides": list(setting.overrides),
            "secagg": setting.secagg,
            "train_examples": sum(pool.site_sizes),
            "site_sizes": pool.site_sizes,
            "test_examples": len(pool.test_table),
        },
        "seeds": seeds,
        # means over the seeds; *_per_seed lists them in the order of "seeds"
        "ceiling": mean(r["accuracy"] for r in ceilings),
        "ceiling_per_seed": [r["accuracy"] for r in ceilings],
        "floor": mean(r["accuracy"] for r in floors),
        "floor_per_site": [  # each site's mean over the seeds
            mean(r["accuracy"] for r in floors[site :: setting.sites])
            for site in range(setting.sites)
        ],
        "accuracy": accuracy,
        "accuracy_per_seed": per_seed,
        "vs_fedavg": versus,  # strategy → ε → accuracy minus fedavg's, one per seed (paired)
        "lora_gain": lora_gain,  # accuracy minus accuracy_without_lora
        "ceiling_lora_gain": mean(r["accuracy"] - r["accuracy_without_lora"] for r in ceilings),
        "probe": probe,  # non-private head on the frozen encoder, fitted to convergence
        "runs": runs,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def mean(values: Iterable[float]) -> float:
    """The mean, rounded to 4 places like every figure of the report."""
    return round(float(np.mean(list(values))), 4)


def table(report: dict[str, Any]) -> str:
    """Accuracy per strategy and ε (seed means), the references, LoRA's part, and vs fedavg."""
    columns = [f"{e:g}" for e in report["setting"]["epsilons"]] + [NO_DP]
    header = f"{'strategy':<10}" + "".join(
        f"{('ε=' + c) if c != NO_DP else 'no DP':>9}" for c in columns
    )
    lines = [header, "-" * len(header)]
    for strategy, by_eps in report["accuracy"].items():
        lines.append(f"{strategy:<10}" + "".join(f"{by_eps[c]:>9.3f}" for c in columns))
    lines.append(f"{'ceiling':<10}{report['ceiling']:>9.3f}  (centralised, non-private)")
    lines.append(f"{'floor':<10}{report['floor']:>9.3f}  (mean of sites training alone)")
    lines.append(
        f"{'probe':<10}{report['probe']['accuracy']:>9.3f}  (non-private head on the frozen "
        "encoder, converged)"
    )
    lines.append("")
    lines.append("what the LoRA update adds (accuracy minus the same run with ΔW = B·A = 0)")
    for strategy, by_eps in report["lora_gain"].items():
        lines.append(f"{strategy:<10}" + "".join(f"{by_eps[c]:>+9.3f}" for c in columns))
    lines.append(f"{'ceiling':<10}{report['ceiling_lora_gain']:>+9.3f}")
    if report["vs_fedavg"]:
        lines.append("")
        lines.append("accuracy minus fedavg's, paired by seed: mean, then seeds won")
        for strategy, by_eps in report["vs_fedavg"].items():
            lines.append(
                f"{strategy:<10}" + "".join(f"{np.mean(by_eps[c]):>+9.3f}" for c in columns)
            )
            wins = [f"{sum(d > 0 for d in by_eps[c])}/{len(by_eps[c])}" for c in columns]
            lines.append(f"{'  won':<10}" + "".join(f"{w:>9}" for w in wins))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy vs ε per strategy (no DP at the right), ceiling and floor as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [f"{e:g}" for e in report["setting"]["epsilons"]] + [NO_DP]
    labels = [f"ε={c}" for c in columns[:-1]] + ["no DP"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy, by_eps in report["accuracy"].items():
        ax.plot(range(len(columns)), [by_eps[c] for c in columns], marker="o", label=strategy)
    ax.axhline(report["ceiling"], color="black", linestyle="--", label="ceiling (centralised)")
    ax.axhline(report["floor"], color="grey", linestyle=":", label="floor (site alone)")
    ax.set_xticks(range(len(columns)), labels)
    ax.set_xlabel("privacy budget per site")
    ax.set_ylabel("test accuracy (pooled held-out set)")
    s = report["setting"]
    ax.set_title(
        f"{s['model']} on {s['dataset']}: {s['sites']} sites, Dirichlet α={s['alpha']:g}, "
        f"{s['rounds']} rounds",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- README section: its part of benchmarks/README.md (benchmarks.report assembles it) ---


def section(
    report: dict[str, Any], results: Path, readme: Path, stem: str = "quality"
) -> list[str]:
    """One quality sweep (``results/<stem>.json``): accuracy, LoRA's part, paired differences."""
    title = "## Quality (`quality.py`)"
    if stem != "quality":
        setting = report.get("setting", {})
        title = (
            f"## Quality, {setting.get('rounds', '?')} rounds × {setting.get('local_steps', '?')} "
            f"steps (`quality.py --name {stem}`)"
        )
    out = [title, ""]
    try:
        s = report["setting"]
        out.append(
            f"{s['model']} on {s['dataset']}, {s['sites']} sites (Dirichlet α={s['alpha']}), "
            f"{s['rounds']} rounds × {s['local_steps']} steps; pooled held-out accuracy."
        )
        out.append("")
        columns = [f"{e:g}" for e in s["epsilons"]] + [NO_DP]

        def rows(by_strategy: dict[str, dict[str, float]], fmt: str) -> list[list[str]]:
            return [
                [name, *[format(by.get(c, float("nan")), fmt) for c in columns]]
                for name, by in by_strategy.items()
            ]

        def single(label: str, value: float, fmt: str) -> list[str]:
            return [label, format(value, fmt), *[""] * (len(columns) - 1)]

        header = ["strategy", *[f"ε={c}" if c != NO_DP else "no DP" for c in columns]]
        table = rows(report["accuracy"], ".3f")
        table.append(single("ceiling (centralised)", report["ceiling"], ".3f"))
        table.append(single("floor (site alone)", report["floor"], ".3f"))
        if "probe" in report:  # results written before the probe existed lack it
            table.append(
                single("probe (head on frozen encoder)", report["probe"]["accuracy"], ".3f")
            )
        out.append(md.table(header, table))
        if "lora_gain" in report:  # results written before this column existed lack it
            out += [
                "",
                "What the LoRA update adds: accuracy minus the same run with ΔW = B·A = 0 "
                "(trained head kept). Near zero, the rows above compare head training, "
                "not LoRA aggregation.",
                "",
            ]
            gains = rows(report["lora_gain"], "+.3f")
            gains.append(single("ceiling", report["ceiling_lora_gain"], "+.3f"))
            out.append(md.table(header, gains))
        seeds = report.get("seeds", [])
        if len(seeds) > 1 and report.get("vs_fedavg"):
            out += [
                "",
                f"Figures above are means over {len(seeds)} training seeds. Accuracy minus "
                "fedavg's, paired by seed (the same sites' batches and noise seeds), with the "
                "seeds won:",
                "",
            ]
            versus = [
                [
                    name,
                    *[
                        f"{sum(by[c]) / len(by[c]):+.3f} ({sum(d > 0 for d in by[c])}/{len(by[c])})"
                        for c in columns
                    ],
                ]
                for name, by in report["vs_fedavg"].items()
            ]
            out.append(md.table(header, versus))
    except (KeyError, TypeError, ValueError):
        out.append("See `results/quality.json`.")
    png = results / f"{stem}.png"
    if png.is_file():
        out += ["", f"![{stem}]({os.path.relpath(png, readme.parent)})"]
    return [*out, ""]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 sites, 2 rounds, one ε")
    parser.add_argument("--sites", type=int, help="number of sites (default 10; quick 3)")
    parser.add_argument("--rounds", type=int, help="federation rounds (default 3; quick 2)")
    parser.add_argument("--steps", type=int, help="local steps per round (default 3)")
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet α (default 0.3)")
    parser.add_argument("--epsilons", type=float, nargs="+", help="ε targets (default 1 3 8)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--eval-examples", type=int, help="pooled held-out size (default 1000)")
    parser.add_argument("--max-examples", type=int, help="cap on the dataset before splitting")
    parser.add_argument("--accountant", choices=("prv", "rdp"), help="default prv; quick rdp")
    parser.add_argument("--secagg", action="store_true", help="federations use SecAgg+")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run every configuration with this many training seeds, paired across "
        "configurations; the report gives means and per-seed figures (default 1)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for JSON and PNG")
    parser.add_argument(
        "--name",
        default="quality",
        help="file name stem of the JSON and PNG (default quality); report.py shows every "
        "quality*.json of the results folder, e.g. --name quality_long for a longer sweep",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a Hydra override for every configuration, e.g. privacy.max_grad_norm=3 "
        "(repeatable; recorded in the JSON)",
    )
    args = parser.parse_args(argv)
    if not re.fullmatch(r"quality[A-Za-z0-9_-]*", args.name):
        parser.error(
            f"--name {args.name!r}: must start with 'quality' and use only A-Z a-z 0-9 _ -"
        )
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: must be at least 1")
    bad = [o for o in args.set or () if "=" not in o.strip("=")]
    if bad:
        parser.error(f"--set {bad[0]!r}: expected KEY=VALUE, e.g. privacy.max_grad_norm=3")
    setting = setting_from_args(args)
    try:
        compose(setting)  # an unknown key or a bad value fails here, before any data is split
    except ConfigError as err:
        parser.error(str(err))
    datasets.disable_progress_bars()  # one line per configuration is the progress display
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedpeft-quality-") as work, warnings.catch_warnings():
        # Opacus's notes on torch's RNG, hooks and RDP orders, repeated by every DP round. The
        # RNG note is about torch generators fedpeft no longer draws noise or batches from
        # (fedpeft/privacy/dp.py, "Randomness"); each filter matches one message and ends with
        # this block.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Optimal order is the")
        # transformers' deprecation note, raised inside peft's save_pretrained every round
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        report = run(setting, work=Path(work))
    json_path, png_path = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, png_path)
    print(table(report))
    print(f"written to {json_path} and {png_path}")


if __name__ == "__main__":
    main()
