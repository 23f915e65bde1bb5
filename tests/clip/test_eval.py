"""mmalign.eval.clip on hand-built embeddings (recall, zero-shot, geometry) and ``mmalign eval clip`` end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmalign.eval.clip import format_table, geometry_metrics, retrieval_metrics, zeroshot_accuracy
from mmalign.losses import modality_gap

from .conftest import ASSETS


def test_recall_is_one_for_identical_embeddings():
    x = F.normalize(torch.randn(12, 6), dim=-1)
    r = retrieval_metrics(x, x.clone(), torch.arange(12))
    assert all(v == 1.0 for v in r.values()) and set(r) == {f"{d}_recall@{k}" for d in ("i2t", "t2i")
                                                             for k in (1, 5, 10)}


def test_recall_with_several_captions_per_image_and_misses():
    img = torch.eye(3)
    # captions 0,1 -> image 0; caption 2 -> image 1; caption 3 -> image 2 but it points at image 0
    txt = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0.95, 0, 0.1]])
    owner = torch.tensor([0, 0, 1, 2])
    r = retrieval_metrics(img, txt, owner, ks=(1, 2))
    assert r["t2i_recall@1"] == 0.75  # caption 3 is nearest to image 0, not to its own image 2
    assert r["t2i_recall@2"] == 1.0
    assert r["i2t_recall@1"] == 1.0  # every image's nearest caption is one of its own (image 2: caption 3)
    txt[3] = torch.tensor([0.95, 0.2, 0.0])  # now caption 3 is not near image 2 at all
    r = retrieval_metrics(img, txt, owner, ks=(1,))
    assert r["i2t_recall@1"] == pytest.approx(2 / 3) and r["t2i_recall@1"] == 0.75


def test_zeroshot_accuracy_on_hand_built_embeddings():
    classes = torch.eye(6)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    images = classes[[0, 1, 2, 3, 4, 0]] + 0.01  # the last image looks like class 0
    out = zeroshot_accuracy(images, labels, classes)
    assert out["zeroshot/top1"] == pytest.approx(5 / 6) and out["zeroshot/top5"] == 1.0


def test_modality_gap_batch_centroids_permutation_invariant_and_zero():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g) + 2.0
    gap = geometry_metrics(img, txt)["modality_gap"]
    perm = torch.randperm(10, generator=g)
    assert abs(geometry_metrics(img[perm], txt)["modality_gap"] - gap) < 1e-6
    # centroid over the batch dimension: ‖mean_i x̂_i − mean_j ŷ_j‖, not the per-sample mean over features
    xn, yn = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    assert abs(gap - float((xn.mean(0) - yn.mean(0)).norm())) < 1e-6
    assert abs(gap - float((xn.mean(-1) - yn.mean(-1)).abs().mean())) > 1e-3
    same = geometry_metrics(img, img[perm])
    assert same["modality_gap"] < 1e-6 and same["modality_gap_mse"] < 1e-12
    assert float(modality_gap(img, img.flip(0))) < 1e-6


def test_alignment_and_uniformity():
    x = F.normalize(torch.randn(8, 5), dim=-1)
    m = geometry_metrics(x, x.clone())
    assert m["alignment"] < 1e-10
    spread = geometry_metrics(torch.eye(8), torch.eye(8))["uniformity"]
    clumped = geometry_metrics(torch.ones(8, 8) + 0.01 * torch.eye(8), torch.ones(8, 8))["uniformity"]
    assert spread < clumped <= 0.0


def test_format_table():
    text = format_table({"a": {"m": 0.5}, "b": {"m": 0.25, "n": 1.0}})
    assert text.splitlines()[0] == "| metric | a | b |" and "| n |  | 1 |" in text


def test_cli_eval_clip_prints_a_table_and_writes_json(tiny_bundle, tmp_path):
    from typer.testing import CliRunner

    from mmalign.cli import app
    from mmalign.models.clip import save_clip

    save_clip(tiny_bundle, tmp_path / "model")
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["eval", "clip", "--model", str(tmp_path / "model"), "--model", "tiny",
                                   "--data", str(ASSETS / "eval.jsonl"), "--zeroshot", str(ASSETS / "zeroshot"),
                                   "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| modality_gap |" in res.output and "| zeroshot/top1 |" in res.output
    data = json.loads(out.read_text())
    ours, tiny = data[str(tmp_path / "model")], data["tiny"]
    assert ours == tiny  # the saved model is the same random tiny model
    assert ours["pairs/images"] == 32 and ours["zeroshot/classes"] == 16 and 0 <= ours["i2t_recall@10"] <= 1
    bad = CliRunner().invoke(app, ["eval", "clip", "--model", "tiny", "--data", str(tmp_path / "none.jsonl")])
    assert bad.exit_code == 2 and "no such file" in bad.output
