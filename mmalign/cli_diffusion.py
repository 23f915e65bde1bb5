"""``mmalign sample diffusion``: registered on :data:`mmalign.cli.sample_app` (filled in by the diffusion recipe)."""
