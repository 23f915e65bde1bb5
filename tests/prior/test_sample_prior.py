"""``mmalign sample prior``: answers of a trained tiny LLaVA and a tiny PatchLVLM beside a reference.

The checkpoints are trained one DPO step through ``mmalign.api.train`` on assets/lvlm/prefs.jsonl and loaded back
the way users load ``<output_dir>/final``. Checks: the CLI writes samples.md / samples.json / grid.png and prints
the answers; the KV-cached batched decode equals a plain full-forward greedy decode of each example alone (left
padding and the cache change nothing); sampling is deterministic with a seed and independent of the batch size;
a bad checkpoint or image is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmalign.cli import app
from mmalign.models.lvlm import load_lvlm
from mmalign.sample.lvlm import encode_prompt, generate_lvlm

from ._tiny import TINY

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "lvlm"
IMAGES = [ASSETS / "images" / f"{c}_0.png" for c in ("red", "green", "blue")]
# prompts of three lengths (left padding in one batch), with and without the <image> marker
PROMPTS = ["<image>\nWhat colour is this picture?", "What colour is the picture?", "<image>\ncolour?"]


def _train(tmp: Path, kind: str) -> str:
    from mmalign.api import load_train_config, train

    cfg = load_train_config(
        {"modality": "prior", "loss": {"name": "dpo"}, "model": {"name_or_path": "tiny", "tiny": dict(TINY)},
         "data": {"train": [str(ASSETS / "prefs.jsonl")], "max_length": 64}, "prior": {"lvlm": kind},
         "optim": {"lr": 1e-2, "scheduler": "constant"},
         "run": {"output_dir": str(tmp / kind), "max_steps": 1, "batch_size": 4, "progress": False,
                 "report_to": ["jsonl"], "resume": "never"}}, [])
    return train(cfg)["final_model"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prior_ckpt")
    return {kind: _train(tmp, kind) for kind in ("llava", "patch")}


def _images():
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in IMAGES]


@torch.no_grad()
def _full_forward_greedy(model, inputs, image, prompt: str, n: int) -> tuple[list[int], torch.Tensor]:
    """The oracle: one example alone, no padding, no cache, the whole sequence re-run for every new token;
    returns the tokens and each step's logits."""
    ids = torch.tensor([encode_prompt(inputs, prompt)])
    pixels = inputs.pixel_values([image])
    new, steps = [], []
    for _ in range(n):
        logits = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits[0, -1].float()
        steps.append(logits.clone())
        logits[inputs.image_token_id] = float("-inf")  # the decoder never emits the image placeholder
        tok = int(logits.argmax())
        new.append(tok)
        if tok == inputs.tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[tok]])], 1)
    return new, torch.stack(steps)


