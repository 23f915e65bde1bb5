"""TEMPLE's training schedule (configs/vlm/tiny_temple*.yaml) through ``mmalign.api.train``: four DPO stages
r16 -> r8 -> r4 -> r2, each on its own pair file, the LoRA merged and the reference re-anchored at every boundary
(so each DPO stage opens at exactly ln 2: policy == reference), then the SFT stage; the opposite order and the
no-curriculum mix load from their sibling configs with the same stage layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mmalign.api import load_train_config, train
from mmalign.data.synthetic_video import write_moving_shape_video
from mmalign.data.temple import VideoResponses
from mmalign.methods.temple_pixels import write_pixel_pairs
from mmalign.methods.vlm import VLMTask
from mmalign.models.vlm import save_vlm

from ._tiny_vlm import tiny

REPO = Path(__file__).resolve().parents[2]
MAGS = (16, 8, 4, 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("temple_stages")
    responses, sft = [], []
    for i in range(4):
        v = write_moving_shape_video(d / f"v{i}.mp4", 4, 16, seed=i, n_segments=2, fps=4)
        rejected = {("reverse", m): v.caption.replace("then", "and then") for m in MAGS}
        responses.append(VideoResponses(f"v{i}.mp4", v.caption, rejected))
        sft.append({"prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what"}]}],
                    "completion": [{"role": "assistant", "content": v.caption}], "videos": [str(d / f"v{i}.mp4")]})
    write_pixel_pairs(responses, d / "pairs", base_dir=d, swift=False)
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    model, inputs = tiny("qwen2_vl")
    save_vlm(model, inputs, d / "base")
    return d


def _overrides(d: Path, tmp: Path, order: list[str]) -> list[str]:
    out = [f"model.name_or_path={d / 'base'}", f"run.output_dir={tmp / 'run'}", "run.progress=false",
           "run.resume=never", "run.batch_size=2", "vlm.max_frames=4", "optim.lr=1e-2",
           f"data.train=[{d / 'pairs' / 'temple_r16.jsonl'}]"]
    for i, name in enumerate(order):
        file = d / "sft.jsonl" if name == "sft" else d / "pairs" / ("pairs.jsonl" if name.startswith("mix")
                                                                     else f"temple_{name}.jsonl")
        out += [f"stages.{i}.train=[{file}]", f"stages.{i}.max_steps=2"]
    return out


def test_curriculum_stages_merge_reanchor_then_sft(files, tmp_path):
    order = ["r16", "r8", "r4", "r2", "sft"]
    cfg = load_train_config(REPO / "configs/vlm/tiny_temple.yaml", _overrides(files, tmp_path, order))
    assert [s.name for s in cfg.stages] == order
    assert [s.merge_lora for s in cfg.stages] == [False, True, True, True, True]
    assert [s.reanchor_reference for s in cfg.stages] == [False, True, True, True, False]
    assert cfg.stages[-1].loss == {"name": "sft"} and (cfg.lora.r, cfg.lora.alpha) == (8, 16)
    task = VLMTask(cfg)
    out = train(cfg, task=task)
    assert [s["name"] for s in out["stages"]] == order and out["global_step"] == 10
    assert task.family.merged, "the LoRA adapter was merged at a stage boundary"
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r and "event" not in r]
    for k, stage in enumerate(order[:4]):
        first = steps[2 * k]
        # merged policy + a fresh zero LoRA = the adapter-disabled reference: DPO opens at exactly ln 2
        assert first["loss"] == pytest.approx(math.log(2.0), abs=1e-5), (stage, first)
        assert steps[2 * k + 1]["loss"] != pytest.approx(math.log(2.0), abs=1e-5), "and then it trains"
    assert "rewards/chosen" not in steps[-1] and math.isfinite(steps[-1]["loss"]), "the last stage is SFT"
    final = Path(out["final_model"])  # a base on disk: the last stage's adapter (over the merged weights) is saved
    assert (final / "config.json").is_file() or (final / "adapter_config.json").is_file()


@pytest.mark.parametrize("name,order", [("tiny_temple_post_sft", ["sft", "r16", "r8", "r4", "r2"]),
                                        ("tiny_temple_mix", ["mix0", "mix1", "mix2", "mix3", "sft"])])
def test_opposite_order_and_mix_configs(name, order, files, tmp_path):
    cfg = load_train_config(REPO / f"configs/vlm/{name}.yaml", _overrides(files, tmp_path, order))
    assert [s.name for s in cfg.stages] == order
    assert [s.merge_lora for s in cfg.stages] == [False, True, True, True, True]
    dpo = [s for s in cfg.stages if s.name != "sft"]
    assert sum(s.max_steps for s in dpo) == 8 and all(s.reanchor_reference for s in dpo[1:])
