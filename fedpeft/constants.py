"""Every name that crosses a process or network boundary, imported by both sides.

Message record keys, run-config keys (declared in ``pyproject.toml``
``[tool.flwr.app.config]``) and node-config keys (set by a site operator with
``flower-supernode --node-config``). Keeping them here means a renamed key cannot
silently desynchronise the ServerApp and the ClientApp.
"""

# --- run config (coordinator → everyone) -------------------------------------------------
RUN_OVERRIDES = "overrides"  # space-separated Hydra overrides, e.g. "federation.rounds=5"

# --- node config (site operator → its own ClientApp; never leaves the site) --------------
NODE_PARTITION_ID = "partition-id"  # set by Flower's simulation engine
NODE_NUM_PARTITIONS = "num-partitions"  # set by Flower's simulation engine
NODE_DATA_PATH = "data-path"  # a real site's CSV/JSONL file
NODE_DEVICE = "device"  # auto | cpu | cuda | mps

# --- message record keys ------------------------------------------------------------------
ARRAYS = "adapter"  # ArrayRecord: one flat float32 array under ARRAY_FLAT
ARRAY_FLAT = "flat"
CONFIG = "config"  # ConfigRecord: instructions server → site
METRICS = "metrics"  # MetricRecord: figures site → server
LAYOUT = "layout"  # ConfigRecord: names and element counts of the flat array's tensors

# ConfigRecord entries, server → site
CFG_ROUND = "round"
CFG_TRAIN_NAMES = "train-names"  # which adapter tensors the site trains and sends back

# LAYOUT entries, site → server
LAYOUT_NAMES = "names"
LAYOUT_NUMELS = "numels"

# MetricRecord entries, site → server
MET_NUM_EXAMPLES = "num-examples"
MET_TRAIN_LOSS = "train-loss"
MET_EVAL_LOSS = "eval-loss"
MET_EVAL_ACCURACY = "eval-accuracy"
MET_SECONDS = "seconds"
