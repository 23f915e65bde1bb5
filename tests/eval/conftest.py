"""The eval tests reuse the training tests' session data and tokenizer (tests/train/conftest.py)."""

from tests.train.conftest import data_dir, tokenizer_dir  # noqa: F401 (pytest fixtures)
