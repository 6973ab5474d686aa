"""fedpeft's SecAgg+ against Flower's legacy SecAgg+: one round in-process, and whole rounds.

**In-process round.** For each number of sites ``n`` and update length ``L`` one full round
runs twice, interleaved over ``--repeats``: fedpeft's :mod:`fedpeft.privacy.secagg`
(``SecAggClient`` / ``SecAggServer``) and Flower 1.41's SecAgg+, driven through Flower's own
code: the client stage functions of ``flwr/client/mod/secure_aggregation/secaggplus_mod.py``
(``_setup``, ``_share_keys``, ``_collect_masked_vectors``, ``_unmask``, which call
``pseudo_rand_gen``, ``quantize``, ``create_shares`` and Fernet ``encrypt``/``decrypt``) and the
server steps of ``flwr/server/workflow/secure_aggregation/secaggplus_workflow.py`` reproduced
line for line around its primitives (ring neighbour graph, ciphertext forwarding, summing the
masked vectors, ``combine_shares``, mask removal, ``dequantize``). Both get the same ``n``, the
same number of neighbours ``k`` (Flower's ``num_shares = k + 1``: a node and its neighbours), the
same threshold ``t``, the same clipping range and the same float32 vectors; no site drops out.
Flower runs with its workflow defaults otherwise (``quantization_range = 2**22``,
``modulus_range = 2**32``, ``max_weight = 1000``, every site weighing ``max_weight``).

Recorded per framework: client time per site (masking alone, and all four stages), server time
(summing the masked vectors as they arrive, and unmasking), payload bytes each site uploads and
downloads (raw bytes, array bytes, 8 per number, string lengths, 8 per mapping key; transport
framing excluded), the masked vector's bytes beside the ``4 * L`` of a plain float32 update
(Flower's masked vectors are ``int64`` arrays serialised with ``ndarray_to_bytes``), and the
error of the decoded mean against the plain mean.

**Whole rounds in simulation.** ``fedpeft simulate`` with 10 sites, a tiny BERT whose adapter
has ~100k floats (printed), plain vs ``secagg.enabled=true``, each in its own process; rounds
2..R from ``metrics.jsonl`` ``seconds`` (round 1 includes Ray's start). Then Flower's legacy
SecAgg+ workflow (``LegacyContext`` + ``DefaultWorkflow(SecAggPlusWorkflow)`` + legacy
``FedAvg`` + ``NumPyClient`` with ``secaggplus_mod``) on a vector of the same size, plain vs
secure, same backend settings; its clients do no training (they return the parameters plus a
small perturbation), so its rows show the protocol's added seconds per round, which is what to
compare with fedpeft's added seconds.

The DP round that the client cost is compared with comes from ``dp_throughput.json`` (MiniLM,
DP hooks, scaled to 10 steps of batch 32) when present, else one round is measured here.

Usage::

    python -m benchmarks.secagg_vs_flower            # n in {5, 20, 100}, L in {75k, 1M}; sims
    python -m benchmarks.secagg_vs_flower --quick    # n = 5, L = 10k, 3-site 2-round sims

Writes ``benchmarks/results/secagg_vs_flower.json``; :func:`plots` draws
``secagg_vs_flower.png`` from it (cost against n, when there is more than one n),
:func:`section` renders it as this benchmark's part of ``benchmarks/README.md`` (with the targets)
and :func:`headline_rows` as its rows of the headline table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import markdown as md
from benchmarks.secagg_primitives import payload_bytes
from fedpeft.privacy.secagg import (
    SecAggClient,
    SecAggServer,
    default_num_neighbours,
    default_threshold,
)
from fedpeft.server.rounds import read_rounds
from fedpeft.testing import offline_env, write_classification_csv

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "secagg_vs_flower.json"
CLIP = 1.0
# Flower's SecAggPlusWorkflow defaults.
FLOWER_QUANTIZATION_RANGE = 2**22
FLOWER_MODULUS_RANGE = 2**32
FLOWER_MAX_WEIGHT = 1000.0
# A tiny BERT whose LoRA adapter (query, value) plus classifier head is ~100k floats.
SIM_MODEL = [
    "model.hidden_size=384",
    "model.num_layers=4",
    "model.num_heads=6",
    "lora.r=16",
]
DP_STEPS, DP_BATCH = 10, 32


def update_for(node: int, length: int) -> np.ndarray:
    """The float32 update of ``node``, the same for both frameworks."""
    return np.random.default_rng(1000 + node).uniform(-CLIP, CLIP, length).astype(np.float32)


def flower_payload_bytes(value: Any) -> int:
    """:func:`secagg_primitives.payload_bytes` semantics, plus strings (Flower's stage names)."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, Mapping):
        return sum(8 + flower_payload_bytes(item) for item in value.values())
    if isinstance(value, (tuple, list)):
        return sum(flower_payload_bytes(item) for item in value)
    return payload_bytes(value)


# --- fedpeft --------------------------------------------------------------------------------


def ours_round(num_sites: int, length: int, k: int, t: int) -> dict[str, Any]:
    """One round of fedpeft's SecAgg+, every node in this process."""
    ids = list(range(1, num_sites + 1))
    server = SecAggServer(
        round_id=1,
        node_ids=ids,
        vector_length=length,
        clip=CLIP,
        num_neighbours=k,
        threshold=t,
    )
    clients = {node: SecAggClient(node_id=node) for node in ids}
    up, down = dict.fromkeys(ids, 0), dict.fromkeys(ids, 0)
    client_s = dict.fromkeys(ids, 0.0)

    def client_call(node: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        client_s[node] += time.perf_counter() - start
        return out

    for node, request in server.setup().items():
        reply = client_call(node, clients[node].setup, request)
        down[node] += payload_bytes(request)
        up[node] += payload_bytes(reply)
        server.receive_public_keys(reply)
    for node, request in server.share_keys().items():
        reply = client_call(node, clients[node].share_keys, request)
        down[node] += payload_bytes(request)
        up[node] += payload_bytes(reply)
        server.receive_encrypted_shares(reply)
    masking, sum_s = [], 0.0
    plain = np.zeros(length, dtype=np.float64)
    for node, request in server.collect_masked_vectors().items():
        update = update_for(node, length)
        plain += update
        rng = np.random.default_rng(node)
        start = time.perf_counter()
        masked = client_call(
            node, clients[node].collect_masked_vectors, request, update=update, rng=rng
        )
        masking.append(time.perf_counter() - start)
        down[node] += payload_bytes(request)
        up[node] += payload_bytes(masked)
        start = time.perf_counter()
        server.receive_masked_vector(masked)
        sum_s += time.perf_counter() - start
    start = time.perf_counter()
    requests = server.unmask()
    unmask_s = time.perf_counter() - start
    for node, request in requests.items():
        reply = client_call(node, clients[node].unmask, request)
        down[node] += payload_bytes(request)
        up[node] += payload_bytes(reply)
        server.receive_unmask_shares(reply)
    start = time.perf_counter()
    result = server.result()
    unmask_s += time.perf_counter() - start
    return {
        "client_masking_s": float(np.mean(masking)),
        "client_total_s": float(np.mean(list(client_s.values()))),
        "server_sum_s": sum_s,
        "server_unmask_s": unmask_s,
        "upload_bytes_per_site": float(np.mean(list(up.values()))),
        "download_bytes_per_site": float(np.mean(list(down.values()))),
        "masked_vector_bytes": int(masked.vector.nbytes),
        "masked_vector_dtype": str(masked.vector.dtype),
        "max_abs_error_of_mean": float(
            np.max(np.abs(result.total / num_sites - plain / num_sites))
        ),
    }


# --- Flower ---------------------------------------------------------------------------------


def flower_round(num_sites: int, length: int, k: int, t: int) -> dict[str, Any]:
    """One round of Flower 1.41's SecAgg+: its client stage functions, its server steps."""
    import importlib
    import random

    from flwr.app import ConfigRecord
    from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    ids = list(range(1, num_sites + 1))
    num_shares = k + 1
    states: dict[int, dict[str, Any]] = {node: {} for node in ids}
    up, down = dict.fromkeys(ids, 0), dict.fromkeys(ids, 0)
    client_s = dict.fromkeys(ids, 0.0)

    def client_stage(node: int, stage: str, configs: dict[str, Any], *extra: Any) -> Any:
        """What secaggplus_mod does for one message (state restored, stage run, state saved)."""
        down[node] += flower_payload_bytes({Key.STAGE: stage, **configs})
        state = mod.SecAggPlusState(**states[node])
        state.current_stage = stage
        state.nid = node if stage == Stage.SETUP else state.nid
        record = ConfigRecord(configs)
        start = time.perf_counter()
        if stage == Stage.SETUP:
            res = mod._setup(state, record)
        elif stage == Stage.SHARE_KEYS:
            res = mod._share_keys(state, record)
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            res = mod._collect_masked_vectors(state, record, *extra)
        else:
            res = mod._unmask(state, record)
        seconds = time.perf_counter() - start
        client_s[node] += seconds
        states[node] = dict(ConfigRecord(state.to_dict()))
        up[node] += flower_payload_bytes(res)
        return res, seconds

    # setup_stage: ring of ±num_shares//2 over a shuffled order (the node is its own neighbour)
    order = list(ids)
    random.shuffle(order)
    half = num_shares >> 1
    neighbours = {
        nid: {order[(i + off) % num_sites] for off in range(-half, half + 1)}
        for i, nid in enumerate(order)
    }
    setup_cfg = {
        Key.SAMPLE_NUMBER: num_sites,
        Key.SHARE_NUMBER: num_shares,
        Key.THRESHOLD: t,
        Key.CLIPPING_RANGE: CLIP,
        Key.TARGET_RANGE: FLOWER_QUANTIZATION_RANGE,
        Key.MOD_RANGE: FLOWER_MODULUS_RANGE,
        Key.MAX_WEIGHT: FLOWER_MAX_WEIGHT,
    }
    public_keys: dict[int, list[bytes]] = {}
    for node in ids:
        res, _ = client_stage(node, Stage.SETUP, dict(setup_cfg))
        public_keys[node] = [res[Key.PUBLIC_KEY_1], res[Key.PUBLIC_KEY_2]]
    # share_keys_stage
    fwd_ct: dict[int, list[bytes]] = {node: [] for node in ids}
    fwd_src: dict[int, list[int]] = {node: [] for node in ids}
    for node in ids:
        cfg = {str(j): public_keys[j] for j in neighbours[node]}
        res, _ = client_stage(node, Stage.SHARE_KEYS, cfg)
        for dst, ciphertext in zip(
            res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST], strict=True
        ):
            fwd_ct[dst].append(ciphertext)
            fwd_src[dst].append(node)
    # collect_masked_vectors_stage (each site's FitRes: its vector, num_examples = max_weight)
    masking, sum_s, masked_bytes = [], 0.0, 0
    plain = np.zeros(length, dtype=np.float64)
    aggregate = None
    for node in ids:
        update = update_for(node, length)
        plain += update
        fit_parameters = ndarrays_to_parameters([update])
        cfg = {Key.CIPHERTEXT_LIST: fwd_ct[node], Key.SOURCE_LIST: fwd_src[node]}
        res, seconds = client_stage(
            node, Stage.COLLECT_MASKED_VECTORS, cfg, int(FLOWER_MAX_WEIGHT), fit_parameters
        )
        masking.append(seconds)
        masked_bytes = sum(len(b) for b in res[Key.MASKED_PARAMETERS])
        start = time.perf_counter()
        vec = [bytes_to_ndarray(b) for b in res[Key.MASKED_PARAMETERS]]
        aggregate = vec if aggregate is None else parameters_addition(aggregate, vec)
        sum_s += time.perf_counter() - start
    assert aggregate is not None
    masked_dtype = str(vec[1].dtype)
    start = time.perf_counter()
    aggregate = parameters_mod(aggregate, FLOWER_MODULUS_RANGE)
    sum_s += time.perf_counter() - start
    # unmask_stage (no drops: every node reveals its neighbours' self-mask seed shares)
    active = set(ids)
    collected: dict[int, list[bytes]] = {node: [] for node in ids}
    for node in ids:
        cfg = {
            Key.ACTIVE_NODE_ID_LIST: list(neighbours[node] & active),
            Key.DEAD_NODE_ID_LIST: [],
        }
        res, _ = client_stage(node, Stage.UNMASK, cfg)
        for owner, share in zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST], strict=True):
            collected[owner].append(share)
    start = time.perf_counter()
    masked_vector = aggregate
    for nid, shares in collected.items():
        if len(shares) < t:
            raise RuntimeError("not enough shares")
        secret = combine_shares(shares)
        if nid in active:
            mask = pseudo_rand_gen(
                secret, FLOWER_MODULUS_RANGE, get_parameters_shape(masked_vector)
            )
            masked_vector = parameters_subtraction(masked_vector, mask)
        else:  # dropped nodes' pairwise masks (not reached: no drops here)
            for peer in neighbours[nid] - {nid}:
                key = generate_shared_key(
                    bytes_to_private_key(secret), bytes_to_public_key(public_keys[peer][0])
                )
                mask = pseudo_rand_gen(
                    key, FLOWER_MODULUS_RANGE, get_parameters_shape(masked_vector)
                )
                op = parameters_addition if nid > peer else parameters_subtraction
                masked_vector = op(masked_vector, mask)
    recon = parameters_mod(masked_vector, FLOWER_MODULUS_RANGE)
    q_total_ratio, recon = factor_extract(recon)
    inv_dq_total_ratio = FLOWER_QUANTIZATION_RANGE / q_total_ratio
    aggregated = dequantize(recon, CLIP, FLOWER_QUANTIZATION_RANGE)
    offset = -(len(active) - 1) * CLIP
    for vec in aggregated:
        vec += offset
        vec *= inv_dq_total_ratio
    unmask_s = time.perf_counter() - start
    return {
        "client_masking_s": float(np.mean(masking)),
        "client_total_s": float(np.mean(list(client_s.values()))),
        "server_sum_s": sum_s,
        "server_unmask_s": unmask_s,
        "upload_bytes_per_site": float(np.mean(list(up.values()))),
        "download_bytes_per_site": float(np.mean(list(down.values()))),
        "masked_vector_bytes": int(masked_bytes),
        "masked_vector_dtype": masked_dtype,
        "max_abs_error_of_mean": float(np.max(np.abs(aggregated[0] - plain / num_sites))),
    }