@pytest.mark.parametrize("kind", ["llava", "patch"])
def test_cli_writes_markdown_json_and_grid(kind, checkpoints, tmp_path):
    from PIL import Image

    final = checkpoints[kind]
    out = tmp_path / "samples"
    result = CliRunner().invoke(app, ["sample", "prior", "--model", final, "--reference", final,
                                      "--image", str(IMAGES[0]), "--images-file", str(ASSETS / "prefs.jsonl"),
                                      "--max-new-tokens", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = json.loads((out / "samples.json").read_text())
    n_rows = sum(1 for line in (ASSETS / "prefs.jsonl").read_text().splitlines() if line.strip())
    assert len(rows) == 1 + n_rows
    assert rows[0]["prompt"] == "<image>\nDescribe this picture." and rows[0]["image"] == str(IMAGES[0])
    assert rows[1]["prompt"] == "<image>\nWhat colour is this picture?"  # a row's own prompt
    assert rows[1]["image"] == str(ASSETS / "images" / "red_0.png")
    assert all(isinstance(r["model"], str) and isinstance(r["reference"], str) for r in rows)
    assert [r["model"] for r in rows] == [r["reference"] for r in rows], "the same checkpoint, greedy: same answers"
    md = (out / "samples.md").read_text()
    assert "![samples](grid.png)" in md and "| # | image | prompt | model | reference |" in md
    assert md.count("\n| ") == 1 + 1 + n_rows  # header + one table row per image
    with Image.open(out / "grid.png") as grid:
        assert grid.width >= 4 * 128 and grid.height > 128
    assert result.stdout.count("  [model] ") == 1 + n_rows and "wrote " in result.stdout


@pytest.mark.parametrize("kind", ["llava", "patch"])
def test_cached_batched_decode_equals_full_forward_greedy(kind, checkpoints):
    model, inputs = load_lvlm(checkpoints[kind])
    model.eval()
    images = _images()
    cached = generate_lvlm(model, inputs, images, PROMPTS, max_new_tokens=6, temperature=0.0, keep_scores=True)
    assert len({len(p) for p in cached.prompt_ids}) == 3, "three prompt lengths: the batch is left-padded"
    assert all(p.count(inputs.image_token_id) == inputs.num_image_tokens for p in cached.prompt_ids)
    for image, prompt, got, scores in zip(images, PROMPTS, cached.completion_ids, cached.scores, strict=True):
        want, want_scores = _full_forward_greedy(model, inputs, image, prompt, 6)
        assert got == want, (prompt, got, want)
        # the logits too, not only their argmax: a wrong position or mask moves them (a tiny model's argmax may not)
        torch.testing.assert_close(scores, want_scores, rtol=0, atol=1e-4)
        assert len(got) == 6 or got[-1] == inputs.tokenizer.eos_token_id


@pytest.mark.parametrize("kind", ["llava", "patch"])
def test_sampling_is_seeded_and_batch_independent(kind, checkpoints):
    model, inputs = load_lvlm(checkpoints[kind])
    images = _images()

    def run(seed, batch_size):
        return generate_lvlm(model, inputs, images, PROMPTS, max_new_tokens=8, temperature=1.5, seed=seed,
                             batch_size=batch_size).completion_ids

    first = run(3, 8)
    assert run(3, 8) == first
    assert run(3, 1) == first, "example i draws from its own generator (seed + i), whatever the batch"
    greedy = generate_lvlm(model, inputs, images, PROMPTS, max_new_tokens=8).completion_ids
    assert any(run(s, 8) != greedy for s in (3, 4, 5)), "temperature > 0 samples, it does not decode greedily"


def test_bad_checkpoint_and_bad_image_exit_2(checkpoints, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["sample", "prior", "--model", str(tmp_path / "nope"), "--image", str(IMAGES[0]),
                                  "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and missing.stderr.startswith("error:") and "nope" in missing.stderr
    assert missing.stderr.count("\n") == 1, missing.stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = runner.invoke(app, ["sample", "prior", "--model", checkpoints["patch"], "--image", str(broken)])
    assert bad.exit_code == 2 and bad.stderr.startswith("error:") and "broken.png" in bad.stderr
    assert bad.stderr.count("\n") == 1, bad.stderr
    gone = runner.invoke(app, ["sample", "prior", "--model", checkpoints["patch"],
                               "--images-file", str(tmp_path / "list.txt")])
    assert gone.exit_code == 2 and "--images-file" in gone.stderr
    none = runner.invoke(app, ["sample", "prior", "--model", checkpoints["patch"]])
    assert none.exit_code == 2 and "give --image or --images-file" in none.stderr
    assert not (tmp_path / "o").exists(), "nothing is written when loading fails"


def test_images_file_as_a_path_list_and_as_conversational_rows(checkpoints, tmp_path):
    import shutil

    (tmp_path / "pics").mkdir()
    shutil.copy(IMAGES[1], tmp_path / "pics" / "g.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"pics/g.png\n\n{IMAGES[2]}\n")  # relative to the list's folder, blank line, absolute
    runner = CliRunner()
    res = runner.invoke(app, ["sample", "prior", "--model", checkpoints["patch"], "--images-file", str(listing),
                              "--prompt", "colour?", "--temperature", "1.0", "--seed", "7", "--max-new-tokens", "3",
                              "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert [(r["image"], r["prompt"]) for r in rows] == [(str(tmp_path / "pics" / "g.png"), "colour?"),
                                                         (str(IMAGES[2]), "colour?")]
    assert "reference" not in rows[0]
    res = runner.invoke(app, ["sample", "prior", "--model", checkpoints["llava"], "--images-file",
                              str(ASSETS / "prefs_chat.jsonl"), "--max-new-tokens", "2", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = json.loads((tmp_path / "b" / "samples.json").read_text())
    assert len(rows) == 6 and rows[0]["prompt"] == "<image>What colour is this picture?"
