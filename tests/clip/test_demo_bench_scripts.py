"""``mmalign demo clip`` (pieces fast, the whole demo slow), the CLIP benchmark in quick mode, the CLIP launcher,
and the shipped assets matching their generator."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from mmalign.api import load_train_config

from .conftest import ASSETS, REPO


def test_demo_configs_are_valid_runs(tmp_path):
    from mmalign.demos import clip as demo

    data = {k: tmp_path / f"{k}.jsonl" for k in ("pretrain", "refine")}
    pre = load_train_config(None, ["modality=clip", *demo.pretrain_overrides(data)])
    assert pre.loss.name == "clip" and pre.clip.freeze_logit_scale and pre.model.tiny["init_logit_scale"] > 4.6
    ref = load_train_config(None, ["modality=clip", *demo.refine_overrides(data, tmp_path / "pre")])
    assert ref.loss.name == "clip_refine" and ref.reference.strategy == "copy" and ref.optim.scheduler == "constant"


def test_demo_plot_and_noise(tmp_path):
    from mmalign.demos import clip as demo

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g) + 1
    assert demo._pca2(img).shape == (20, 2)
    path = demo.plot_clouds(tmp_path / "p.png", {"a": (img, txt, 0.7), "b": (img, img, 0.0)})
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert demo._se(0.5, 100) == pytest.approx(0.05)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    from mmalign.demos import get_demo

    report = get_demo("clip")(tmp_path)
    assert report["method"] == "clip_refine" and report["metric"] == "modality_gap"
    assert report["higher_is_better"] is False and report["after"] < report["before"] - 0.05
    assert report["kept_metrics"]["zeroshot/top1"]["within_2se"]
    for name in ("report.json", "report.md", "embeddings_pca.png"):
        assert (tmp_path / name).is_file()


def test_bench_quick_in_process():
    sys.path.insert(0, str(REPO / "scripts" / "bench"))
    try:
        import clip as bench  # scripts/bench/clip.py
    finally:
        sys.path.pop(0)
    report = bench.main(["--quick", "--inprocess", "--steps", "3"])
    assert report["step0_loss_abs_diff"] < 1e-5
    for side in ("open_clip", "mmalign"):
        assert report[side]["steps_per_s"] > 0 and len(report[side]["step_s_each"]) == 1
    assert report["speedup"] > 0 and report["memory_ratio"] is None


def test_train_clip_launcher_dry_run():
    env = {**os.environ, "DRY_RUN": "1"}
    run = lambda *a: subprocess.run(["bash", str(REPO / "scripts" / "train_clip.sh"), *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, cwd=REPO)
    out = run("configs/clip/tiny_clip_refine.yaml", "cpu", "run.max_steps=2")
    assert out.returncode == 0 and "cpu_2proc.yaml" in out.stdout and "run.max_steps=2" in out.stdout
    out = run("configs/clip/vitl14_coco_zscl.yaml", "4")
    assert "--num_processes 4" in out.stdout and "ddp.yaml" in out.stdout
    assert run("configs/clip/missing.yaml").returncode == 2


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_assets_match_their_generator(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_clip_assets.py"), "--out", str(tmp_path / "a")],
                   check=True, capture_output=True, cwd=REPO)
    assert _digest(tmp_path / "a") == _digest(ASSETS)
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert size < 300 * 1024
    rows = [json.loads(line) for line in (ASSETS / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 128 and all(len(r["caption"]) == 4 for r in rows)