def compare_in_process(sites: list[int], sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for num_sites in sites:
        k = default_num_neighbours(num_sites)
        t = default_threshold(k)
        for length in sizes:
            runs: dict[str, list[dict[str, Any]]] = {"ours": [], "flower": []}
            for _ in range(repeats):  # interleaved: a busy machine slows both alike
                runs["ours"].append(ours_round(num_sites, length, k, t))
                runs["flower"].append(flower_round(num_sites, length, k, t))
            row: dict[str, Any] = {
                "sites": num_sites,
                "vector_length": length,
                "num_neighbours": k,
                "threshold": t,
                "plain_float32_update_bytes": 4 * length,
                "repeats": repeats,
            }
            for name, results in runs.items():
                row[name] = {
                    key: (
                        statistics.median(r[key] for r in results)
                        if isinstance(results[0][key], float)
                        else results[0][key]
                    )
                    for key in results[0]
                }
                row[name]["upload_vs_plain"] = row[name]["upload_bytes_per_site"] / (4 * length)
                row[name]["masked_vector_vs_plain"] = row[name]["masked_vector_bytes"] / (
                    4 * length
                )
            ours, fl = row["ours"], row["flower"]
            row["flower_over_ours"] = {
                key: fl[key] / ours[key]
                for key in (
                    "client_masking_s",
                    "client_total_s",
                    "server_sum_s",
                    "server_unmask_s",
                    "upload_bytes_per_site",
                    "download_bytes_per_site",
                )
            }
            rows.append(row)
            print(
                f"n={num_sites:>3} L={length:>9,} k={k:>2} t={t:>2} | client mask "
                f"{ours['client_masking_s'] * 1e3:7.1f} ms vs Flower "
                f"{fl['client_masking_s'] * 1e3:7.1f} ms | server unmask "
                f"{ours['server_unmask_s'] * 1e3:7.1f} ms vs {fl['server_unmask_s'] * 1e3:7.1f} ms"
                f" | up/site {ours['upload_vs_plain']:.3f}x vs {fl['upload_vs_plain']:.3f}x plain",
                flush=True,
            )
    return rows


# --- the DP round the client cost is compared with -----------------------------------------


def dp_round_seconds(quick: bool, saved: Path) -> dict[str, Any]:
    """Seconds of one local DP round (MiniLM, 10 steps of batch 32, DP hooks)."""
    if not quick and saved.is_file():
        report = json.loads(saved.read_text())
        if report.get("model") == "minilm" and report.get("batch_size") == DP_BATCH:
            per_step = statistics.median(report["seconds"]["dp_hooks"]) / report["steps_per_round"]
            return {
                "seconds": per_step * DP_STEPS,
                "source": f"{saved.name} (median dp_hooks round / steps x {DP_STEPS})",
                "model": "minilm",
            }
    import torch

    from fedpeft.client.train import DPSettings, train_local
    from fedpeft.config import compose_config
    from fedpeft.data import load_dataset, tokenize
    from fedpeft.model import build_model, get_flat

    steps = 2 if quick else DP_STEPS
    overrides = [f"train.batch_size={DP_BATCH}", f"train.local_steps={steps}"]
    if quick:
        overrides.append("model=tiny_bert")
    config = compose_config(overrides)
    loaded = build_model(config.model, config.lora, seed=0)
    table = load_dataset(config.data, "classification", seed=0).select(range(512))
    data = tokenize(
        table,
        loaded.tokenizer,
        config=config.data,
        task="classification",
        max_length=config.model.max_length,
    )
    # Opacus's note about torch generators fedpeft does not draw from (fedpeft/privacy/dp.py,
    # "Randomness") and torch's about hooks on LoRA layers, once per step; both filters match
    # one message each and end with this block.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        result = train_local(
            loaded,
            data,
            global_flat=get_flat(loaded.peft_model, loaded.layout),
            trained_names=loaded.layout.names,
            config=config.train,
            device=torch.device("cpu"),
            seed=0,
            dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, clipping="hooks"),
        )
    return {
        "seconds": result.seconds * DP_STEPS / steps,
        "source": f"measured here: one train_local round, {steps} steps, scaled to {DP_STEPS}",
        "model": config.model.loader,
    }


