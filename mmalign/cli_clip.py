"""``mmalign eval clip``: registered on :data:`mmalign.cli.eval_app` (filled in by the CLIP recipe)."""
