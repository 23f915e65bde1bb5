"""Help texts and console output (usability issue, item 10): plain help (no reST, no markup eaten), recipe options
in ``--help-config``, labelled progress bars, one summary under DDP, no ``past_key_values`` deprecation, sample
grids labelled with their prompts.

``mmalign demo --help`` (one line per demo with its measured time) is covered by
tests/demos/test_seeds.py (every demo has its SUMMARY line) and
tests/test_registry.py, the ``wandb`` extra by tests/test_packaging.py.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from mmalign.cli import app

REPO = Path(__file__).resolve().parents[1]
REST = re.compile(r"``|:(?:func|class|mod|data|meth|attr|obj|exc|ref):`")
WIDE = {"COLUMNS": "300"}


def _commands(cmd=None, path=()):
    """Every command path of the app, groups included (``()`` is ``mmalign`` itself)."""
    cmd = cmd or typer.main.get_command(app)
    yield path, cmd
    for name, sub in (getattr(cmd, "commands", None) or {}).items():
        yield from _commands(sub, (*path, name))


def test_no_rest_markup_in_any_help_and_no_bracket_text_eaten():
    runner = CliRunner()
    paths = [p for p, _ in _commands()]
    assert len(paths) > 10
    for path in paths:
        res = runner.invoke(app, [*path, "--help"], env=WIDE)
        assert res.exit_code == 0, (path, res.output)
        bad = [line.strip() for line in res.output.splitlines() if REST.search(line)]
        assert not bad, f"mmalign {' '.join(path)} --help shows reST: {bad}"
    # rich markup took "[key=value ...]" (root) and "[str, ...]" (an option's help) for tags and dropped them
    assert "[key=value ...]" in runner.invoke(app, ["--help"], env=WIDE).output
    assert "clip_captions: [str, ...]" in runner.invoke(app, ["temple-pairs", "--help"], env=WIDE).output


def test_root_help_keeps_its_command_table_lines():
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"}).output
    lines = [line.strip() for line in out.splitlines()]
    for start, end in (("mmalign train CONFIG.yaml [key=value ...]", "train"),
                       ("mmalign sample text", "generate samples"),
                       ("mmalign demo NAME", "run a demo, report its effect"),
                       ("mmalign losses", "list the loss functions")):
        assert any(line.startswith(start) and line.endswith(end) for line in lines), (start, out)  # one line each


def test_every_train_option_has_help_including_verbose():
    train = typer.main.get_command(app).commands["train"]
    missing = [p.name for p in train.params if isinstance(p, typer.core.TyperOption) and not p.help]
    assert not missing
    out = CliRunner().invoke(app, ["train", "--help"], env=WIDE).output
    assert re.search(r"--verbose\s+-v\s+\S+\s+\w", out), out


@pytest.fixture(scope="module")
def help_config() -> str:
    res = CliRunner().invoke(app, ["train", "--help-config"])
    assert res.exit_code == 0, res.output
    return res.output


def test_help_config_lists_recipe_options_with_defaults(help_config):
    from mmalign.adapters.sparse_masks import TokenOptions
    from mmalign.config import describe
    from mmalign.methods.avp_rpo import AVPRPOOptions
    from mmalign.methods.online import OnlineOptions
    from mmalign.methods.seq_contrastive import SeqContrastiveOptions
    from mmalign.methods.token_guidance import TokenGuidanceOptions

    assert not REST.search(help_config)
    for schema in (OnlineOptions, SeqContrastiveOptions, TokenGuidanceOptions, AVPRPOOptions, TokenOptions):
        for line in describe(schema).splitlines():  # "key: type = default"
            assert f"options.{line}" in help_config, (schema.__name__, line)
    assert "options.num_candidates: int = 4\n    K audios per video and round" in help_config  # the source comment
    assert re.search(r"loss.name=online_dpo \| xpo \(mmalign.methods.online.OnlineOptions\)", help_config)


def test_help_config_covers_every_recipe_that_reads_options(help_config):
    """A recipe whose module reads ``cfg.options`` is listed under its loss name (a new recipe must document its
    options dataclass as ``options:`` to appear)."""
    from mmalign.methods.table import METHODS

    headers = [line for line in help_config.splitlines() if line.startswith("loss.name=")]
    readers = []
    for m in METHODS.values():
        if m.recipe and "cfg.options" in inspect.getsource(importlib.import_module(m.recipe.partition(":")[0])):
            readers.append(m.name)
            assert any(re.search(rf"[= ]{m.name}( |$)", h) for h in headers), (m.name, headers)
    assert {"online_dpo", "xpo", "seq_contrastive", "token_guidance", "avp_rpo"} <= set(readers)


@pytest.mark.parametrize(("env", "printed"), [({"RANK": "1", "LOCAL_RANK": "1"}, False),
                                              ({"RANK": "0", "LOCAL_RANK": "0"}, True),
                                              ({"RANK": "", "LOCAL_RANK": ""}, True)])
def test_only_rank_zero_prints_the_summary(monkeypatch, env, printed):
    import mmalign.api

    monkeypatch.setattr(mmalign.api, "train", lambda config, overrides: {"marker_summary": overrides})
    res = CliRunner().invoke(app, ["train", "run.max_steps=1"], env=env)
    assert res.exit_code == 0, res.output
    assert ("marker_summary" in res.output) is printed, res.output


def test_prior_phases_label_their_progress_bars(tmp_path, capsys):
    """A real PRIOR run (2 reference steps, 1 PRIOR step; a few seconds): two bars, told apart."""
    from mmalign.api import train

    train(str(REPO / "configs/prior/tiny_prior_patch.yaml"),
          [f"run.output_dir={tmp_path}", "run.max_steps=1", "prior.reference_steps=2", "run.progress=true",
           "run.eval_every=0", f"data.train=[{REPO / 'assets/prior/captions.jsonl'}]",
           f"data.eval=[{REPO / 'assets/prior/captions_eval.jsonl'}]", "run.report_to=[jsonl]"])
    err = capsys.readouterr().err
    ref, prior = err.find("text/sft[main]"), err.find("prior/prior[main]")
    assert ref >= 0 and prior > ref, err[-2000:]  # the reference LM's bar first, then PRIOR's


def _no_cache_deprecation():
    """Turn the deprecation into an error: the FutureWarning of the forward call, and transformers' logged warning
    (a ``warning_once``: its cache is cleared so that an earlier test cannot hide it)."""
    from transformers.utils import logging as hf_logging

    clear = getattr(getattr(hf_logging.get_logger("x"), "warning_once", None), "cache_clear", None)
    if clear is not None:
        clear()
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("error", message=".*past_key_values.*")
    return ctx


def test_shared_prompt_scoring_uses_the_cache_argument(caplog):
    from mmalign.adapters.causal_lm import score_batch, score_batch_naive
    from mmalign.adapters.lvlm import shared_prompt_states
    from mmalign.data.batches import TextBatch
    from mmalign.models.text import build_tiny_causal_lm

    model = build_tiny_causal_lm(64, hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32)
    g = torch.Generator().manual_seed(0)
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    comp_mask = torch.tensor([[[1, 1, 0], [1, 1, 1]], [[1, 0, 0], [1, 1, 1]]])
    batch = TextBatch(torch.randint(3, 64, (2, 4), generator=g) * prompt_mask, prompt_mask,
                      torch.randint(3, 64, (2, 2, 3), generator=g) * comp_mask, comp_mask,
                      candidate_mask=torch.ones(2, 2, dtype=torch.bool))
    ctx = _no_cache_deprecation()
    try:
        with caplog.at_level("WARNING"):
            scores = score_batch(model, batch, share_prompt=True)
            decoder = model.model  # the LVLM / VLM families' shared-prompt pass on the same decoder
            ex_idx = torch.tensor([0, 0, 1])
            states = shared_prompt_states(decoder, decoder.embed_tokens, decoder.embed_tokens(batch.prompt_ids),
                                          prompt_mask, (prompt_mask.cumsum(-1) - 1).clamp(min=0),
                                          batch.completion_ids[ex_idx, 0], comp_mask[ex_idx, 0],
                                          4 + torch.arange(3).expand(3, 3), ex_idx, True)
    finally:
        ctx.__exit__(None, None, None)
    assert not [r for r in caplog.records if "past_key_values" in r.getMessage()]
    torch.testing.assert_close(scores.logps, score_batch_naive(model, batch).logps, atol=1e-5, rtol=0)
    assert states.shape == (3, 4, 16)


def test_sample_grid_rows_are_labelled_with_their_prompts(tmp_path):
    from mmalign.sample import diffusion as SD

    images = {"cfg w=5": torch.rand(2, 3, 3, 8, 8), "npo w=5": torch.rand(2, 3, 3, 8, 8)}
    long = "a blue square on a red background, seen from far away"
    rows, labels = SD.grid_rows(images, ["a red circle", long])
    assert rows.shape[:2] == (4, 3)
    assert labels[:2] == ["a red circle | cfg w=5", "a red circle | npo w=5"]
    assert labels[2].startswith(long[:30]) and labels[2].endswith("... | cfg w=5")
    with pytest.raises(ValueError, match="one prompt per row"):
        SD.grid_rows(images, ["only one"])


def test_cli_sample_diffusion_passes_the_prompts_to_the_grid(monkeypatch, tmp_path):
    """The command's grid labels (the PNG writer's row_labels) name the prompts, not ``p0``/``p1``."""
    from mmalign.sample import diffusion as SD

    class Comps:
        denoiser = torch.nn.Linear(1, 1)

        def to(self, device):
            return self

    seen = {}
    monkeypatch.setattr(SD, "load_components", lambda path, dtype: Comps())
    monkeypatch.setattr(SD, "base_pipeline_dir", lambda path: Path(path))
    monkeypatch.setattr(SD, "build_pipeline", lambda comps, denoiser, sampler: object())
    monkeypatch.setattr(SD, "sample_settings", lambda pipe, settings, prompts, seeds, num_inference_steps: {
        s.name: torch.rand(len(prompts), len(seeds), 3, 4, 4) for s in settings})
    real_save = SD.save_grid

    def save(rows, out, **kw):
        seen.update(kw)
        return real_save(rows, out, **kw)

    monkeypatch.setattr(SD, "save_grid", save)
    out = tmp_path / "grid.png"
    res = CliRunner().invoke(app, ["sample", "diffusion", "--model", str(tmp_path), "--prompt", "a red circle",
                                   "--prompt", "a green square", "--seeds", "0", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert seen["row_labels"] == ["a red circle | cfg w=5", "a green square | cfg w=5"]
    assert json.loads(out.with_suffix(".json").read_text())["prompts"] == ["a red circle", "a green square"]
    from PIL import Image

    img = torch.tensor(list(Image.open(out).convert("L").getdata())).reshape(Image.open(out).size[::-1])
    label_w = 8 + 6 * len(seen["row_labels"][0])
    assert (img[:, :label_w] < 128).sum() > 20  # the labels are drawn in the label column
