"""The v2a family's scores: flow DPO = ln 2 at policy = reference, noise and flow time shared by an example's
candidates (identical audio → identical errors), the learned null condition in training and sampling, every
diffusion METHODS row available, and bad media reported with file and fix or skipped and counted."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from mmalign.api import build_task, load_train_config
from mmalign.data.rows import DataError
from mmalign.data.v2a import MediaOptions, load_v2a_records

from . import tiny_config


def _task_and_batch(tmp_path, train, **extra):
    task = build_task(load_train_config(tiny_config(tmp_path / "run", train, **extra)))
    data = task.stage_data(_stage())
    batch = data.collate([data.train[i] for i in range(len(data.train))])
    batch.extras["index"] = torch.arange(len(data.train))
    return task, batch


def _stage():
    from mmalign.schema import StageConfig

    return StageConfig()


def test_flow_dpo_is_ln2_at_init_and_shares_noise(tmp_path, v2a_data):
    """policy = reference ⇒ loss = ln 2 exactly; one noise tensor and one flow time per example."""
    task, batch = _task_and_batch(tmp_path, v2a_data["pairs"])
    k = batch.num_candidates
    c, n = task.components.spec.latent_shape
    assert k == 2 and batch.extras["noise"].shape == (batch.batch_size, c, n)
    assert batch.extras["timesteps"].shape == (batch.batch_size,)
    ref = task.family.score(task.model, batch).detach()
    torch.nn.init.normal_(task.model.transformer.proj_out.weight, std=0.1)  # a non-trivial, shared policy
    policy = task.score(task.model, batch)
    with torch.no_grad():
        reference = task.score(task.model, batch)
    out = task.loss(policy, reference, batch)
    assert math.isclose(out.loss.item(), math.log(2), abs_tol=1e-6)
    assert out.loss.requires_grad and "diffusion/model_mse" in out.metrics and "rewards/accuracies" in out.metrics
    assert task.loss_kwargs["beta"] == 100.0  # the family's flow default (original convention)
    assert not torch.equal(ref.logps, policy.logps.detach())


def test_identical_audio_gets_identical_error(tmp_path, v2a_data):
    """A pair whose two files hold the same audio scores exactly equal (shared noise, time and null flag)."""
    root = v2a_data["pairs"].parent
    rows = [json.loads(line) for line in v2a_data["pairs"].read_text().splitlines()]
    for r in rows:
        shutil.copy(root / r["chosen"], tmp_path / ("copy_" + r["chosen"]))
        r["video"], r["chosen"] = str(root / r["video"]), str(root / r["chosen"])
        r["rejected"] = str(tmp_path / ("copy_" + r["chosen"].rsplit("/", 1)[-1]))
    f = tmp_path / "same.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task, batch = _task_and_batch(tmp_path, f)
    torch.nn.init.normal_(task.model.transformer.proj_out.weight, std=0.1)
    s = task.score(task.model, batch)
    assert torch.equal(s.logps[:, 0], s.logps[:, 1]) and (s.extras["err"] > 0).all()


def test_null_condition_in_training_and_sampling(tmp_path, v2a_data):
    """Examples drawn for CFG dropout see the learned null feature instead of their video; the sampler's guidance
    uses it (changing it changes guided samples, not unguided ones)."""
    from mmalign.sample.v2a import euler_sample

    task, batch = _task_and_batch(tmp_path, v2a_data["sft"], loss={"name": "sft"},
                                  v2a={"null_condition_probability": 0.5})
    assert batch.extras["null"].dtype == torch.bool
    net = task.model
    torch.nn.init.normal_(net.transformer.proj_out.weight, std=0.1)
    task.adapter.ensure_inputs(batch)
    feats = batch.features
    cond = net.conditioner(feats, torch.ones(len(feats), dtype=torch.bool), 10)
    assert torch.allclose(cond, cond[:1].expand_as(cond))  # the video no longer matters
    noise = torch.randn(2, *task.components.spec.latent_shape, generator=torch.Generator().manual_seed(0))
    guided = euler_sample(net, feats[:2], noise, steps=2, guidance_scale=3.0)
    plain = euler_sample(net, feats[:2], noise, steps=2, guidance_scale=1.0)
    with torch.no_grad():
        net.conditioner.null_feature.normal_()
    assert not torch.allclose(guided, euler_sample(net, feats[:2], noise, steps=2, guidance_scale=3.0))
    assert torch.equal(plain, euler_sample(net, feats[:2], noise, steps=2, guidance_scale=1.0))


def test_every_diffusion_row_runs_on_v2a():
    from mmalign.adapters.v2a_family import V2AFamily
    from mmalign.config import ConfigError
    from mmalign.methods.table import get_method, valid_names

    names = valid_names(V2AFamily)
    for name in ("dpo", "npo_diffusion", "kto", "bco", "sft", "plackett_luce", "npo"):
        assert name in names
    with pytest.raises(ConfigError, match="recipe of the diffusion family"):
        get_method("self_npo", V2AFamily)
    with pytest.raises(ConfigError, match="no tokens|token"):
        get_method("tdpo", V2AFamily)


# -------------------------------------------------------------------------------------------------- bad media

OPTS = MediaOptions(sample_rate=8000, num_samples=8000, fps=8.0, num_frames=8, frame_size=8)


def _bad_rows(tmp_path, v2a_data) -> tuple:
    root = v2a_data["sft"].parent
    video, good = str(root / "clip_000.mp4"), str(root / "clip_000_good.wav")
    t = np.arange(8000) / 8000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "sr16k.wav", np.tile(tone, 2), 16000)
    sf.write(tmp_path / "stereo.wav", np.stack([tone, tone], 1), 8000)
    sf.write(tmp_path / "silent.wav", np.zeros(8000, np.float32), 8000)
    sf.write(tmp_path / "clipped.wav", np.sign(tone) * 1.0, 8000, subtype="FLOAT")
    (tmp_path / "noframes.mp4").write_bytes(b"not a video at all")
    rows = [{"video": video, "audio": good},
            {"video": video, "audio": str(tmp_path / "missing.wav")},
            {"video": str(tmp_path / "noframes.mp4"), "audio": good},
            {"video": video, "audio": str(tmp_path / "sr16k.wav")},
            {"video": video, "audio": str(tmp_path / "stereo.wav")},
            {"video": video, "audio": str(tmp_path / "silent.wav")},
            {"video": video, "audio": str(tmp_path / "clipped.wav")}]
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f, rows


def test_bad_media_named_with_fix_or_counted(tmp_path, v2a_data):
    f, rows = _bad_rows(tmp_path, v2a_data)
    with pytest.raises(DataError) as e:
        load_v2a_records(f, OPTS)
    msg = str(e.value)
    assert "6 bad rows" in msg
    for needle in ("missing.wav", "noframes.mp4", "16000 Hz", "v2a.resample=true", "2 channels", "v2a.downmix=true",
                   "silent", "clipped", f"{f}:2", "fix:"):
        assert needle in msg, needle
    records, stats = load_v2a_records(f, OPTS, skip_bad_rows=True)
    assert len(records) == 1 and stats["format"] == "sft"
    assert {k: v for k, v in stats.items() if k.startswith("skipped/")} == {
        "skipped/missing_file": 1, "skipped/bad_video": 1, "skipped/wrong_sample_rate": 1,
        "skipped/wrong_channels": 1, "skipped/silent": 1, "skipped/clipped": 1}
    # resample / downmix turn two of them into usable rows
    from dataclasses import replace

    records, _ = load_v2a_records(f, replace(OPTS, resample=True, downmix=True), skip_bad_rows=True)
    assert len(records) == 3


def test_row_format_errors(tmp_path, v2a_data):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"video": "a.mp4", "audios": ["x.wav"], "ranking": [0]}) + "\n")
    with pytest.raises(DataError, match="at least 2 audio"):
        load_v2a_records(f, None)
    f.write_text(json.dumps({"clip": "a.mp4"}) + "\n")
    with pytest.raises(DataError, match="cannot tell the v2a row format"):
        load_v2a_records(f, None)
    records, stats = load_v2a_records(v2a_data["ranked"], None)
    assert stats["format"] == "ranked" and records[0].labels == [1.0, 0.0, 2.0]
