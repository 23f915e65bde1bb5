"""``loss.kwargs`` values are checked at config load (issue 17, bug 2): types, finiteness, allowed names (the
losses' own tables) and the loss's own range checks, for every METHODS row and every modality; a bad value
raises ConfigError before the output directory is written, and the CLI prints ``error:`` lines, exit 2."""

from __future__ import annotations

import inspect
import re

import pytest
from typer.testing import CliRunner

from mmalign.adapters.causal_lm_family import CausalLMFamily
from mmalign.config import ConfigError
from mmalign.losses import DPO_LOSS_TYPES
from mmalign.methods.loss_kwargs import CHOICES, PROBES, expected_kinds
from mmalign.methods.table import METHODS, check_loss_kwargs, loss_options


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_row_is_checkable(name):
    """Every option of every row has a readable type, every pure loss a probe, and the row's defaults pass."""
    m = METHODS[name]
    if m.loss_fn is None:
        assert all(expected_kinds(inspect.Parameter.empty, v) for v in m.defaults.values()), m.defaults
        assert check_loss_kwargs(m, dict(m.defaults)) == []
        return
    assert m.loss_fn in PROBES, f"add a probe for {m.loss_fn.__name__} to mmalign.methods.loss_kwargs.PROBES"
    for opt, p in loss_options(m).items():
        assert expected_kinds(p.annotation, p.default), (name, opt, p.annotation)
    required = {k: 0.5 for k, p in loss_options(m).items() if p.default is p.empty}
    assert check_loss_kwargs(m, required) == []


def test_choices_are_the_losses_own_tables():
    from mmalign import losses as L

    assert CHOICES[(L.dpo, "loss_type")] is DPO_LOSS_TYPES
    for name in DPO_LOSS_TYPES:  # every loss type of the loss is accepted (extra options some need)
        kw = {"loss_type": name, "label_smoothing": 0.1 if name == "exo_pair" else 0.0}
        assert check_loss_kwargs(METHODS["dpo"], kw) == [], name


@pytest.mark.parametrize("row,key,value,match", [
    ("dpo", "loss_type", "bogus", r"loss.kwargs.loss_type='bogus': 'bogus' is not a loss_type .*allowed: \['aot'"),
    ("dpo", "loss_type", ["sigmoid", "bogus"], "'bogus' is not a loss_type"),
    ("dpo", "beta", float("nan"), "loss.kwargs.beta=nan must be a finite number"),
    ("dpo", "beta", "nan", "loss.kwargs.beta='nan' must be a number"),
    ("dpo", "beta", "abc", "loss.kwargs.beta='abc' must be a number"),
    ("dpo", "beta", "1e-3", "write it with a dot"),
    ("dpo", "beta", -1, r"beta=-1 must be > 0 .*fix: set loss.kwargs.beta"),
    ("dpo", "f_divergence", "kl", "allowed: \\['alpha_divergence'"),
    ("cpo", "loss_type", "kto", "allowed: \\['alphapo', 'hinge'"),
    ("kto", "loss_type", "sigmoid", "allowed: \\['apo_zero_unpaired', 'kto'\\]"),
    ("kto", "desirable_weight", -1.0, "desirable_weight=-1.0 must be a finite number >= 0"),
    ("tdpo", "variant", "tdpo3", "allowed: \\['tdpo1', 'tdpo2'\\]"),
    ("sft", "reduction_over_tokens", "max", "allowed: \\['mean', 'sum'\\]"),
    ("sft", "token_level_mean", "yes", "must be true/false"),
    ("plackett_luce", "top_k", 1.5, "must be an integer or null"),
    ("rm", "reduction", "median", "reduction='median' is not one of"),
    ("clip_refine", "rafa_distance", "l3", "allowed: \\['l2', 'mse'\\]"),
    ("zscl", "temperature", "hot", "temperature='hot' must be a number"),
])
def test_bad_values_are_named(row, key, value, match):
    errors = check_loss_kwargs(METHODS[row], {key: value})
    assert errors and any(re.search(match, e) for e in errors), errors


def test_all_errors_at_once():
    errors = check_loss_kwargs(METHODS["dpo"], {"loss_type": "bogus", "beta": "abc", "betta": 1},
                               family=CausalLMFamily)
    assert len(errors) == 3, errors


@pytest.mark.parametrize("config,override,match", [
    ("configs/text/tiny_dpo.yaml", "loss.kwargs.loss_type=bogus", "'bogus' is not a loss_type of loss 'dpo'"),
    ("configs/text/tiny_dpo.yaml", "loss.kwargs.beta=nan", "beta='nan' must be a number"),
    ("configs/text/tiny_dpo.yaml", "loss.kwargs.beta=abc", "beta='abc' must be a number"),
    ("configs/text/tiny_dpo.yaml", "loss.kwargs.beta=-1", "beta=-1 must be > 0"),
    ("configs/text/tiny_kto.yaml", "loss.kwargs.loss_type=ipo", "not a loss_type of loss 'kto'"),
    ("configs/text/tiny_xpo.yaml", "loss.kwargs.beta=-1", "beta=-1 must be > 0"),
    ("configs/diffusion/tiny_dpo.yaml", "loss.kwargs.loss_type=bogus", "not a loss_type of loss 'dpo'"),
    ("configs/clip/tiny_clip_refine.yaml", "loss.kwargs.rafa_distance=l3", "not a rafa_distance"),
    ("configs/prior/tiny_lvlm_dpo.yaml", "loss.kwargs.beta=abc", "beta='abc' must be a number"),
])
def test_train_refuses_bad_values_before_writing(tmp_path, config, override, match):
    from mmalign.api import train

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        train(config, [override, f"run.output_dir={out}"])
    assert not out.exists()


def test_cli_prints_errors_and_exits_2(tmp_path):
    from mmalign.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "configs/text/tiny_dpo.yaml", "loss.kwargs.loss_type=bogus",
                                   "loss.kwargs.beta=-1", f"run.output_dir={out}"])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and "Traceback" not in res.output and "loss_type='bogus'" in res.output
    assert not out.exists()
