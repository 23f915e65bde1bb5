from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def v2a_data(tmp_path_factory):
    """``{format: jsonl path}`` of 4 synthetic clips (1 s, 8 kHz, 16 px, 8 fps) in every v2a row format."""
    from mmalign.data.synthetic_v2a import write_v2a_dataset

    return write_v2a_dataset(tmp_path_factory.mktemp("v2a_data"), n=4)