# --- whole rounds in simulation -------------------------------------------------------------


def adapter_floats(overrides: list[str]) -> int:
    """Floats in the simulated model's adapter (all trained and sent under fedavg)."""
    from fedpeft.config import compose_config
    from fedpeft.model import build_model

    config = compose_config(["experiment=tiny_classification", "data.path=unused.csv", *overrides])
    return build_model(config.model, config.lora, seed=config.seed).layout.size


def run_fedpeft_sim(
    csv_path: Path, out: Path, *, secure: bool, sites: int, rounds: int, model: list[str]
) -> list[float]:
    """Seconds of rounds 2..R of one ``fedpeft simulate`` in a fresh process."""
    overrides = [
        "experiment=tiny_classification",
        f"data.path={csv_path}",
        *model,
        f"federation.num_sites={sites}",
        f"federation.min_sites={sites}",
        f"federation.rounds={rounds}",
        "train.num_threads=1",  # one torch thread: stable timings on a shared 2-core machine
        f"secagg.enabled={'true' if secure else 'false'}",
        f"output_dir={out}",
    ]
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=offline_env(), timeout=900)
    metrics = out / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.is_file():
        raise RuntimeError(f"simulation failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [r.seconds for r in read_rounds(metrics)[1:]]


def run_flower_sim(out: Path, *, secure: bool, sites: int, rounds: int, length: int) -> list[float]:
    """Seconds of rounds 2..R of Flower's legacy (SecAgg+) workflow in a fresh process."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.secagg_vs_flower",
        "--flower-sim-child",
        json.dumps(
            {
                "secure": secure,
                "sites": sites,
                "rounds": rounds,
                "length": length,
                "out": str(out),
            }
        ),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=offline_env(), timeout=900, cwd=HERE.parent
    )
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"Flower simulation failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    starts = json.loads(out.read_text())["round_starts"]
    return [b - a for a, b in zip(starts[1:-1], starts[2:], strict=True)]


def flower_sim_child(spec: dict[str, Any]) -> None:
    """Flower 1.41's legacy API: FedAvg + DefaultWorkflow(SecAggPlusWorkflow) + secaggplus_mod."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    from fedpeft.config import compose_config
    from fedpeft.simulation import federation_config

    sites, rounds, length = int(spec["sites"]), int(spec["rounds"]), int(spec["length"])
    starts: list[float] = []

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
            starts.append(time.perf_counter())
            return super().configure_fit(server_round, parameters, client_manager)

    class Site(NumPyClient):
        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            rng = np.random.default_rng()
            new = [p + rng.normal(0, 1e-3, p.shape).astype(np.float32) for p in parameters]
            return new, 100, {}

        def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
            return float(np.mean(parameters[0] ** 2)), 10, {}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return Site().to_client()

    client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if spec["secure"] else [])
    initial = ndarrays_to_parameters([np.zeros(length, dtype=np.float32)])
    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=sites,
        min_evaluate_clients=sites,
        min_available_clients=sites,
        initial_parameters=initial,
    )
    server_app = ServerApp()
    k = default_num_neighbours(sites)

    @server_app.main()
    def main(grid, context):  # type: ignore[no-untyped-def]
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        fit = (
            SecAggPlusWorkflow(
                num_shares=k + 1,
                reconstruction_threshold=default_threshold(k),
                clipping_range=CLIP * 8,  # Flower sums weights, not deltas: its default range
            )
            if spec["secure"]
            else None
        )
        DefaultWorkflow(fit_workflow=fit)(grid, legacy)
        starts.append(time.perf_counter())

    # Flower's own baseline keeps its Python entry (what its SecAgg+ example runs), with the
    # Ray settings fedpeft's simulation sends Flower in its federation config.
    fed = federation_config(compose_config([]))
    backend = {
        "client_resources": {
            "num_cpus": fed["client-resources-num-cpus"],
            "num_gpus": fed["client-resources-num-gpus"],
        },
        "init_args": {
            "num_cpus": fed["init-args-num-cpus"],
            "logging_level": fed["init-args-logging-level"],
            "log_to_driver": fed["init-args-log-to-driver"],
        },
    }
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=sites,
        backend_config=backend,  # type: ignore[arg-type]
    )
    Path(spec["out"]).write_text(json.dumps({"round_starts": starts}))


