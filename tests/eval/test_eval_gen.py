"""``mmalign eval text`` / ``mmalign eval diffusion`` and the functions behind them (mmalign.eval.text,
mmalign.eval.diffusion, mmalign.eval.paired) on tiny saved models: a model compared with itself ties (win-rate
½, KL 0), the numbers equal the demo's direct computation, and the CLI writes what it prints."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mmalign.cli import app
from mmalign.data.rows import DataError
from mmalign.eval.paired import read_prompts, seed_summary, win_rate
from mmalign.eval.text import ADAPTER_DISABLED, compare_text

PROMPTS = ["add: 3 4 =", "add: 10 2 =", "add: 7 7 ="]
SHAPES = ["a red circle on a black background", "a blue square on a white background"]


def length_reward(prompt: str, completion: str) -> float:
    """A reward that separates random tiny models: the completion's length in characters."""
    return float(len(completion))


def _tiny_lm(tokenizer_dir, seed: int):
    from mmalign.models.text import build_tiny_causal_lm, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    return build_tiny_causal_lm(len(tok), seed=seed, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                intermediate_size=64, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                bos_token_id=tok.bos_token_id), tok


def _reward(prompts, completions):
    return [length_reward(p, c) for p, c in zip(prompts, completions, strict=True)]


def test_win_rate_ties_and_seed_spread():
    assert win_rate([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0], [1.0, 2.0])
    s = seed_summary([{"reward": 1.0, "kl": None}, {"reward": 3.0, "kl": None}], ["reward", "kl"])
    assert s == {"reward": 2.0, "reward_std": 1.0}  # kl missing: left out, not reported as 0


def test_read_prompts_from_txt_jsonl_and_bad_rows(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\n two \n")
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"caption": "b"}\n')
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no prompt"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="no prompt file"):
        read_prompts(tmp_path / "missing.txt")


def test_compare_text_against_itself_ties_and_matches_the_direct_computation(tokenizer_dir):
    from mmalign.adapters.causal_lm import score_batch
    from mmalign.sample.text import generate, samples_to_batch

    policy, tok = _tiny_lm(tokenizer_dir, seed=0)
    ref, _ = _tiny_lm(tokenizer_dir, seed=1)
    same = compare_text(policy, tok, PROMPTS, reference=policy, reward_fn=_reward, seeds=[0, 1], max_new_tokens=8)
    assert same["win_rate"] == 0.5 and same["reward"] == same["reward_reference"]
    assert abs(same["kl"]) < 1e-5 and same["n_samples"] == 6 and len(same["per_seed"]) == 2
    got = compare_text(policy, tok, PROMPTS, reference=ref, reward_fn=_reward, seeds=[3], max_new_tokens=8)
    # the demo's formula (mmalign/demos/text.py before the measure moved here): one batch, same seed for both
    s_pol = generate(policy, tok, PROMPTS, max_new_tokens=8, seed=3)
    s_ref = generate(ref, tok, PROMPTS, max_new_tokens=8, seed=3)
    r_pol, r_ref = _reward(PROMPTS, s_pol.completions), _reward(PROMPTS, s_ref.completions)
    batch = samples_to_batch(s_pol, tok.pad_token_id)
    with torch.no_grad():
        kl = (score_batch(policy, batch).logps - score_batch(ref, batch).logps)[:, 0]
    assert got["reward"] == pytest.approx(sum(r_pol) / 3) and got["reward_reference"] == pytest.approx(sum(r_ref) / 3)
    assert got["win_rate"] == pytest.approx(win_rate(r_pol, r_ref))
    assert got["kl"] == pytest.approx(float(kl.mean()), abs=1e-5)
    assert abs(got["kl"]) > 1e-3  # two different random models: a real log-ratio


