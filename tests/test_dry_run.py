"""``mmalign train --dry-run`` and :func:`mmalign.api.plan` (issue 17 item 9): the config and data are checked and the
plan printed, nothing is trained or written; a bad config is an ``error:`` line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmalign.api import plan
from mmalign.cli import app

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/text/tiny_dpo.yaml", "configs/diffusion/tiny_dpo.yaml", "configs/clip/tiny_clip_refine.yaml",
           "configs/prior/tiny_lvlm_dpo.yaml",
           "configs/prior/tiny_prior_patch.yaml"]  # PRIOR writes its reference's initial weights while it builds


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs' data paths are relative to the repository root


@pytest.mark.parametrize("config", CONFIGS)
def test_dry_run_prints_the_plan_and_writes_nothing(config, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--dry-run", config, f"run.output_dir={out}"])
    assert res.exit_code == 0, res.output
    text = res.output
    assert "dry run: nothing trained, nothing written" in text
    assert "stage 0 main:" in text and "optimizer steps" in text
    assert " good, 0 bad rows" in text and f"output {out} (new): start a new run" in text
    assert "parameters; memory ≈" in text  # tiny models are built, so the estimate is known
    assert not out.exists() and not list(tmp_path.iterdir())


def test_plan_from_python_counts_rows_and_steps(tmp_path):
    rows = (REPO / "assets/text/pairs.jsonl").read_text().splitlines()
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(rows[:20] + ["{not json", '{"prompt": "x"}', "[1, 2]"]) + "\n")
    p = plan("configs/text/tiny_dpo.yaml", [f"data.train=[{data}]", "data.eval=[]", "run.max_steps=null",
                                            "run.epochs=2", "run.batch_size=4", f"run.output_dir={tmp_path / 'o'}"])
    assert p["modality"] == "text" and p["family"] == "causal_lm" and p["reference"] == "copy"
    assert p["data"][str(data)]["good"] == 20 and p["data"][str(data)]["bad"] == 3
    st = p["stages"][0]
    assert st["loss"] == "dpo" and st["kwargs"]["beta"] == 0.1 and st["steps"] == 10  # 2 × 20 / 4
    assert p["output"]["action"] == "start a new run" and not (tmp_path / "o").exists()
    json.dumps(p, default=str)  # the plan is plain data


def test_plan_reports_a_refused_output_dir_and_a_checkpoint_estimate(tmp_path):
    out = tmp_path / "done"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_bytes(b"x")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100,
                                                  "intermediate_size": 128, "num_attention_heads": 4}))
    p = plan("configs/text/tiny_dpo.yaml", [f"run.output_dir={out}"])
    assert p["output"]["action"] == "refused" and "run.overwrite=true" in p["output"]["why"]
    from mmalign.api import _params_from_checkpoint

    assert _params_from_checkpoint(str(ckpt)) == 100 * 64 * 2 + 2 * (4 * 64 * 64 + 3 * 64 * 128)
    assert _params_from_checkpoint(str(tmp_path / "none")) is None


def test_bad_config_is_an_error_and_exit_2(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--dry-run", "configs/text/tiny_dpo.yaml", "loss.name=nope",
                              f"run.output_dir={tmp_path / 'o'}"])
    assert res.exit_code == 2 and "error:" in res.output and "loss.name='nope'" in res.output
    res = runner.invoke(app, ["train", "--dry-run", "configs/text/tiny_dpo.yaml", "data.train=[missing.jsonl]",
                              f"run.output_dir={tmp_path / 'o'}"])
    assert res.exit_code == 2 and "error:" in res.output and "missing.jsonl" in res.output
    assert not (tmp_path / "o").exists()