def compare_simulation(quick: bool, repeats: int, rounds: int, with_flower: bool) -> dict[str, Any]:
    sites = 3 if quick else 10
    model = [] if quick else SIM_MODEL
    floats = adapter_floats(model)
    print(
        f"simulation: {sites} sites, {rounds} rounds, adapter {floats:,} floats "
        f"({' '.join(model) or 'tiny_bert defaults'})",
        flush=True,
    )
    seconds: dict[str, list[float]] = {"ours_plain": [], "ours_secure": []}
    if with_flower:
        seconds.update(flower_plain=[], flower_secure=[])
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="secagg-sim-") as tmp:
        csv_path = write_classification_csv(Path(tmp) / "data.csv", n=100 * sites)
        for repeat in range(repeats):
            for name in list(seconds):
                out = Path(tmp) / f"{name}-{repeat}"
                start = time.perf_counter()
                try:
                    if name.startswith("ours"):
                        got = run_fedpeft_sim(
                            csv_path,
                            out,
                            secure=name.endswith("secure"),
                            sites=sites,
                            rounds=rounds,
                            model=model,
                        )
                    else:
                        got = run_flower_sim(
                            out.with_suffix(".json"),
                            secure=name.endswith("secure"),
                            sites=sites,
                            rounds=rounds,
                            length=floats,
                        )
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    errors[name] = str(err)[-2000:]
                    print(f"  {name}: FAILED ({str(err).splitlines()[0]})", flush=True)
                    continue
                seconds[name].extend(got)
                took = time.perf_counter() - start
                print(
                    f"  repeat {repeat + 1}/{repeats} {name:13s} rounds 2..{rounds}: "
                    f"{statistics.median(got):.2f} s/round (process {took:.0f} s)",
                    flush=True,
                )
    median = {name: statistics.median(s) for name, s in seconds.items() if s}
    report: dict[str, Any] = {
        "sites": sites,
        "rounds": rounds,
        "timed_rounds": f"2..{rounds}",
        "adapter_floats": floats,
        "model_overrides": ["experiment=tiny_classification", *model],
        "seconds_per_round": seconds,
        "median_seconds_per_round": median,
        "errors": errors,
    }
    if "ours_plain" in median and "ours_secure" in median:
        report["ours_secure_over_plain"] = median["ours_secure"] / median["ours_plain"]
        report["ours_added_seconds"] = median["ours_secure"] - median["ours_plain"]
    if "flower_plain" in median and "flower_secure" in median:
        report["flower_secure_over_plain"] = median["flower_secure"] / median["flower_plain"]
        report["flower_added_seconds"] = median["flower_secure"] - median["flower_plain"]
        report["flower_note"] = (
            "Flower's clients do no training (parameters + tiny noise, trivial evaluate); "
            "compare added seconds per round, not the ratio, with fedpeft's rows"
        )
    return report


