"""Shipped PRIOR configs, assets, launcher and demo pieces (the whole demo runs under ``-m slow``)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmalign.api import load_train_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "prior").glob("*.yaml"))


def test_three_configs_ship():
    names = {p.name for p in CONFIGS}
    assert {"tiny_prior_llava.yaml", "tiny_prior_patch.yaml", "llava15_7b_lora_prior.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_validates_and_documents_its_launch(path):
    cfg = load_train_config(path)
    # PRIOR's own recipe, or a preference loss of the METHODS table on the same LVLM family (tiny_lvlm_dpo.yaml)
    assert cfg.modality == "prior" and cfg.loss.name in ("prior", "dpo")
    head = path.read_text().split("\nmodality:")[0]
    assert all(line.startswith("#") for line in head.splitlines()) and "train_prior.sh" in head
    if cfg.model.name_or_path == "tiny":
        for f in cfg.data.train + cfg.data.eval:
            assert (REPO / f).is_file(), f"{path.name}: {f} missing; run scripts/make_*_assets.py"
    else:
        assert cfg.model.name_or_path.startswith("/path/to/") and cfg.lora.enabled


def test_real_config_lora_regex_targets_only_the_language_model():
    from mmalign.adapters.lvlm_family import apply_lvlm_lora
    from mmalign.models.lvlm import build_tiny_lvlm

    from ._tiny import caption_tokenizer

    real = load_train_config(REPO / "configs" / "prior" / "llava15_7b_lora_prior.yaml")
    tiny = load_train_config(REPO / "configs" / "prior" / "tiny_prior_llava.yaml",
                             [f"data.train=[{REPO / 'assets/prior/captions.jsonl'}]", "data.eval=[]"])
    model, _ = build_tiny_lvlm("llava", caption_tokenizer(tiny), **tiny.model.tiny)
    peft = apply_lvlm_lora(model, real.lora, freeze_encoder=real.prior.freeze_vision_tower,
                           modules_to_save=list(real.prior.modules_to_save))
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in peft.named_parameters() if ".lora_A" in n}
    assert len(lora) == 7 * tiny.model.tiny["num_layers"]
    assert all("language_model" in n and "vision" not in n for n in lora)


def test_assets_are_fresh_and_small():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_lvlm_assets
        import make_prior_assets
    finally:
        sys.path.pop(0)
    assert make_prior_assets.check(REPO / "assets" / "prior") == []
    assert make_lvlm_assets.check(REPO / "assets" / "lvlm") == []
    size = sum(p.stat().st_size for p in (REPO / "assets" / "prior").rglob("*") if p.is_file())
    assert size < 300_000


def test_launcher_usage_and_syntax():
    script = REPO / "scripts" / "train_prior.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert out.returncode == 2 and "CONFIG [NUM_GPUS|cpu]" in out.stdout
    out = subprocess.run(["bash", str(script), str(CONFIGS[0]), "two"], capture_output=True, text=True)
    assert out.returncode == 2 and "GPU count or 'cpu'" in out.stderr


def test_synthetic_images_and_image_token_flags():
    from mmalign.demos.prior import COLOURS, image_token_mask, shape_image
    from mmalign.models.tokenizer import train_bpe_tokenizer

    a = shape_image("blue", "square", random.Random(3))
    b = shape_image("blue", "square", random.Random(3))
    assert a.size == (16, 16) and a.tobytes() == b.tobytes()
    centre = torch.tensor(list(a.getdata()), dtype=torch.float32).view(16, 16, 3)[6:10, 6:10].mean((0, 1))
    assert torch.allclose(centre, torch.tensor(COLOURS["blue"], dtype=torch.float32), atol=25)
    caption = "here is a tiny picture with a blue square on a dark and noisy background ."
    tok = train_bpe_tokenizer([caption] * 4, vocab_size=300)
    flags = image_token_mask(tok, caption, ("blue", "square"))
    ids = tok(caption, add_special_tokens=False)["input_ids"]
    assert len(flags) == len(ids) + 1 and not flags[-1]
    flagged = tok.decode([i for i, f in zip(ids, flags[:-1], strict=True) if f]).split()
    assert flagged == ["blue", "square"]


def test_demo_evaluation_on_a_saved_tiny_model(tmp_path):
    from mmalign.demos.prior import evaluate
    from mmalign.models.lvlm import build_tiny_lvlm, save_lvlm

    from ._tiny import TINY, caption_tokenizer, config, write_rows

    data = write_rows(tmp_path, n=5)
    model, inputs = build_tiny_lvlm("patch", caption_tokenizer(config(tmp_path, data)), **TINY)
    save_lvlm(model, inputs, tmp_path / "m")
    out = evaluate(tmp_path / "m", data)
    assert 0 <= out["image_token_accuracy"] <= 1 and 0 <= out["all_token_accuracy"] <= 1
    assert out["image_tokens"] >= 10 and out["tokens"] > out["image_tokens"]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    from mmalign.demos import get_demo

    report = get_demo("prior")(tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["method"] == "prior" and saved["metric"] == "image_token_accuracy" and saved["higher_is_better"]
    assert 0 <= saved["before"] <= 1 and 0 <= saved["after"] <= 1 and report["after"] == saved["after"]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "token_weights.png").stat().st_size > 5000


def test_prior_config_errors_are_collected_and_name_the_fix(tmp_path):
    from mmalign.config import ConfigError
    from mmalign.methods.prior import PriorTask

    base = {"modality": "prior", "data": {"train": ["x.jsonl"]}}
    with pytest.raises(ConfigError) as err:
        load_train_config(base, ["prior.alpha=-1", "prior.form=inverse_p", "prior.floor=-0.1"])
    msg = str(err.value)
    assert "3 errors" in msg and "prior.alpha=-1" in msg and "set clip" in msg and "prior.floor=-0.1" in msg
    with pytest.raises(ConfigError, match="allowed values: 'batch', 'sequence', 'none'"):
        load_train_config(base, ["prior.normalize=global"])
    cfg = load_train_config({"modality": "prior", "data": {"train": ["x.jsonl"]}, "loss": {"name": "dpo"}})
    with pytest.raises(ConfigError, match=r"loss.name='dpo': a PriorTask run trains every stage with \['prior'\]"):
        PriorTask(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_prior_llava.yaml", "tiny_prior_patch.yaml"])
def test_shipped_tiny_config_trains_two_steps(name, tmp_path, monkeypatch):
    from mmalign.api import train

    monkeypatch.chdir(REPO)  # the launch commands run from the repository root
    summary = train(REPO / "configs" / "prior" / name, ["run.max_steps=2", "prior.reference_steps=2",
                                                        f"run.output_dir={tmp_path}", "run.progress=false"])
    assert summary["global_step"] == 2 and torch.isfinite(torch.tensor(summary["stages"][0]["final"]["loss"]))
