"""Every name that crosses a process or network boundary, imported by both sides.

Message record keys, run-config keys (declared in ``pyproject.toml``
``[tool.flwr.app.config]``) and node-config keys (set by a site operator with
``flower-supernode --node-config``). Keeping them here means a renamed key cannot
silently desynchronise the ServerApp and the ClientApp.
"""

# --- run config (coordinator → everyone) -------------------------------------------------
RUN_OVERRIDES = "overrides"  # space-separated Hydra overrides, e.g. "federation.rounds=5"
RUN_RESUME_FROM = "resume-from"  # a run directory: continue that federation after its last round
# A whole composed configuration as YAML (``fedpeft simulate`` sends the object it checked);
# when set, ``overrides`` must be empty.
RUN_CONFIG = "config"
# ServerApp only: path (on the coordinator's machine) of its Ed25519 key; it signs every
# train and evaluate instruction with it (sites that name its public key check them).
RUN_COORDINATOR_KEY = "coordinator-key"
# What the coordinator declares about the SuperLink it started (the ServerApp cannot see it):
# e.g. transport-tls="on: fedpeft certs, ca.crt given to every site"; shown in report.html.
RUN_TRANSPORT_TLS = "transport-tls"
RUN_TRANSPORT_NODE_AUTH = "transport-node-auth"

# --- node config (site operator → its own ClientApp; never leaves the site) --------------
NODE_PARTITION_ID = "partition-id"  # set by Flower's simulation engine
NODE_NUM_PARTITIONS = "num-partitions"  # set by Flower's simulation engine
NODE_DATA_PATH = "data-path"  # a real site's CSV/JSONL file
NODE_DEVICE = "device"  # auto | cpu | cuda | mps
NODE_LEDGER_PATH = "ledger-path"  # the site's privacy ledger file (JSON), kept across runs
# the site's own audit trail (JSON Lines, never sent); default <ledger-path>.audit.jsonl
NODE_AUDIT_PATH = "audit-path"
NODE_EPSILON_MAX = "privacy-epsilon-max"  # the site's ε ceiling; the coordinator cannot raise it
NODE_DELTA = "privacy-delta"  # the site's δ: the federation's privacy.delta is capped by it
NODE_PRIVACY_REQUIRED = "privacy-required"  # default true: refuse runs with DP off
NODE_COORDINATOR_PUBLIC_KEY = "coordinator-public-key"  # train only for instructions it signed
NODE_SECAGG_REQUIRED = "secagg-required"  # default false: true refuses runs without SecAgg
NODE_SECAGG_MIN_SITES = "secagg-min-sites"  # refuse secure rounds whose threshold is below it
NODE_LORA_RANK = "lora-rank"  # the site's LoRA rank, 1..lora.r (default: lora.r)
# A deployed site's held-out split is its own, fixed across runs (the coordinator's data.*
# split settings apply to simulation partitions only): its fraction and cap.
NODE_EVAL_FRACTION = "eval-fraction"  # default DEFAULT_EVAL_FRACTION
NODE_EVAL_MAX = "eval-max-examples"  # default DEFAULT_EVAL_MAX
DEFAULT_EVAL_FRACTION = 0.2
DEFAULT_EVAL_MAX = 200
# What a site chooses to publish about its data for the model card (fedpeft.model_card). Each
# is sent, in the clear, with the site's train replies only when its node config sets it.
NODE_SITE_DESCRIPTION = "site-description"  # free text, at most SITE_TEXT_MAX characters
NODE_SITE_LICENSE = "site-license"  # the data's licence, at most SITE_LICENSE_MAX characters
NODE_SITE_ROWS = "site-rows"  # a row count the site opts to publish (never sent otherwise)
SITE_DECLARATION_KEYS = (NODE_SITE_DESCRIPTION, NODE_SITE_LICENSE, NODE_SITE_ROWS)
SITE_TEXT_MAX = 2000
SITE_LICENSE_MAX = 100
# Prompts a site publishes (fedpeft.generate): a .txt (one prompt a line) or .jsonl file.
# With each plain evaluation of a causal LM it sends the global adapter's greedy answers to
# them, in the clear (never under secure aggregation). Unset: it generates nothing. Bounded
# so that a published set stays a handful of texts a person reads, not a data release.
NODE_EVAL_PROMPTS = "eval-prompts"
EVAL_PROMPTS_MAX = 16
EVAL_PROMPT_CHARS_MAX = 1000
# train.eval_max_new_tokens: the longest answer (in tokens) a site generates
MAX_NEW_TOKENS_MAX = 256