# --- targets ------------------------------------------------------------------------------


def targets(rows: list[dict[str, Any]], sim: dict[str, Any], dp: dict[str, Any]) -> dict[str, Any]:
    def at(n: int, size: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["sites"] == n and r["vector_length"] == size), None)

    small = min(r["vector_length"] for r in rows)
    default_row = at(5, small) or rows[0]
    client_fraction = default_row["ours"]["client_total_s"] / dp["seconds"]
    out: dict[str, Any] = {
        "bytes_per_site_vs_plain": {
            "target": "<= 1.0x plain float32 update (Flower: 2x)",
            "ours_masked_vector": max(r["ours"]["masked_vector_vs_plain"] for r in rows),
            "ours_upload_total_max": max(r["ours"]["upload_vs_plain"] for r in rows),
            "flower_masked_vector": max(r["flower"]["masked_vector_vs_plain"] for r in rows),
            "flower_upload_total_max": max(r["flower"]["upload_vs_plain"] for r in rows),
        },
        "client_cost_vs_dp_round": {
            "target": "<= 5% of one local DP round of the embedded default",
            "sites": default_row["sites"],
            "vector_length": default_row["vector_length"],
            "client_total_s": default_row["ours"]["client_total_s"],
            "dp_round_s": dp["seconds"],
            "fraction": client_fraction,
            "met": client_fraction <= 0.05,
        },
        "faster_than_flower": {
            "target": "faster than Flower's SecAgg+ at equal n and size",
            "client_total_all": all(r["flower_over_ours"]["client_total_s"] > 1 for r in rows),
            "server_unmask_all": all(r["flower_over_ours"]["server_unmask_s"] > 1 for r in rows),
            "min_client_speedup": min(r["flower_over_ours"]["client_total_s"] for r in rows),
            "min_server_unmask_speedup": min(
                r["flower_over_ours"]["server_unmask_s"] for r in rows
            ),
        },
    }
    out["bytes_per_site_vs_plain"]["met"] = (
        out["bytes_per_site_vs_plain"]["ours_masked_vector"] <= 1.0
    )
    ratio = sim.get("ours_secure_over_plain")
    out["simulated_round_vs_plain"] = {
        "target": "<= 1.5x the same round without secure aggregation (10 sites, ~100k floats)",
        "ratio": ratio,
        "met": None if ratio is None else ratio <= 1.5,
    }
    return out


