"""mmalign: multimodal preference alignment.

One loss engine (`mmalign.losses`, importable with only torch installed), one training loop and
modality adapters. This module only carries the version so that `import mmalign.losses` stays light.
"""

from .extras import install_import_hint

__version__ = "0.1.0"
install_import_hint()  # a missing optional package imported by mmalign names its `pip install 'mmalign[...]'`


def __getattr__(name: str):
    # `mmalign.train(...)` without importing the loop (and transformers) on `import mmalign.losses`.
    if name == "train":
        from .api import train

        return train
    raise AttributeError(f"module 'mmalign' has no attribute {name!r}")
