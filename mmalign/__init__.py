"""mmalign: multimodal preference alignment.

One loss engine (`mmalign.losses`, importable with only torch installed), one training loop and
modality adapters. This module only carries the version so that `import mmalign.losses` stays light.
"""

__version__ = "0.1.0"