# --- README section: its part of benchmarks/README.md (benchmarks.report assembles it) ---

PLOT = "secagg_vs_flower.png"


def _plotted(report: dict[str, Any]) -> bool:
    """Cost against n is plotted only when the results hold more than one n."""
    return len({r["sites"] for r in report["in_process"]}) > 1


def plots(report: dict[str, Any], results: Path) -> list[Path]:
    """Draw ``results/secagg_vs_flower.png`` (when there is more than one n); the plots drawn."""
    if not _plotted(report):
        return []
    plot(report, results / PLOT)
    return [results / PLOT]


def plot(report: dict[str, Any], path: Path) -> None:
    """Client time and server unmasking time against n, one line per framework and L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["in_process"]
    sizes = sorted({r["vector_length"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [
        ("client_total_s", "client time per site, all stages (s)"),
        ("server_unmask_s", "server unmasking time (s)"),
    ]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for size, colour in zip(sizes, ("tab:blue", "tab:orange", "tab:green"), strict=False):
            sub = sorted((r for r in rows if r["vector_length"] == size), key=lambda r: r["sites"])
            n = [r["sites"] for r in sub]
            ax.plot(
                n, [r["ours"][key] for r in sub], "-o", color=colour, label=f"fedpeft L={size:,}"
            )
            ax.plot(
                n, [r["flower"][key] for r in sub], "--s", color=colour, label=f"Flower L={size:,}"
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(
            sorted({r["sites"] for r in rows}), [str(s) for s in sorted({r["sites"] for r in rows})]
        )
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("sites in the round (n)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "SecAgg+ cost: fedpeft (solid) vs Flower 1.41 (dashed), same n, k, t, vectors", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(report: dict[str, Any], results: Path, readme: Path) -> list[str]:
    """The comparison, the simulated rounds and the targets; the plot linked from ``readme``."""
    img = os.path.relpath(results / PLOT, readme.parent) if _plotted(report) else None
    return [*_comparison(report, img), *_targets(report)]


def _comparison(report: dict[str, Any], img: str | None) -> list[str]:
    rows = report["in_process"]
    out = ["## Secure aggregation: fedpeft vs Flower's SecAgg+ (`secagg_vs_flower.py`)", ""]
    out.append(
        "One SecAgg+ round with every node in one process, no drop-outs, the same `n`, "
        "neighbours `k`, threshold `t`, clipping range and float32 vectors for both; Flower "
        f"{report.get('flwr', '')} is driven through its own client stage functions "
        "(`secaggplus_mod`) and its workflow's server steps. Client time covers all four stages "
        "per site; bytes are protocol payloads (no transport framing)."
    )
    out.append("")
    table = []
    for r in rows:
        o, f = r["ours"], r["flower"]
        table.append(
            [
                str(r["sites"]),
                f"{r['vector_length']:,}",
                f"{r['num_neighbours']}/{r['threshold']}",
                md.ms(o["client_total_s"]),
                md.ms(f["client_total_s"]),
                f"{r['flower_over_ours']['client_total_s']:.1f}×",
                md.ms(o["server_unmask_s"]),
                md.ms(f["server_unmask_s"]),
                f"{r['flower_over_ours']['server_unmask_s']:.1f}×",
                f"{o['upload_vs_plain']:.3f}× / {f['upload_vs_plain']:.3f}×",
                f"{o['masked_vector_dtype']} / {f['masked_vector_dtype']}",
            ]
        )
    out.append(
        md.table(
            [
                "n",
                "L",
                "k/t",
                "client, fedpeft",
                "client, Flower",
                "Flower ÷ fedpeft",
                "unmask, fedpeft",
                "unmask, Flower",
                "Flower ÷ fedpeft",
                "upload ÷ plain fp32 (fedpeft / Flower)",
                "masked dtype",
            ],
            table,
        )
    )
    out.append("")
    if img:
        out += [f"![SecAgg+ cost vs n]({img})", ""]
    sim = report.get("simulation", {})
    med = sim.get("median_seconds_per_round", {})
    if med:
        out.append(
            f"Whole rounds in Flower's simulation engine: {sim['sites']} sites, adapter "
            f"{sim['adapter_floats']:,} floats (`{' '.join(sim['model_overrides'])}`), rounds "
            f"{sim['timed_rounds']} timed from `metrics.jsonl` (train + evaluate exchanges), one "
            "torch thread per site, each variant in its own process."
        )
        out.append("")
        table = []
        for name, label in (
            ("ours_plain", "fedpeft, plain"),
            ("ours_secure", "fedpeft, secagg.enabled=true"),
            ("flower_plain", "Flower legacy FedAvg (no training)"),
            ("flower_secure", "Flower legacy SecAgg+ workflow (no training)"),
        ):
            if name in med:
                base = med.get(name.replace("secure", "plain"))
                table.append(
                    [
                        label,
                        f"{med[name]:.2f}",
                        f"{med[name] / base:.2f}×" if base else "",
                        f"{med[name] - base:+.2f} s" if base and name.endswith("secure") else "",
                    ]
                )
        out.append(md.table(["variant", "s / round", "÷ plain", "added"], table))
        out.append("")
        if "flower_note" in sim:
            out += [f"Flower's rows: {sim['flower_note']}.", ""]
    for name, err in sim.get("errors", {}).items():
        out += [f"`{name}` failed: `{err.splitlines()[0] if err else ''}`", ""]
    return out


def _targets(report: dict[str, Any]) -> list[str]:
    t = report["targets"]
    b, c, f, s = (
        t["bytes_per_site_vs_plain"],
        t["client_cost_vs_dp_round"],
        t["faster_than_flower"],
        t["simulated_round_vs_plain"],
    )
    dp = report.get("dp_round", {})
    rows = [
        [
            "bytes per site ≤ 1.0× plain fp32 update (Flower: 2×)",
            f"masked vector {b['ours_masked_vector']:.2f}× "
            f"(Flower {b['flower_masked_vector']:.2f}×); whole upload ≤ "
            f"{b['ours_upload_total_max']:.3f}× (Flower "
            f"{b['flower_upload_total_max']:.3f}×)",
            (md.verdict(b["met"]) + " for the masked vector; keys and shares add the rest")
            if b["ours_upload_total_max"] > 1
            else md.verdict(b["met"]),
        ],
        [
            "client cost ≤ 5% of a local DP round",
            f"{md.ms(c['client_total_s'])} per site (n={c['sites']}, L={c['vector_length']:,}) vs "
            f"{c['dp_round_s']:.1f} s DP round = {100 * c['fraction']:.2f}% "
            f"({dp.get('source', '')})",
            md.verdict(c["met"]),
        ],
        [
            "simulated round ≤ 1.5× without secure aggregation",
            f"{s['ratio']:.2f}×" if s["ratio"] is not None else "not measured",
            md.verdict(s["met"]),
        ],
        [
            "faster than Flower's SecAgg+ at equal n and size",
            f"client ≥ {f['min_client_speedup']:.1f}×, server unmask ≥ "
            f"{f['min_server_unmask_speedup']:.1f}× faster",
            md.verdict(f["client_total_all"] and f["server_unmask_all"]),
        ],
    ]
    return ["### Targets", "", md.table(["target", "measured", ""], rows), ""]


def _row(rows: list[dict[str, Any]], sites: int, length: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["sites"] == sites and r["vector_length"] == length), None)


def headline_rows(report: dict[str, Any]) -> list[list[str]]:
    """This benchmark's rows of the README's headline table."""
    rows: list[list[str]] = []
    inp = report["in_process"]
    for n, length in ((5, 75_000), (100, 1_000_000)):
        r = _row(inp, n, length)
        if r:
            rows.append(
                [
                    f"SecAgg+ client time per site, n={n}, L={length:,}",
                    md.ms(r["ours"]["client_total_s"]),
                    md.ms(r["flower"]["client_total_s"]),
                    f"{r['flower_over_ours']['client_total_s']:.1f}× faster",
                ]
            )
            rows.append(
                [
                    f"SecAgg+ server unmasking, n={n}, L={length:,}",
                    md.ms(r["ours"]["server_unmask_s"]),
                    md.ms(r["flower"]["server_unmask_s"]),
                    f"{r['flower_over_ours']['server_unmask_s']:.1f}× faster",
                ]
            )
    b = report["targets"]["bytes_per_site_vs_plain"]
    rows.append(
        [
            "SecAgg+ upload per site ÷ plain fp32 update",
            f"{b['ours_upload_total_max']:.3f}×",
            f"{b['flower_upload_total_max']:.3f}×",
            "uint32 vs int64 masked vectors",
        ]
    )
    sim = report.get("simulation", {})
    if "ours_secure_over_plain" in sim:
        rows.append(
            [
                f"simulated round, secure ÷ plain ({sim['sites']} sites, "
                f"{sim['adapter_floats']:,} floats)",
                f"{sim['ours_secure_over_plain']:.2f}× ({sim['ours_added_seconds']:+.2f} s)",
                f"{sim['flower_secure_over_plain']:.2f}× ({sim['flower_added_seconds']:+.2f} s)"
                if "flower_secure_over_plain" in sim
                else "not run",
                "Flower's clients do not train",
            ]
        )
    c = report["targets"]["client_cost_vs_dp_round"]
    rows.append(
        [
            "SecAgg+ client cost ÷ one local DP round",
            f"{100 * c['fraction']:.2f}%",
            "",
            f"DP round {c['dp_round_s']:.1f} s",
        ]
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 5, L = 10k, 3-site sims")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved in-process repeats")
    parser.add_argument("--sim-repeats", type=int, default=1, help="simulations per variant")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per simulation")
    parser.add_argument("--no-flower-sim", action="store_true", help="skip Flower's simulation")
    parser.add_argument("--no-sim", action="store_true", help="skip all simulations")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--dp-json",
        type=Path,
        default=HERE / "results" / "dp_throughput.json",
        help="dp_throughput.py results to take the DP round time from (else measured)",
    )
    parser.add_argument("--flower-sim-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flower_sim_child:
        flower_sim_child(json.loads(args.flower_sim_child))
        return
    sites = [5] if args.quick else [5, 20, 100]
    sizes = [10_000] if args.quick else [75_000, 1_000_000]
    started = time.perf_counter()
    import flwr

    rows = compare_in_process(sites, sizes, repeats=1 if args.quick else args.repeats)
    dp = dp_round_seconds(args.quick, args.dp_json)
    print(f"DP round: {dp['seconds']:.2f} s ({dp['source']})", flush=True)
    sim: dict[str, Any] = {"skipped": "--no-sim"}
    if not args.no_sim:
        sim = compare_simulation(
            args.quick,
            repeats=1 if args.quick else args.sim_repeats,
            rounds=2 if args.quick else args.rounds,
            with_flower=not args.no_flower_sim,
        )
    report = {
        "benchmark": "secagg_vs_flower",
        "quick": args.quick,
        "flwr": flwr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "clip": CLIP,
        "flower_settings": {
            "quantization_range": FLOWER_QUANTIZATION_RANGE,
            "modulus_range": FLOWER_MODULUS_RANGE,
            "max_weight": FLOWER_MAX_WEIGHT,
            "num_shares": "k + 1",
        },
        "in_process": rows,
        "dp_round": dp,
        "simulation": sim,
        "targets": targets(rows, sim, dp),
        "seconds": time.perf_counter() - started,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["targets"], indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
