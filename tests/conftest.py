"""Test tiers: the default run (``make test``) is fast unit tests; ``-m slow`` adds end-to-end runs.

Nothing here downloads: the hub is switched off for every test process.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
