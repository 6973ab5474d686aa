"""The ``fedpeft`` command: ``simulate`` a federation, ``audit`` its DP-SGD's ε from below
(:mod:`fedpeft.audit`), ``report`` a run for a privacy officer (:mod:`fedpeft.report`),
``export`` its adapter (:mod:`fedpeft.export`) and ``generate`` with it
(:mod:`fedpeft.generate`), make ``certs`` and ``keys`` for a real
deployment (:mod:`fedpeft.deploy`), and serve a site's SuperNode with a long-lived ClientApp
``worker`` (:mod:`fedpeft.client.worker`).

Hydra overrides are the trailing ``key=value`` words of ``fedpeft simulate`` and ``fedpeft
audit``; they are composed over ``conf/`` by :func:`fedpeft.config.compose_config`, which
fails at once on an unknown key or a bad value.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedpeft.config import ConfigError, compose_config

#: ``fedpeft simulate``'s exit status when the federation ended early because no site could
#: train (a bad input found before the start exits 2, as every ConfigError).
EXIT_ABORTED = 1


def _multirun(args: argparse.Namespace) -> int:
    from fedpeft.multirun import default_sweep_dir, expand, run_multirun, summary_table

    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else default_sweep_dir()
    results = run_multirun(args.overrides, sweep_dir, verbose=args.verbose)
    print(summary_table(results, expand(args.overrides)))
    print(f"sweep directory: {sweep_dir.resolve()} (summary.json)")
    return 0 if all(r.status == "ok" for r in results) else EXIT_ABORTED


def _simulate(args: argparse.Namespace) -> int:
    if args.multirun:
        return _multirun(args)
    if args.sweep_dir:
        raise ConfigError(f"--sweep-dir {args.sweep_dir} needs -m/--multirun; add -m")
    config = compose_config(args.overrides)
    from fedpeft.server.federation import FederationAborted
    from fedpeft.server.progress import summary_table
    from fedpeft.simulation import simulate

    try:
        result = simulate(config, verbose=args.verbose)
    except FederationAborted as err:  # the reason is one line; its detail is in the run's log
        print(f"fedpeft: error: federation ended: {err}", file=sys.stderr)
        return EXIT_ABORTED
    except RuntimeError as err:  # the ServerApp stopped; its traceback is in RUN_DIR/log.txt
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return EXIT_ABORTED
    print(summary_table(result.records))
    last = result.records[-1]
    acc, ppl = last.eval_accuracy, last.eval_perplexity
    if ppl is not None:  # a causal LM: perplexity on the held-out response tokens
        token = f" (token accuracy {acc:.3f})" if acc is not None else ""
        print(f"\nfinal eval perplexity: {ppl:.2f}{token}")
    else:
        print(f"\nfinal eval accuracy: {acc:.3f}" if acc is not None else "\nno evaluation ran")
    print(f"run directory: {result.run_dir.resolve()}")
    return 0


def _site_examples(text: str) -> list[int]:
    """``--site-examples 400,800,1200``: each site's training examples, whole numbers >= 1."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(n < 1 for n in sizes):
        raise ConfigError(
            f"--site-examples {text!r}: give each site's number of training examples, whole "
            "numbers >= 1 separated by commas, e.g. --site-examples 400,800,1200"
        )
    return sizes


