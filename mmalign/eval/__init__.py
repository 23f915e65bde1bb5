"""Evaluation metrics: :mod:`mmalign.eval.clip` (modality gap, alignment, uniformity, zero-shot, retrieval)."""
