"""Cost of fedpeft's SecAgg+ protocol, all nodes simulated in one process.

For each number of sites ``n`` and update length ``L`` this runs one full round of
:mod:`fedpeft.privacy.secagg` twice, once with every site completing and once with
``max(1, n // 10)`` sites dropping out after sharing their keys (so the server must reconstruct
their mask keys and remove their pairwise masks), and records:

* client masking time: mean seconds per site of ``SecAggClient.collect_masked_vectors``
  (decrypting the neighbours' shares, quantising, adding the self mask and ``k`` pairwise masks);
* server unmasking time: seconds of ``SecAggServer.unmask`` + ``result`` (Shamir
  reconstruction, regenerating and removing the masks, dequantisation);
* bytes per site: payload bytes of the messages a site uploads and downloads over the round
  (raw bytes, arrays and 8 bytes per int or float; transport framing excluded), beside the
  4 * L bytes of a plain float32 update.

Usage::

    python -m benchmarks.secagg_primitives            # n in {5, 20, 100}, L in {75_000, 1_000_000}
    python -m benchmarks.secagg_primitives --quick    # n = 5, L = 75_000 only

Results are printed and written as JSON to ``benchmarks/results/secagg_primitives.json``;
:func:`section` renders them as this benchmark's part of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cryptography
import numpy as np

from benchmarks import markdown as md
from fedpeft.privacy.quantize import QuantizationParams
from fedpeft.privacy.secagg import SecAggClient, SecAggServer

_DEFAULT_OUT = Path(__file__).parent / "results" / "secagg_primitives.json"
_CLIP = 1.0


def payload_bytes(value: Any) -> int:
    """Bytes a message carries: raw bytes, array buffers, 8 per number, summed over fields."""
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (bool, int, float)):
        return 8
    if isinstance(value, QuantizationParams):
        return 24  # clip, num_summands, bits
    if isinstance(value, Mapping):
        return sum(8 + payload_bytes(item) for item in value.values())
    if isinstance(value, (tuple, list)):
        return sum(payload_bytes(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(payload_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    raise TypeError(f"cannot size a {type(value).__name__}")


def run_round(num_sites: int, length: int, *, num_dropped: int) -> dict[str, Any]:
    """One in-process round; returns timings, bytes and the error against the plain sum."""
    ids = list(range(1, num_sites + 1))
    server = SecAggServer(round_id=1, node_ids=ids, vector_length=length, clip=_CLIP)
    clients = {node: SecAggClient(node_id=node) for node in ids}
    up = dict.fromkeys(ids, 0)
    down = dict.fromkeys(ids, 0)
    dropped = set(ids[:num_dropped])

    for node, request in server.setup().items():
        reply = clients[node].setup(request)
        down[node] += payload_bytes(request)
        up[node] += payload_bytes(reply)
        server.receive_public_keys(reply)
    for node, share_request in server.share_keys().items():
        shares = clients[node].share_keys(share_request)
        down[node] += payload_bytes(share_request)
        up[node] += payload_bytes(shares)
        server.receive_encrypted_shares(shares)

    masking_seconds = []
    plain = np.zeros(length, dtype=np.float64)
    for node, vector_request in server.collect_masked_vectors().items():
        down[node] += payload_bytes(vector_request)
        if node in dropped:
            continue
        rng = np.random.default_rng(node)
        update = rng.uniform(-_CLIP, _CLIP, length).astype(np.float32)
        plain += update
        start = time.perf_counter()
        masked = clients[node].collect_masked_vectors(vector_request, update=update, rng=rng)
        masking_seconds.append(time.perf_counter() - start)
        up[node] += payload_bytes(masked)
        server.receive_masked_vector(masked)

    start = time.perf_counter()
    unmask_requests = server.unmask()
    unmask_seconds = time.perf_counter() - start
    for node, unmask_request in unmask_requests.items():
        answer = clients[node].unmask(unmask_request)
        down[node] += payload_bytes(unmask_request)
        up[node] += payload_bytes(answer)
        server.receive_unmask_shares(answer)
    start = time.perf_counter()
    result = server.result()
    unmask_seconds += time.perf_counter() - start

    survivors = [node for node in ids if node not in dropped]
    return {
        "sites": num_sites,
        "vector_length": length,
        "num_neighbours": server.num_neighbours,
        "threshold": server.threshold,
        "dropped_after_share_keys": num_dropped,
        "client_masking_s_mean": float(np.mean(masking_seconds)),
        "client_masking_s_max": float(np.max(masking_seconds)),
        "server_unmasking_s": unmask_seconds,
        "upload_bytes_per_site": float(np.mean([up[node] for node in survivors])),
        "download_bytes_per_site": float(np.mean([down[node] for node in survivors])),
        "masked_vector_bytes": 4 * length,
        "plain_float32_update_bytes": 4 * length,
        "max_abs_error": float(np.max(np.abs(result.total - plain))),
        "error_bound": len(result.included) / server.quantization.scale,
    }


# --- README section: its part of benchmarks/README.md (benchmarks.report assembles it) ---


def section(report: dict[str, Any]) -> list[str]:
    """Client masking, server unmasking and upload per n, L and drop-outs."""
    out = ["## fedpeft SecAgg+ with drop-outs (`secagg_primitives.py`)", ""]
    table = [
        [
            str(r["sites"]),
            f"{r['vector_length']:,}",
            str(r["dropped_after_share_keys"]),
            md.ms(r["client_masking_s_mean"]),
            md.ms(r["server_unmasking_s"]),
            f"{r['upload_bytes_per_site'] / r['plain_float32_update_bytes']:.3f}×",
        ]
        for r in report["results"]
    ]
    header = ["n", "L", "dropped", "client masking", "server unmasking", "upload ÷ plain"]
    return [*out, md.table(header, table), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only n = 5 sites, L = 75_000")
    parser.add_argument("--out", type=Path, default=_DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args()
    sizes = [75_000] if args.quick else [75_000, 1_000_000]
    sites = [5] if args.quick else [5, 20, 100]

    results = []
    for num_sites in sites:
        for length in sizes:
            for num_dropped in (0, max(1, num_sites // 10)):
                row = run_round(num_sites, length, num_dropped=num_dropped)
                results.append(row)
                print(
                    f"n={num_sites:>3} L={length:>9,} k={row['num_neighbours']:>2} "
                    f"t={row['threshold']:>2} dropped={num_dropped:>2}  "
                    f"mask {row['client_masking_s_mean'] * 1e3:8.1f} ms/site  "
                    f"unmask {row['server_unmasking_s'] * 1e3:8.1f} ms  "
                    f"up {row['upload_bytes_per_site'] / 1e6:7.3f} MB/site  "
                    f"down {row['download_bytes_per_site'] / 1e3:7.1f} kB/site  "
                    f"err {row['max_abs_error']:.1e} (bound {row['error_bound']:.1e})",
                    flush=True,
                )
    report = {
        "benchmark": "secagg_primitives",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cryptography": cryptography.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "clip": _CLIP,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