def _plan(args: argparse.Namespace) -> int:
    from fedpeft.plan import (
        best_sample_rate,
        plan_site,
        simulation_plans,
        table,
        trained_coordinates,
    )

    config = compose_config(args.overrides)
    if not config.privacy.enabled:
        raise ConfigError(
            "privacy.enabled=false: without DP-SGD there is no noise to plan; drop the "
            "override (the default is DP at ε = 8) or set privacy.enabled=true"
        )
    if args.site_examples:
        coordinates = trained_coordinates(config)
        plans = [
            plan_site(config, site=f"site {i}", num_train=n, coordinates=coordinates)
            for i, n in enumerate(_site_examples(args.site_examples))
        ]
    else:  # the simulation's own sites, as its preflight finds them
        from fedpeft.preflight import preflight

        plans = simulation_plans(config, preflight(config))
    p, f = config.privacy, config.federation
    print(
        f"DP-SGD plan: ε = {p.epsilon:g} per site over {f.rounds} round(s) of "
        f"{config.train.local_steps} step(s), {p.accountant} accountant, clip norm "
        f"{p.max_grad_norm:g}; ρ = σ·√d / (q·N), a step's noise over the largest "
        "per-coordinate signal (fedpeft.plan)"
    )
    print(table(plans))
    best = best_sample_rate(config)
    now = plans[0] if plans else None
    if best is None:
        print("\nno rate to recommend: privacy.noise_multiplier fixes σ (or none calibrates)")
        return 0
    q, sigma = best
    if now is not None and q != now.sample_rate:
        gain = (now.noise_multiplier / now.sample_rate) / (sigma / q)
        print(
            f"\nrecommended: privacy.sample_rate={q:g} (σ = {sigma:.3f}); it lowers ρ at every "
            f"site {gain:.2g}× (σ/q {now.noise_multiplier / now.sample_rate:.3g} → "
            f"{sigma / q:.3g}); each step then trains on {q / now.sample_rate:.3g}× the examples"
        )
    else:
        print(f"\nprivacy.sample_rate={q:g} already has the smallest σ/q of the rates tried")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedpeft.export import export_adapter, export_merged

    run_dir, out = Path(args.run_dir), Path(args.out)
    if args.merge:
        result = export_merged(run_dir, out)
        print(f"merged model and model card (README.md) written to {result.out}")
    else:
        result = export_adapter(run_dir, out)
        print(
            f"adapter (PEFT format), model card (README.md) and its base model (base/) "
            f"written to {result.out}"
        )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fedpeft.generate import answer

    print(answer(args.dir, args.prompt, max_new_tokens=args.max_new_tokens, device=args.device))
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedpeft.report import read_run, write_reference, write_report

    run_dir = Path(args.run_dir)
    read_run(run_dir)  # fails with a clear message on a folder that is not a run
    if args.reference:
        write_reference(run_dir, Path(args.reference))
    path = write_report(run_dir)
    print(f"report written to {path.resolve()} (self-contained; open it in any browser)")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from fedpeft.deploy import DEFAULT_HOSTS, make_certificates

    files = make_certificates(
        args.out, hosts=args.host or DEFAULT_HOSTS, days=args.days, force=args.force
    )
    print(f"CA and SuperLink certificate for {', '.join(files.hosts)} written to {args.out}:")
    print(f"  coordinator: flower-superlink --ssl-ca-certfile {files.ca_cert} \\")
    print(f"                 --ssl-certfile {files.server_cert} --ssl-keyfile {files.server_key}")
    print(f"  every site and the flwr CLI: {files.ca_cert} (root certificate, public)")
    print(f"  keep private: {files.ca_key}, {files.server_key}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from fedpeft.deploy import make_coordinator_key, make_site_keys, site_names

    if args.coordinator:
        private, public = make_coordinator_key(args.out, force=args.force)
        print(f"coordinator signing key written to {private} (keep private; ServerApp run config")
        print(f'  coordinator-key="{private}") and {public} (give it to every site: node config')
        print(f"  coordinator-public-key='{public}')")
        if not (args.sites or args.name):
            return 0
    names = site_names(sites=args.sites, names=args.name or ())
    for key in make_site_keys(args.out, names, force=args.force):
        print(
            f"{key.name}: flwr supernode register {key.public_key}   "
            f"(site: flower-supernode --auth-supernode-private-key {key.private_key})"
        )
    return 0


def _worker(args: argparse.Namespace) -> int:
    import logging

    from fedpeft.client.worker import Worker

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per task poll otherwise
    logging.getLogger("fedpeft.client.errors").setLevel(logging.DEBUG)  # failures' tracebacks
    if args.poll_interval <= 0:
        raise ConfigError(f"--poll-interval {args.poll_interval} must be > 0 seconds, e.g. 0.05")
    node_config = None
    if args.node_config is not None:
        from flwr.common.config import parse_config_args

        try:
            node_config = parse_config_args([args.node_config])
        except ValueError as err:
            raise ConfigError(f"--node-config {args.node_config!r}: {err}") from None
    stats = Worker(
        args.runtime_api,
        poll_interval=args.poll_interval,
        node_config=node_config,
        config=compose_config(args.overrides),
    ).serve(max_tasks=args.max_tasks)
    print(f"served {stats.completed} tasks ({stats.failed} failed)")
    return 0


def _supernode(args: argparse.Namespace) -> int:
    from fedpeft.client.supernode import run

    if not 0 < args.poll_interval <= 3:
        raise ConfigError(
            f"--poll-interval {args.poll_interval} must be in (0, 3] seconds, e.g. 0.1"
        )
    flower_args = list(args.flower_args)
    if flower_args[:1] == ["--"]:
        flower_args = flower_args[1:]
    run(flower_args, poll_interval=args.poll_interval)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from fedpeft.audit import AUDIT_FILE, EXIT_VIOLATION, run_audit
    from fedpeft.client.errors import SiteRefusal
    from fedpeft.privacy.errors import PrivacyConfigError

    config = compose_config(args.overrides)
    try:
        result = run_audit(
            config,
            canaries=args.canaries,
            beta=args.beta,
            kind=args.kind,
            run_dir=args.out,
            seed=args.seed,
        )
    except (PrivacyConfigError, SiteRefusal) as err:  # the site's privacy plan refused
        raise ConfigError(str(err)) from None
    b = result.bound
    print(
        f"audited {result.kind} canaries on {result.model}, site 0 ({result.num_examples} "
        f"examples), {result.steps} DP-SGD steps: σ={result.noise_multiplier:.4g}, "
        f"q={result.sample_rate:.4g}, C={result.max_grad_norm:g}, {result.clipping}"
    )
    print(
        f"claimed ε={result.claimed_epsilon:.4g} at δ={result.delta:g} "
        f"(ledger, {result.accountant} accountant)"
    )
    print(
        f"m={b.canaries} canaries ({b.included} included); best of {b.candidates} guess sets: "
        f"k={b.guesses} (k+={b.k_plus}, k-={b.k_minus}), {b.correct} correct"
    )
    print(
        f"empirical lower bound ε ≥ {b.epsilon_lower_bound:.4g} at confidence "
        f"{1 - b.beta:.3g} (β={b.beta:g}); p-value of the claim {b.p_value:.3g}"
    )
    print(result.verdict)
    print(f"audit written to {(result.run_dir / AUDIT_FILE).resolve()} ({result.seconds:.0f} s)")
    return 0 if result.consistent else EXIT_VIOLATION


def _verify(args: argparse.Namespace) -> int:
    from fedpeft.verify import NotARunDir, verify_run

    try:
        verdicts = verify_run(
            Path(args.run_dir),
            ledgers=[Path(p) for p in args.ledger or ()],
            site_trails=[Path(p) for p in args.site_audit or ()],
        )
    except NotARunDir as err:
        raise ConfigError(str(err)) from None
    for verdict in verdicts:
        print(verdict.line())
    failed = sum(not v.ok for v in verdicts)
    print(
        f"{len(verdicts) - failed} of {len(verdicts)} checks passed"
        + (f", {failed} FAILED" if failed else "")
    )
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a local federation (Flower simulation engine)")
    sim.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. federation.num_sites=5")
    sim.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="one federation per combination of swept overrides (Hydra's grammar: "
        "strategy=ffa,fedavg privacy.epsilon=range(1,9,3) ...), one after another",
    )
    sim.add_argument(
        "--sweep-dir", help="multirun: folder of the jobs' run dirs (default runs/multirun-<time>)"
    )
    sim.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show everything Flower, Ray and the libraries print (always in RUN_DIR/log.txt)",
    )
    sim.set_defaults(func=_simulate)
    plan = sub.add_parser(
        "plan",
        help="before training: each site's σ, q, batch, steps, ε per round, and whether DP "
        "noise leaves LoRA anything to learn",
    )
    plan.add_argument("overrides", nargs="*", help="Hydra overrides, as for simulate")
    plan.add_argument(
        "--site-examples",
        metavar="N1,N2,...",
        help="each site's training examples (default: the simulation's own partitions)",
    )
    plan.set_defaults(func=_plan)
    audit = sub.add_parser(
        "audit",
        help="bound ε from below with one canary training run (Steinke et al. 2023); "
        "exit 3 if the bound exceeds the ledger's ε",
    )
    audit.add_argument("overrides", nargs="*", help="Hydra overrides, as for simulate")
    audit.add_argument(
        "--canaries", type=int, default=1000, help="number of canaries m (default 1000)"
    )
    audit.add_argument(
        "--beta", type=float, default=0.05, help="1 - confidence of the bound (default 0.05)"
    )
    audit.add_argument(
        "--kind",
        choices=["dirac", "input"],
        default="dirac",
        help="dirac: white-box gradient canaries (default); input: mislabelled examples",
    )
    audit.add_argument("--out", help="new folder for audit.json (default runs/audit-<time>)")
    audit.add_argument("--seed", type=int, help="repeat an audit exactly (default: fresh)")
    audit.set_defaults(func=_audit)
    report = sub.add_parser(
        "report", help="write RUN_DIR/report.html: plots, ε per site, what left each site"
    )
    report.add_argument("run_dir")
    report.add_argument(
        "--reference",
        help="a non-private run directory to draw beside this one (kept in reference.json)",
    )
    report.set_defaults(func=_report)
    exp = sub.add_parser("export", help="export a run's global adapter (PEFT) or merged model")
    exp.add_argument("run_dir")
    exp.add_argument("--out", required=True, help="new folder to write")
    exp.add_argument("--merge", action="store_true", help="merge LoRA into the base model")
    exp.set_defaults(func=_export)
    gen = sub.add_parser(
        "generate",
        help="answer a prompt greedily with an exported causal LM (adapter + base/, --merge "
        "folder, or run directory), loaded with plain transformers + peft",
    )
    gen.add_argument("dir", help="a 'fedpeft export' folder or a run directory")
    gen.add_argument("prompt", help="the prompt (formatted as in training: chat template or '\\n')")
    gen.add_argument(
        "--max-new-tokens", type=int, default=64, help="longest answer in tokens (default 64)"
    )
    gen.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps (default cpu)")
    gen.set_defaults(func=_generate)
    ver = sub.add_parser(
        "verify",
        help="re-check a run's hash chains, every ε (Opacus) and its adapter; exit 1 on a mismatch",
    )
    ver.add_argument("run_dir")
    ver.add_argument(
        "--ledger",
        action="extend",
        nargs="+",
        metavar="FILE",
        help="sites' privacy ledgers: recompute their ε (one or more; repeatable)",
    )
    ver.add_argument(
        "--site-audit",
        action="extend",
        nargs="+",
        metavar="FILE",
        help="sites' audit trails: check their chains (one or more; repeatable)",
    )
    ver.set_defaults(func=_verify)
    certs = sub.add_parser("certs", help="TLS: a CA and a SuperLink certificate signed by it")
    certs.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.*")
    certs.add_argument(
        "--host",
        action="append",
        help="IP address or DNS name sites dial (repeatable; default 127.0.0.1 and localhost)",
    )
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    certs.add_argument("--force", action="store_true", help="overwrite existing files")
    certs.set_defaults(func=_certs)
    keys = sub.add_parser(
        "keys",
        help="ECDSA key pairs for SuperNode authentication; --coordinator: the Ed25519 key "
        "that signs the coordinator's instructions",
    )
    keys.add_argument("--out", required=True, help="folder for <site>.key and <site>.pub")
    keys.add_argument(
        "--coordinator",
        action="store_true",
        help="also make coordinator.key / coordinator.pub (Ed25519) for signed instructions",
    )
    keys.add_argument("--sites", type=int, help="make site-1 … site-N")
    keys.add_argument("--name", action="append", help="a site's name (repeatable)")
    keys.add_argument("--force", action="store_true", help="overwrite existing files")
    keys.set_defaults(func=_keys)
    worker = sub.add_parser(
        "worker",
        help="run a SuperNode's ClientApp tasks in one long-lived process "
        "(flower-supernode --isolation process)",
    )
    worker.add_argument(
        "--runtime-api",
        default="127.0.0.1:9094",
        help="the SuperNode's runtime API, HOST:PORT (flower-supernode --port; default "
        "127.0.0.1:9094)",
    )
    worker.add_argument(
        "--poll-interval", type=float, default=0.05, help="seconds between task polls (0.05)"
    )
    worker.add_argument("--max-tasks", type=int, help="exit after this many tasks (tests)")
    worker.add_argument(
        "--node-config",
        help="the SuperNode's --node-config string: checked (data, columns, ledger, ceiling) "
        "before serving; without it the check runs at the first task",
    )
    worker.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides of the runs this site joins, for the start-up column check, "
        "e.g. data.text_column=body",
    )
    worker.set_defaults(func=_worker)
    node = sub.add_parser(
        "supernode",
        help="Flower's flower-supernode with its fixed 3 s / 0.5 s waits shortened",
    )
    node.add_argument(
        "--poll-interval", type=float, default=0.1, help="longest wait in seconds (0.1)"
    )
    node.add_argument(
        "flower_args",
        nargs=argparse.REMAINDER,
        help="flower-supernode's own arguments, after --",
    )
    node.set_defaults(func=_supernode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
