"""Every name that crosses a process or network boundary, imported by both sides.

Message record keys, run-config keys (declared in ``pyproject.toml``
``[tool.flwr.app.config]``) and node-config keys (set by a site operator with
``flower-supernode --node-config``). Keeping them here means a renamed key cannot
silently desynchronise the ServerApp and the ClientApp.
"""

# --- run config (coordinator → everyone) -------------------------------------------------
RUN_OVERRIDES = "overrides"  # space-separated Hydra overrides, e.g. "federation.rounds=5"
RUN_RESUME_FROM = "resume-from"  # a run directory: continue that federation after its last round

# --- node config (site operator → its own ClientApp; never leaves the site) --------------
NODE_PARTITION_ID = "partition-id"  # set by Flower's simulation engine
NODE_NUM_PARTITIONS = "num-partitions"  # set by Flower's simulation engine
NODE_DATA_PATH = "data-path"  # a real site's CSV/JSONL file
NODE_DEVICE = "device"  # auto | cpu | cuda | mps
NODE_LEDGER_PATH = "ledger-path"  # the site's privacy ledger file (JSON), kept across runs
NODE_EPSILON_MAX = "privacy-epsilon-max"  # the site's ε ceiling; the coordinator cannot raise it
NODE_DELTA = "privacy-delta"  # the site's δ (default: 1/(10·N) at the first run)
NODE_LORA_RANK = "lora-rank"  # the site's LoRA rank, 1..lora.r (default: lora.r)

# --- message record keys ------------------------------------------------------------------
ARRAYS = "adapter"  # ArrayRecord: one flat float32 array under ARRAY_FLAT
ARRAY_FLAT = "flat"
CONFIG = "config"  # ConfigRecord: instructions server → site
METRICS = "metrics"  # MetricRecord: figures site → server
LAYOUT = "layout"  # ConfigRecord: names and element counts of the flat array's tensors

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

# LAYOUT entries, site → server
LAYOUT_NAMES = "names"
LAYOUT_NUMELS = "numels"

# MetricRecord entries, site → server
MET_NUM_EXAMPLES = "num-examples"
MET_TRAIN_LOSS = "train-loss"
MET_EVAL_LOSS = "eval-loss"
MET_EVAL_ACCURACY = "eval-accuracy"
MET_SECONDS = "seconds"
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

# an error reply whose reason starts with this is a site refusing for its privacy budget
REFUSAL_BUDGET = "BudgetExceededError"

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