# --- message record keys ------------------------------------------------------------------
ARRAYS = "adapter"  # ArrayRecord: one flat float32 array under ARRAY_FLAT
ARRAY_FLAT = "flat"
CONFIG = "config"  # ConfigRecord: instructions server → site
METRICS = "metrics"  # MetricRecord: figures site → server
LAYOUT = "layout"  # ConfigRecord: names and element counts of the flat array's tensors
# ConfigRecord, site → server with a train reply: the node-config keys of
# SITE_DECLARATION_KEYS the site set, under those names (absent when it set none)
DECLARATION = "declaration"
# ConfigRecord, site → server with a plain evaluate reply: the site's published prompts and
# the global adapter's answers, as two lists of str of equal length (absent: none published)
GENERATIONS = "generations"
GEN_PROMPTS = "prompts"
GEN_ANSWERS = "answers"

# ConfigRecord entries, server → site
CFG_ROUND = "round"
CFG_TRAIN_NAMES = "train-names"  # which adapter tensors the site trains and sends back
# The global adapter travels as the tensors named here (ARRAY_FLAT holds their values); the
# site rebuilds the others from the shared seed and checks them against this SHA-256.
CFG_SENT_NAMES = "sent-names"
CFG_DERIVED_DIGEST = "derived-digest"
# Stable across a resumed federation (a resumed ServerApp gets a new Flower run id): the key
# under which sites charge the round to their privacy ledgers.
CFG_FEDERATION_ID = "federation-id"
# What a secure round's masked stage releases: TASK_TRAIN (an update) or TASK_EVALUATE
# (held-out figures, inside the secure sum).
CFG_TASK = "task"
TASK_TRAIN = "train"
TASK_EVALUATE = "evaluate"
# A secure evaluation sums each site's mean held-out loss capped at this, over the cap
# (every element of a masked vector must lie within the clip range).
EVAL_LOSS_CAP = 50.0
# The coordinator's Ed25519 signature of the instruction (fedpeft.instructions).
CFG_SIGNATURE = "signature"

# LAYOUT entries, site → server
LAYOUT_NAMES = "names"
LAYOUT_NUMELS = "numels"

# MetricRecord entries, site → server
MET_NUM_EXAMPLES = "num-examples"
MET_TRAIN_LOSS = "train-loss"
MET_EVAL_LOSS = "eval-loss"
MET_EVAL_ACCURACY = "eval-accuracy"
# a site training a LoRA rank below lora.r reports it (plain aggregation only; under secure
# aggregation its rank-slot indicator rides inside the masked vector instead)
MET_LORA_RANK = "lora-rank"
# privacy figures, site → server (what privacy.json reports)
MET_EPSILON = "epsilon"  # ε spent so far by this site, over its whole ledger
MET_EPSILON_CEILING = "epsilon-ceiling"
MET_DELTA = "delta"
MET_NOISE_MULTIPLIER = "noise-multiplier"
MET_SAMPLE_RATE = "sample-rate"
MET_DP_STEPS = "dp-steps"  # noisy steps over the whole ledger
MET_MAX_GRAD_NORM = "max-grad-norm"
PRIVACY_METRICS = (
    MET_EPSILON,
    MET_EPSILON_CEILING,
    MET_DELTA,
    MET_NOISE_MULTIPLIER,
    MET_SAMPLE_RATE,
    MET_DP_STEPS,
    MET_MAX_GRAD_NORM,
)

