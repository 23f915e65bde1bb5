"""Test tiers: the default run (``make test``) is fast unit tests; ``-m slow`` adds end-to-end runs.

Nothing here downloads: the hub is switched off for every test process.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models on shared 2-core machines: a second intra-op thread costs far more in spin-waits than it gains
# (measured ~50x slower layer calls under load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Re-pin before every test: a test (or a demo it runs) may have changed the thread count."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """fit() creates an Accelerator per run, and accelerate keeps one process-wide state that refuses a different
    mixed_precision later (tiny configs: "no", real configs: "bf16"): every test starts from a clean state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
