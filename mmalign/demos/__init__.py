"""Demos: tiny models, synthetic data, a measured effect (mmalign demo)."""