def test_adapter_disabled_reference_equals_the_base_model(tokenizer_dir):
    import copy

    from mmalign.models.text import apply_lora

    base, tok = _tiny_lm(tokenizer_dir, seed=0)
    frozen = copy.deepcopy(base)
    policy = apply_lora(base, r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    kw = dict(reward_fn=_reward, seeds=[0], max_new_tokens=6, samples_per_prompt=2)
    via_adapter = compare_text(policy, tok, PROMPTS, reference=ADAPTER_DISABLED, **kw)
    via_copy = compare_text(policy, tok, PROMPTS, reference=frozen, **kw)
    pairs = list(zip(via_adapter["samples"], via_copy["samples"], strict=True))
    assert all(a["reference"] == b["reference"] and a["policy"] == b["policy"] for a, b in pairs)
    assert via_adapter["reward_reference"] == via_copy["reward_reference"]
    assert via_adapter["kl"] == pytest.approx(via_copy["kl"], abs=1e-5) and abs(via_copy["kl"]) > 1e-3
    assert via_adapter["n_samples"] == 6


def test_eval_text_cli_writes_what_it_prints(tokenizer_dir, tmp_path):
    for name, seed in (("policy", 0), ("ref", 1)):
        model, tok = _tiny_lm(tokenizer_dir, seed)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["eval", "text", "--model", str(tmp_path / "policy"), "--reference", str(tmp_path / "ref"), "--prompts",
            str(tmp_path / "prompts.txt"), "--reward", "tests.eval.test_eval_gen:length_reward", "--seeds", "0",
            "--seeds", "1", "--samples", "2", "--max-new-tokens", "6", "--out", str(tmp_path / "eval")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval" / "eval_text.json").read_text())
    assert {"reward", "reward_reference", "win_rate", "kl", "win_rate_std", "per_seed"} <= set(report)
    assert [s["seed"] for s in report["per_seed"]] == [0, 1]
    lines = (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == len(PROMPTS) * 2 * 2 and {"policy", "reference", "kl"} <= set(json.loads(lines[0]))
    assert f"{report['win_rate']:.4f}" in res.output and "win-rate vs reference" in res.output
    res = CliRunner().invoke(app, [*args[:-2], "--reward", "no_such_reward"])
    assert res.exit_code == 2 and "no_such_reward" in res.output


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """A tiny pixel-space base pipeline and a 'trained' one (perturbed UNet) as diffusers directories."""
    from mmalign.models.diffusion_tiny import build_tiny_components
    from tests.diffusion import perturbed

    d = tmp_path_factory.mktemp("pipes")
    comps = build_tiny_components("unet", seed=0, pixel_space=True, resolution=16)
    comps.pipeline().save_pretrained(str(d / "base"))
    comps.pipeline(perturbed(comps.denoiser, 1, scale=0.05)).save_pretrained(str(d / "model"))
    (d / "captions.txt").write_text("\n".join(SHAPES) + "\n")
    return d


def test_eval_diffusion_cli_rewards_win_rate_and_grid(pipelines, tmp_path):
    from PIL import Image

    base = ["--base", str(pipelines / "base"), "--prompts", str(pipelines / "captions.txt"), "--reward", "shapes",
            "--seeds", "0", "--seeds", "1", "--steps", "2", "--guidance-scale", "3"]
    res = CliRunner().invoke(app, ["eval", "diffusion", "--model", str(pipelines / "model"), *base,
                                   "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ev" / "eval_diffusion.json").read_text())
    assert report["n_images"] == 4 and [s["seed"] for s in report["per_seed"]] == [0, 1]
    assert 0.0 <= report["reward"] <= 1.0 and 0.0 <= report["win_rate"] <= 1.0
    assert len(report["rewards"]["model"]) == 2 and len(report["rewards"]["model"][0]) == 2
    with Image.open(tmp_path / "ev" / "grid.png") as im:  # 2 prompts × (base, model) rows, 2 seed columns
        assert im.size[1] > 4 * 16 * 4 and im.size[0] > 2 * 16 * 4
    assert "win-rate vs base" in res.output
    # the base against itself: identical images, every pair a tie
    res = CliRunner().invoke(app, ["eval", "diffusion", "--model", str(pipelines / "base"), *base,
                                   "--out", str(tmp_path / "self")])
    same = json.loads((tmp_path / "self" / "eval_diffusion.json").read_text())
    assert res.exit_code == 0 and same["win_rate"] == 0.5 and same["reward"] == same["reward_reference"]


def test_eval_diffusion_refuses_a_reward_that_does_not_fit(pipelines, tmp_path):
    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    res = CliRunner().invoke(app, ["eval", "diffusion", "--model", str(pipelines / "model"), "--base",
                                   str(pipelines / "base"), "--prompts", str(tmp_path / "p.txt"), "--reward", "shapes",
                                   "--seeds", "0", "--steps", "1", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 2 and "not a shapes caption" in res.output
    res = CliRunner().invoke(app, ["eval", "diffusion", "--model", str(pipelines / "model"), "--prompts",
                                   str(tmp_path / "p.txt"), "--reward", "nope:nothing", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "nope:nothing" in res.output
