"""Checkpoints written by ``main`` at commit 436548d (the layout before the middle-layer reshape) still load.

Made with ``mmalign train configs/{text,diffusion,clip,prior}/tiny_*.yaml run.max_steps=1`` (text also with
``lora.enabled=true``; CLIP with ``model.tiny.text_width=8`` to keep the fixture small) and copied from
``<output_dir>/final``. The LoRA text adapter's ``base_model_name_or_path`` names the writer's absolute path,
which no longer exists: the loader must find the ``base/`` saved beside it, as it does for a moved run."""

from __future__ import annotations

import json

import pytest

from ._load import FIXTURES, LOADERS, measure

EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_checkpoint_from_main_loads_unchanged(name):
    got, want = measure(name), EXPECTED[name]
    assert got["n_params"] == want["n_params"]
    for key in set(want) - {"n_params"}:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key


def test_text_checkpoint_from_main_trains_on(tmp_path):
    """A run that starts from the old ``final/`` (as ``model.name_or_path``) trains and saves through today's code."""
    from mmalign.api import train

    overrides = ["run.max_steps=1", f"run.output_dir={tmp_path}", f"model.name_or_path={FIXTURES / 'text_full'}",
                 "run.progress=false", "run.report_to=[jsonl]"]
    summary = train("configs/text/tiny_dpo.yaml", overrides)
    assert summary["global_step"] == 1
    assert (tmp_path / "final" / "model.safetensors").is_file()
