"""Test tiers: the default run (``make test``) is fast unit tests; ``-m slow`` adds end-to-end runs.

Nothing here downloads: the hub is switched off for every test process.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny models on shared 2-core machines: a second intra-op thread costs far more in spin-waits than it gains
# (measured ~50x slower layer calls under load).
torch.set_num_threads(1)
