"""The model card: ``README.md`` in Hugging Face's format beside every adapter and export.

Built only from what the run directory already states — ``config.yaml``, ``metrics.jsonl``,
``privacy.json``, ``sites.json`` (what each site chose to declare) and the hashes of
:mod:`fedpeft.lineage` — so the card cannot say more than the run knows. It never prints a
site's example count: the only row count it shows is the one a site published in its node
config (``site-rows``); a site that declared nothing is "not declared".

:func:`render_card` is a pure function of those inputs; :func:`write_card` reads them from a
run directory. The YAML front matter follows Hugging Face's model-card metadata
(``base_model``, ``library_name``, ``license``, ``tags``, ``pipeline_tag``, ``datasets``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedpeft import constants as K
from fedpeft.config import FedPeftConfig, from_yaml
from fedpeft.lineage import BaseIdentity, adapter_sha256, base_identity
from fedpeft.server.rounds import RoundRecord, read_rounds

__all__ = [
    "CARD_FILE",
    "SITES_FILE",
    "CardInputs",
    "card_inputs",
    "parse_declaration",
    "render_card",
    "write_card",
]

CARD_FILE = "README.md"
SITES_FILE = "sites.json"  # written by fedpeft.server.rundir.RunDir.record_declarations
NOT_DECLARED = "not declared"
# Licence of a base model fedpeft knows (ASSETS.md); others are not recorded by fedpeft.
_KNOWN_LICENSES = {"minilm": "apache-2.0"}
_HUB_NAMES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}


@dataclass(frozen=True)
class CardInputs:
    """Everything a card states, as the run directory holds it."""

    config: FedPeftConfig
    rounds: list[RoundRecord]  # metrics.jsonl
    privacy: dict[str, Any]  # privacy.json ({} before the first round)
    sites: dict[str, dict[str, Any]]  # sites.json "sites": node id → {declared, last_round}
    base: BaseIdentity
    adapter_sha256: str | None
    layout: str  # "adapter" (PEFT folder with base/ beside it) or "merged"
    base_path: str | None  # the base the adapter's config names, relative to its folder
    custom_code: bool  # the base carries modeling_fedpeft.py (trust_remote_code)


def parse_declaration(values: Mapping[str, object], *, source: str) -> dict[str, str | int]:
    """The site-declaration entries of ``values`` (:data:`fedpeft.constants.SITE_DECLARATION_KEYS`),
    checked; other keys are ignored.

    ``source`` names where the values come from in the error ("node config", "site 3's reply").

    Raises
    ------
    ValueError
        If a text is empty or too long, or ``site-rows`` is not an integer >= 0.
    """
    out: dict[str, str | int] = {}
    limits = {K.NODE_SITE_DESCRIPTION: K.SITE_TEXT_MAX, K.NODE_SITE_LICENSE: K.SITE_LICENSE_MAX}
    for key, limit in limits.items():
        if key not in values:
            continue
        text = values[key]
        if not isinstance(text, str) or not text.strip() or len(text) > limit:
            raise ValueError(
                f"{source} {key}={str(text)[:60]!r}: must be text of 1 to {limit} characters; "
                f"shorten it or leave {key} out (the card then says {NOT_DECLARED!r})"
            )
        out[key] = text.strip()
    if K.NODE_SITE_ROWS in values:
        rows = values[K.NODE_SITE_ROWS]
        try:
            number = int(str(rows)) if not isinstance(rows, bool | float) else -1
        except ValueError:
            number = -1
        if number < 0:
            raise ValueError(
                f"{source} {K.NODE_SITE_ROWS}={rows!r}: must be an integer >= 0 (the row count "
                f"the site chooses to publish); leave it out to publish none"
            )
        out[K.NODE_SITE_ROWS] = number
    return out


def _text(value: object) -> str:
    """``value`` safe inside a Markdown table cell: one line, no pipes, no HTML."""
    text = " ".join(str(value).split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _num(value: object, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return _text(value)


def _front_matter(inputs: CardInputs) -> str:
    config = inputs.config
    loader = config.model.loader
    task = config.model.task
    licenses = {
        str(s["declared"][K.NODE_SITE_LICENSE])
        for s in inputs.sites.values()
        if K.NODE_SITE_LICENSE in s.get("declared", {})
    }
    meta: dict[str, Any] = {}
    base_model = _HUB_NAMES.get(loader, inputs.base_path)
    if base_model is not None:  # a merged tiny or local model has no name outside this run
        meta["base_model"] = base_model
    meta |= {
        "library_name": "peft" if inputs.layout == "adapter" else "transformers",
        "license": _KNOWN_LICENSES.get(loader, "other"),
        "tags": [
            "federated-learning",
            "differential-privacy" if config.privacy.enabled else "no-differential-privacy",
            "lora",
            "fedpeft",
            *(["secure-aggregation"] if config.secagg.enabled else []),
            *(["base_model:adapter"] if inputs.layout == "adapter" else ["merged"]),
        ],
        "pipeline_tag": "text-classification" if task == "classification" else "text-generation",
    }
    if meta["license"] == "other":
        meta["license_name"] = "not-recorded"
    if licenses:
        meta["data_licenses"] = sorted(licenses)
    front = str(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
    return "---\n" + front + "---\n"


def _privacy_sentence(inputs: CardInputs) -> str:
    p = inputs.config.privacy
    sites = inputs.privacy.get("sites", {})
    if not p.enabled:
        return (
            "**No differential privacy**: this model was trained with `privacy.enabled=false`; "
            "it gives no formal protection to the sites' training examples."
        )
    epsilons = {n: s.get("epsilon") for n, s in sites.items() if s.get("epsilon") is not None}
    if not epsilons:
        return "Differential privacy was on, but no site has reported its ε yet."
    deltas = [s["delta"] for s in sites.values() if s.get("delta") is not None]
    delta = f"δ ≤ {max(deltas):.3g}" if deltas else "δ as each site set it"
    per_site = ", ".join(f"site {n}: ε = {float(e):.3g}" for n, e in sorted(epsilons.items()))
    return (
        f"**(ε ≤ {max(float(e) for e in epsilons.values()):.3g}, {delta})-differential privacy "
        "per training example at each site**: sample-level DP-SGD (Poisson sampling, "
        "per-example clipping, Gaussian noise) at the site, ε counted by each site's own "
        f"ledger over everything it released ({per_site}); the model is post-processing of "
        "those releases."
    )


def _privacy_full(inputs: CardInputs) -> list[str]:
    dp = inputs.privacy.get("differential_privacy", {})
    secagg = inputs.privacy.get("secure_aggregation", {})
    if not inputs.config.privacy.enabled:
        lines = ["- Differential privacy: off (`privacy.enabled=false`)."]
    else:
        lines = [
            f"- Unit of privacy: {_text(dp.get('unit', 'one training example at one site'))}.",
            f"- Coordinator's target: ε = {_num(inputs.config.privacy.epsilon)}, "
            f"δ = {_num(inputs.config.privacy.delta)} (a site's own ceiling and δ override it).",
        ]
    sites = inputs.privacy.get("sites", {})
    if sites:
        lines += [
            "",
            "| site | ε spent | ε ceiling | δ | accountant | σ (noise multiplier) | q "
            "(sampling rate) | steps | C (clip norm) | clipping | budget exhausted |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for node, s in sorted(sites.items()):
            cells = [
                node,
                s.get("epsilon"),
                s.get("epsilon_ceiling"),
                s.get("delta"),
                s.get("accountant"),
                s.get("noise_multiplier"),
                s.get("sampling_rate"),
                s.get("steps"),
                s.get("clip_norm"),
                s.get("clipping_mode"),
                s.get("budget_exhausted"),
            ]
            lines.append("| " + " | ".join(_num(c) for c in cells) + " |")
    if secagg.get("enabled"):
        # k and t as the server resolved them each round (metrics.jsonl), not the settings'
        # None ("SecAgg+'s default for the number of sampled sites")
        resolved = [r.secagg_params for r in inputs.rounds if r.secagg_params]

        def per_round(key: str) -> str:
            values = sorted({int(p[key]) for p in resolved})
            return " / ".join(str(v) for v in values) if values else _num(secagg.get(key))

        lines += [
            "",
            f"- Secure aggregation (SecAgg+): the coordinator saw {_text(secagg['server_sees'])}; "
            f"neighbours k = {per_round('num_neighbours')}, threshold t = "
            f"{per_round('threshold')} (as resolved in the rounds run), clip range "
            f"{_num(secagg.get('clip_range'))}, sites weighted {secagg.get('weighting')}.",
        ]
    else:
        seen = "noisy" if inputs.config.privacy.enabled else "un-noised"
        lines += ["", f"- Secure aggregation: off; the coordinator saw each site's {seen} update."]
    return lines


def _setup(inputs: CardInputs) -> list[str]:
    c = inputs.config
    fed, lora, train = c.federation, c.lora, c.train
    return [
        f"- Task: {c.model.task}"
        + (
            f", {c.model.num_labels} labels, head pooling `{c.model.pooling}`"
            if c.model.task == "classification"
            else ""
        )
        + f", max length {c.model.max_length}.",
        f"- Federation: {len(inputs.rounds)} of {fed.rounds} rounds written, {fed.num_sites} "
        f"sites, fraction {fed.fraction} per round, at least {fed.min_sites} per round.",
        f"- Strategy: `{c.strategy.name}` (server optimiser {c.strategy.server_optimizer}, "
        f"server lr {c.strategy.server_lr}).",
        f"- LoRA: r = {lora.r}, alpha = {lora.alpha}, dropout = {lora.dropout}, targets "
        f"{', '.join(f'`{t}`' for t in lora.target_modules)}"
        + (f", biases trained: `{lora.bias}`" if lora.bias != "none" else "")
        + f"; rounds train {', '.join(f'`{e}`' for e in train.trainable)} (the last repeats).",
        f"- Local training: {train.optimizer}, lr {train.lr}, {train.local_steps} steps of "
        f"batch {train.batch_size} per round.",
        f"- Seed {c.seed}; fedpeft configuration in the run's `config.yaml`.",
    ]


def _evaluation(inputs: CardInputs) -> list[str]:
    if not inputs.rounds:
        return ["No round has finished yet."]
    causal = inputs.config.model.task == "causal_lm"
    metric = "eval perplexity" if causal else "eval accuracy"
    lines = [
        "Held-out splits of the sites that trained each round"
        + (
            ", inside a secure sum (the coordinator learns only the mean)."
            if inputs.config.secagg.enabled
            else ", reported per site and averaged by the coordinator."
        )
        + " These figures are not differentially private and were not measured per group "
        "of people.",
        "",
        f"| round | sites replied | eval sites | eval loss | {metric} | ε max |",
        "|---|---|---|---|---|---|",
    ]
    for row in inputs.rounds:
        value = row.eval_perplexity if causal else row.eval_accuracy
        cells = [
            row.round,
            row.sites_replied,
            row.eval_sites,
            row.eval_loss,
            value,
            row.epsilon_max,
        ]
        lines.append("| " + " | ".join(_num(c) for c in cells) + " |")
    answered = [r for r in inputs.rounds if r.eval_generations]
    if causal and answered:
        lines += [
            "",
            f"Generated answers: {answered[-1].eval_generations} greedy answer(s) of the "
            f"global adapter after round {answered[-1].round} (at most "
            f"`train.eval_max_new_tokens`={inputs.config.train.eval_max_new_tokens} tokens) "
            "to the prompts sites published (node config `eval-prompts`) are in the run "
            "directory's `generations.jsonl` and `report.html`, every round's. They are not "
            "copied here: a site published its prompts to the federation, not with the model.",
        ]
    return lines


def _provenance(inputs: CardInputs) -> list[str]:
    lines = [
        "As each site declared it in its node config (`site-description`, `site-license`, "
        "`site-rows`); fedpeft publishes nothing else about a site's data, and no row "
        "count a site did not choose to publish.",
        "",
        "| site | description | licence | rows |",
        "|---|---|---|---|",
    ]
    if not inputs.sites:
        lines.append(
            f"| (no site contributed yet) | {NOT_DECLARED} | {NOT_DECLARED} | {NOT_DECLARED} |"
        )
    for node, entry in sorted(inputs.sites.items()):
        declared = entry.get("declared", {})
        cells = [
            node,
            declared.get(K.NODE_SITE_DESCRIPTION, NOT_DECLARED),
            declared.get(K.NODE_SITE_LICENSE, NOT_DECLARED),
            declared.get(K.NODE_SITE_ROWS, NOT_DECLARED),
        ]
        lines.append("| " + " | ".join(_text(c) for c in cells) + " |")
    return lines


def _loading(inputs: CardInputs) -> list[str]:
    classification = inputs.config.model.task == "classification"
    auto = "AutoModelForSequenceClassification" if classification else "AutoModelForCausalLM"
    remote = ", trust_remote_code=True" if inputs.custom_code else ""
    if inputs.layout == "adapter":
        code = [
            "from peft import PeftModel",
            f"from transformers import AutoTokenizer, {auto}",
            "",
            'folder = "path/to/this/folder"',
            f'base = {auto}.from_pretrained(f"{{folder}}/base"{remote})',
            "model = PeftModel.from_pretrained(base, folder)",
            'tokenizer = AutoTokenizer.from_pretrained(f"{folder}/base")',
        ]
        where = (
            "The base model, with the head the adapter was trained on, is the folder `base/` "
            "beside this adapter (in a run directory: `RUN_DIR/base/`, which may link to the "
            "original weights; `fedpeft export` copies real files). `adapter_config.json` "
            "names it relative to this folder."
        )
    else:
        code = [
            f"from transformers import AutoTokenizer, {auto}",
            "",
            f'model = {auto}.from_pretrained("path/to/this/folder"{remote})',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        ]
        where = "This folder holds the base model with the LoRA adapter merged in."
    if not classification:
        code += [
            "",
            "# the prompt as in training: the chat template's user turn when the tokenizer",
            '# has one, else "<bos>" + prompt + "\\n" (fedpeft.data.format_prompt)',
            'ids = tokenizer("Your prompt\\n", return_tensors="pt").input_ids',
            "if tokenizer.chat_template:",
            "    ids = tokenizer.apply_chat_template(",
            '        [{"role": "user", "content": "Your prompt"}],',
            '        add_generation_prompt=True, return_tensors="pt", return_dict=True,',
            "    ).input_ids",
            "elif tokenizer.bos_token_id is not None and ids[0, 0] != tokenizer.bos_token_id:",
            "    ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)",
            "out = model.generate(input_ids=ids, max_new_tokens=64, do_sample=False)",
            "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
        ]
        code.insert(0, "import torch")
    lines = [where, "", "```python", *code, "```"]
    if not classification:
        lines += ["", 'Or, with fedpeft installed: `fedpeft generate FOLDER "Your prompt"`.']
    if inputs.custom_code:
        lines += [
            "",
            "The classifier reads the masked mean of the last layer, not BERT's pooler: its "
            "code is `modeling_fedpeft.py` (torch and transformers only; read it before "
            "trusting it). Without `trust_remote_code=True` transformers refuses to load the "
            "model; do not load the adapter on another base (e.g. the plain BERT encoder): "
            "it would run on the pooler head and score wrongly without an error.",
        ]
    return lines


def _lineage(inputs: CardInputs) -> list[str]:
    b = inputs.base
    weights = ", ".join(f"`{n}` {h}" for n, h in sorted(b.weights_sha256.items())) or "none"
    lines = [
        f"- Base model: {_text(b.name)} (loader `{b.loader}`, {_text(b.source)}); weights "
        f"SHA-256: {weights}; settings SHA-256 {b.settings_sha256}.",
    ]
    if inputs.adapter_sha256:
        lines.append(f"- Adapter `adapter_model.safetensors` SHA-256: {inputs.adapter_sha256}.")
    return lines


_LIMITS = [
    "- Intended use: research and evaluation on tasks like the sites' own, by people who "
    "read this card; not decisions about individuals without a separate assessment.",
    "- Differential privacy protects each *training example* of a site, within the ε and δ "
    "above; it does not protect the population: the model is meant to learn what is common "
    "to the sites' data, and anything true of a group (a site, a hospital's patients) may be "
    "learnt and revealed.",
    "- What the model may still memorise: patterns that recur in many examples, and any "
    "example repeated often enough to exceed its per-example protection (duplicates count "
    "as separate examples); with privacy off, anything in the training data. The base model "
    "carries whatever its own training data held.",
    "- No claim is made about fairness, bias or performance per group of people: none was "
    "measured. The evaluation above is on the sites' held-out splits only.",
]


def render_card(inputs: CardInputs) -> str:
    """The whole ``README.md`` for ``inputs``."""
    title = "merged model" if inputs.layout == "merged" else "LoRA adapter"
    sections = [
        _front_matter(inputs),
        f"# {inputs.config.experiment_name}: federated {title} (fedpeft)",
        "",
        f"A {title} fine-tuned by federated learning with fedpeft: each site trained on data "
        "that never left it; only updates did.",
        "",
        "## Privacy guarantee",
        "",
        _privacy_sentence(inputs),
        "",
        "### In full",
        "",
        *_privacy_full(inputs),
        "",
        "## How to load",
        "",
        *_loading(inputs),
        "",
        "## Training setup",
        "",
        *_setup(inputs),
        "",
        "## Evaluation",
        "",
        *_evaluation(inputs),
        "",
        "## Data provenance",
        "",
        *_provenance(inputs),
        "",
        "## Intended use and limits",
        "",
        *_LIMITS,
        "",
        "## Lineage",
        "",
        *_lineage(inputs),
        "",
    ]
    return "\n".join(sections)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    payload = json.loads(path.read_text(encoding="utf-8"))
    return payload if isinstance(payload, dict) else {}


def card_inputs(
    run_dir: Path,
    *,
    layout: str,
    adapter_dir: Path | None = None,
    base_path: str | None = None,
) -> CardInputs:
    """What the run directory ``run_dir`` says, for a card of ``layout``."""
    config = from_yaml((run_dir / "config.yaml").read_text(encoding="utf-8"))
    adapter = adapter_dir if adapter_dir is not None else run_dir / "adapter"
    sha = adapter_sha256(adapter) if (adapter / "adapter_model.safetensors").is_file() else None
    return CardInputs(
        config=config,
        rounds=read_rounds(run_dir / "metrics.jsonl"),
        privacy=_read_json(run_dir / "privacy.json"),
        sites=dict(_read_json(run_dir / SITES_FILE).get("sites", {})),
        base=base_identity(config.model),
        adapter_sha256=sha,
        layout=layout,
        base_path=base_path,
        custom_code=config.model.task == "classification" and config.model.pooling == "mean",
    )


def write_card(folder: Path, run_dir: Path, *, layout: str, base_path: str | None = None) -> Path:
    """Write ``folder/README.md`` for the run in ``run_dir``; return its path.

    ``layout`` is ``"adapter"`` (``folder`` holds the adapter files, whose config names
    ``base_path``) or ``"merged"``.
    """
    if layout not in ("adapter", "merged"):
        raise ValueError(f"layout={layout!r}; allowed: 'adapter', 'merged'")
    adapter_dir = folder if layout == "adapter" else None
    inputs = card_inputs(run_dir, layout=layout, adapter_dir=adapter_dir, base_path=base_path)
    path = folder / CARD_FILE
    path.write_text(render_card(inputs), encoding="utf-8")
    return path
