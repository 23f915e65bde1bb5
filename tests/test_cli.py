"""The ``mmalign`` command tree, pinned: every command and flag users script against keeps its name (the app is
built from mmalign.registry; a change here is a change to the public CLI and belongs in the README too)."""

from __future__ import annotations

import subprocess
import sys

import typer
from typer.testing import CliRunner

from mmalign.cli import app

EXPECTED = {
    "train": ["config", "--help-config", "--verbose", "-v", "--dry-run"],
    "demo": ["name", "--out", "--seeds", "--full", "--fast"],
    "losses": [],
    "merge": ["adapter_dir", "--out", "--base", "--dtype", "--overwrite", "--no-overwrite"],
    "pairs": ["--strong", "--weak", "--prompts", "--out", "--reward", "--on-disagreement", "--curriculum",
              "--max-new-tokens", "--temperature", "--seed", "--chat", "--no-chat", "--chat-template"],
    "temple-pairs": ["--model", "--videos", "--out", "--kinds", "--magnitudes", "--max-new-tokens", "--temperature",
                     "--seed", "--chat", "--no-chat", "--check-videos", "--no-check-videos"],
    "temple-pairs-vlm": ["--model", "--videos", "--out", "--kinds", "--magnitudes", "--unit", "--clip-len",
                         "--instruction", "--max-new-tokens", "--temperature", "--seed", "--batch-size", "--fps",
                         "--max-frames", "--max-pixels", "--device"],
    "sample text": ["--model", "--reference", "--prompt", "--prompts-file", "--max-new-tokens", "--temperature",
                    "--seed", "--chat", "--no-chat", "--chat-template", "--out"],
    "sample diffusion": ["--model", "--base", "--npo", "--alpha", "--beta", "--prompt", "--prompts-file", "--seeds",
                         "--guidance-scale", "--negative-prompt", "--steps", "--sampler", "--dtype", "--device",
                         "--save-offset", "--out"],
    "sample prior": ["--model", "--reference", "--image", "--images-file", "--prompt", "--max-new-tokens",
                     "--temperature", "--seed", "--out"],
    "sample vlm": ["--model", "--reference", "--data", "--image", "--video", "--prompt", "--limit", "--max-new-tokens",
                   "--temperature", "--seed", "--fps", "--max-frames", "--max-pixels", "--media-root", "--device",
                   "--out"],
    "sample v2a": ["--model", "--video", "--videos-file", "--seeds", "--guidance-scale", "--steps", "--device",
                   "--out"],
    "eval text": ["--model", "--prompts", "--reference", "--reward", "--seeds", "--samples", "--max-new-tokens",
                  "--temperature", "--chat", "--no-chat", "--batch-size", "--device", "--out"],
    "eval diffusion": ["--model", "--prompts", "--base", "--reward", "--seeds", "--guidance-scale", "--steps",
                       "--sampler", "--dtype", "--batch-size", "--device", "--out"],
    "eval clip": ["--model", "--data", "--zeroshot", "--pretrained", "--image-root", "--image-key", "--caption-key",
                  "--max-images", "--batch-size", "--device", "--out"],
    "eval av": ["--model", "--data", "--offset", "--slow-weight", "--fast-weight", "--media-root", "--max-videos",
                "--batch-size", "--device", "--out"],
}


def _tree(cmd, path=()):
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _tree(sub, (*path, name))
        return
    names = []
    for p in cmd.params:
        names += [*p.opts, *p.secondary_opts] if p.param_type_name == "option" else [p.name]
    yield " ".join(path), names, cmd


def test_command_tree_and_flags_are_unchanged():
    found = {path: names for path, names, _ in _tree(typer.main.get_command(app))}
    assert found == EXPECTED
    assert list(found) == list(EXPECTED)  # `mmalign --help` lists them in this order


def test_train_takes_trailing_overrides():
    train = {path: cmd for path, _, cmd in _tree(typer.main.get_command(app))}["train"]
    assert train.context_settings == {"allow_extra_args": True, "ignore_unknown_options": True}
    out = CliRunner().invoke(app, ["train", "run.max_steps=abc", "data.train=[x.jsonl]"])
    assert out.exit_code == 2 and "run.max_steps" in out.output


def test_losses_and_unknown_demo():
    runner = CliRunner()
    out = runner.invoke(app, ["losses"])
    assert out.exit_code == 0 and "dpo" in out.output
    out = runner.invoke(app, ["demo", "nope"])
    assert out.exit_code == 2 and "unknown demo 'nope'" in out.output


def test_python_dash_m_runs_the_same_app():
    for mod in ("mmalign", "mmalign.cli"):
        run = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "temple-pairs" in run.stdout, run.stderr