# --- error replies, site → server ----------------------------------------------------------
# An error reply carries one of these codes and its fixed message, never data-dependent text:
# Error(code=SITE_ERRORS[name][0], reason=f"{name}: {SITE_ERRORS[name][1]}"). The detail of
# a failure stays in the site's own log.
ERR_BUDGET = "budget-exceeded"
ERR_LEDGER_REQUIRED = "ledger-required"
ERR_CEILING_REQUIRED = "ceiling-required"
ERR_DP_REQUIRED = "dp-required"
ERR_DELTA = "delta-too-large"
ERR_DELTA_REQUIRED = "delta-required"
ERR_SECAGG_REQUIRED = "secagg-required"
ERR_SIGNATURE = "unsigned-instruction"
ERR_RELEASE_MISMATCH = "release-mismatch"
ERR_EVALUATION_REFUSED = "evaluation-refused"
ERR_PROTOCOL = "protocol-error"
ERR_BAD_INSTRUCTION = "bad-instruction"
ERR_SITE_CONFIG = "site-config"
ERR_SITE_FAILED = "site-failed"
SITE_ERRORS: dict[str, tuple[int, str]] = {
    ERR_BUDGET: (4101, "the round would exceed this site's privacy budget; nothing was trained"),
    ERR_LEDGER_REQUIRED: (
        4102,
        "this site has no ledger-path in its node config; it trains nothing",
    ),
    ERR_CEILING_REQUIRED: (
        4103,
        "this site has no privacy-epsilon-max in its node config; it trains nothing",
    ),
    ERR_DP_REQUIRED: (4104, "this site trains only with differential privacy on"),
    ERR_DELTA: (4105, "the privacy delta is larger than 1/N at this site"),
    ERR_SECAGG_REQUIRED: (
        4114,
        "this site takes part only in secure aggregation over enough sites",
    ),
    ERR_DELTA_REQUIRED: (
        4113,
        "this site has no privacy-delta in its node config; it trains nothing",
    ),
    ERR_SIGNATURE: (4106, "the instruction is not signed by the coordinator this site trusts"),
    ERR_RELEASE_MISMATCH: (
        4107,
        "a retried round came out different from the release already sent; withheld",
    ),
    ERR_EVALUATION_REFUSED: (
        4108,
        "evaluation refused: not a round this site trained, or a second adapter for it",
    ),
    ERR_PROTOCOL: (4109, "the secure-aggregation request does not fit this site's round"),
    ERR_BAD_INSTRUCTION: (4110, "the instruction is malformed or does not fit this site's model"),
    ERR_SITE_CONFIG: (4111, "this site's configuration does not fit the run; see the site's log"),
    ERR_SITE_FAILED: (4112, "the site failed to handle the message; see the site's log"),
}
# a site refusing for its privacy budget (the server stops asking it)
REFUSAL_BUDGET = ERR_BUDGET

# --- secure aggregation (SecAgg+) ----------------------------------------------------------
# fedpeft.server.secure_aggregation ↔ fedpeft.client.secure_aggregation. A round is four
# exchanges with message type "train.<action>" (the ClientApp registers @app.train(<action>)).
SECAGG_SETUP = "secagg_setup"  # round parameters, neighbours → two public keys
SECAGG_SHARE_KEYS = "secagg_share_keys"  # neighbours' public keys → encrypted Shamir shares
SECAGG_MASKED = "secagg_masked"  # global adapter + train config + shares → masked update
SECAGG_UNMASK = "secagg_unmask"  # who survived / dropped → the shares needed to unmask the sum
SECAGG_ACTIONS = (SECAGG_SETUP, SECAGG_SHARE_KEYS, SECAGG_MASKED, SECAGG_UNMASK)

# Record keys: the protocol message itself, flattened by fedpeft.privacy.secagg_wire (its
# entries are the message's field names), and its uint32 masked vector as an array.
SECAGG = "secagg"  # ConfigRecord, both directions
SECAGG_ARRAYS = "secagg-arrays"  # ArrayRecord, site → server at SECAGG_MASKED: "vector", uint32

# A site's SecAggClient state between stages: in context.state on the site, never sent.
SECAGG_STATE = "secagg-state"  # ConfigRecord in context.state
SECAGG_STATE_CLIENT = "client"  # bytes: SecAggClient.to_state()
