"""``mmalign pairs``: registered on :data:`mmalign.cli.app` (filled in by the pair-construction recipe)."""
