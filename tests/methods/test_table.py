"""The one METHODS table: every row is complete, names resolve (aliases too), unknown names list the valid ones,
and what a family cannot feed is refused with the reason."""

from __future__ import annotations

import inspect

import pytest

from mmalign.adapters.causal_lm_family import CausalLMFamily
from mmalign.adapters.diffusion_family import DiffusionFamily
from mmalign.adapters.family import NEEDS, ModelFamily
from mmalign.config import ConfigError
from mmalign.methods.table import ALIASES, METHODS, Method, check_loss_kwargs, get_method, refusal, valid_names

# "videos": rows of videos only (AVP-RPO generates and ranks its own candidates)
FORMATS = {"pairs", "unpaired", "ranked", "sft", "prompts", "captions", "videos"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_row_is_complete(name):
    m = METHODS[name]
    assert m.name == name and (callable(m.fn) or m.recipe), f"{name}: only a recipe's task may compute the loss"
    assert bool(m.recipe) == bool(m.family) and (m.recipe or not m.data_free)
    assert m.loss_fn is not None or m.why, f"{name}: give the pure loss whose options loss.kwargs sets, or why not"
    assert m.needs and m.needs <= set(NEEDS), sorted(m.needs - set(NEEDS))
    assert m.formats and set(m.formats) <= FORMATS
    assert m.aux in ("", "retain", "scores") and (m.aux == "retain") == m.unlearning
    assert m.token_masks in ("", "learned", "activation")
    if m.loss_fn is not None:  # the fn's call matches the loss's signature: options are keyword-only
        assert any(p.kind is inspect.Parameter.KEYWORD_ONLY for p in inspect.signature(m.loss_fn).parameters.values())


def test_aliases_point_at_rows():
    assert set(ALIASES.values()) <= set(METHODS)
    assert not set(ALIASES) & set(METHODS)
    for alias, name in ALIASES.items():
        assert get_method(alias, DiffusionFamily) is METHODS[name]


def test_unknown_name_lists_the_sorted_valid_names():
    with pytest.raises(ConfigError) as e:
        get_method("dpoo", CausalLMFamily, where="stages.0.loss")
    (msg,) = e.value.errors
    valid = valid_names(CausalLMFamily)
    assert msg == f"stages.0.loss.name='dpoo' is not a text method; valid: {valid}"
    assert valid == sorted(valid) and "tdpo" in valid and "listwise" in valid
    with pytest.raises(ConfigError) as e:
        get_method("wrong", DiffusionFamily)
    assert "is not a diffusion method; valid: " in e.value.errors[0]
    assert "tdpo" not in valid_names(DiffusionFamily) and "rm" not in valid_names(DiffusionFamily)
    with pytest.raises(ConfigError, match=r"valid: \['alphapo'"):
        get_method("nope")  # no family: every name


def test_recipe_rows_are_rows_of_their_family():
    """Recipe names are valid names of their family (listed on a typo), refused by the others with the reason;
    the family's plain task refuses them and points at build_task."""
    from mmalign.api import load_train_config
    from mmalign.methods.diffusion import DiffusionTask
    from mmalign.methods.preference import resolve_stage_losses

    assert get_method("self_npo", DiffusionFamily).recipe == "mmalign.methods.self_npo:SelfNPOTask"
    assert METHODS["xpo"].defaults == {"alpha": 1e-5} and check_loss_kwargs(METHODS["xpo"], {"alpha": 0.1}) == []
    assert check_loss_kwargs(METHODS["online_dpo"], {"alpha": 0.1})  # only XPO has an exploration bonus
    with pytest.raises(ConfigError, match="recipe of the diffusion family"):
        get_method("self_npo", CausalLMFamily)
    cfg = load_train_config({"modality": "diffusion", "loss": {"name": "self_npo"}})
    with pytest.raises(ConfigError, match="self_npo: the mmalign.methods.self_npo:SelfNPOTask recipe.*build_task"):
        resolve_stage_losses(cfg, DiffusionFamily, DiffusionTask)


@pytest.mark.parametrize("family", [CausalLMFamily, DiffusionFamily], ids=lambda f: f.name)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_refusal_follows_needs(name, family):
    m = METHODS[name]
    why = family.refusal(m)
    if m.needs <= family.provides:
        assert why is None
    else:
        assert why.startswith(f"loss {name!r} cannot run on the {family.name} family: it needs ")
        for need in sorted(m.needs - family.provides):
            reason = family.cannot.get(need, f"the {family.name} family does not compute it")
            assert f"({need}): {reason}" in why


def test_the_text_and_diffusion_rows():
    """Every non-contrastive row runs on the causal LM; the diffusion family refuses the per-token and value-head
    rows only. Recipe rows run on their own family only."""
    sequence_rows = {n for n, m in METHODS.items() if "embeddings" not in m.needs and not m.recipe}
    assert {n for n in sequence_rows if refusal(METHODS[n], CausalLMFamily) is None} == sequence_rows
    refused = {n for n in sequence_rows if refusal(METHODS[n], DiffusionFamily) is not None}
    assert refused == {"rm", "tdpo", "sparsepo", "sparsepo_activation"}
    recipes = {n for n, m in METHODS.items() if m.recipe}
    assert {n for n in recipes if refusal(METHODS[n], CausalLMFamily) is None} == {
        "online_dpo", "xpo", "seq_contrastive", "token_guidance"}
    assert {n for n in recipes if refusal(METHODS[n], DiffusionFamily) is None} == {"self_npo"}


def test_a_new_family_gets_the_refusal_for_free():
    class Encoder(ModelFamily):
        name, modality, provides = "dual_encoder", "clip", frozenset({"embeddings"})

    why = Encoder.refusal(METHODS["dpo"])
    assert "cannot run on the dual_encoder family" in why and "(logps)" in why and "does not compute it" in why
    row = Method("contrastive", "pairs", False, lambda p, r, b, kw: None, {"embeddings"}, why="options from defaults")
    assert Encoder.refusal(row) is None and check_loss_kwargs(row, {"x": 1}) == []


def test_loss_kwargs_checks():
    dpo = METHODS["dpo"]
    assert check_loss_kwargs(dpo, {"beta": 0.1, "loss_type": "ipo"}) == []
    assert check_loss_kwargs(dpo, {"betta": 1})[0].startswith("loss.kwargs.betta: not an option of loss 'dpo'")
    # family-consumed keys and per-token options
    assert check_loss_kwargs(dpo, {"beta_convention": "original"}, family=DiffusionFamily) == []
    assert check_loss_kwargs(dpo, {"beta_convention": "original"}, family=CausalLMFamily)
    (err,) = check_loss_kwargs(METHODS["sft"], {"token_level_mean": True}, family=DiffusionFamily)
    assert "per-token option" in err and "diffusion" in err
    assert check_loss_kwargs(METHODS["sft"], {"token_level_mean": True}, family=CausalLMFamily) == []


def test_positional_rows_still_build():
    """Rows built positionally with one format string."""
    row = Method("my_pl", "sft", True, lambda *a: None, loss_fn=METHODS["plackett_luce"].loss_fn)
    assert row.formats == ("sft",) and row.data_format == "sft" and row.needs == frozenset({"logps"})
    assert not row.value_head and not row.token_kl


@pytest.mark.parametrize("config,overrides,match", [
    ("configs/text/tiny_dpo.yaml", ["loss.kwargs.betta=0.1"], "loss.kwargs.betta: not an option of loss 'dpo'"),
    ("configs/diffusion/tiny_dpo.yaml", ["loss.name=tdpo"], "cannot run on the diffusion family"),
    ("configs/clip/tiny_clip_refine.yaml", ["loss.name=dpo"], "cannot run on the dual_encoder family"),
    ("configs/prior/tiny_lvlm_dpo.yaml", ["loss.name=sparsepo"], "cannot run on the lvlm family"),
])
def test_train_refuses_before_writing_or_building(tmp_path, config, overrides, match):
    """mmalign.api.train reports loss problems at config load: no output directory, no model built."""
    from mmalign.api import train
    from mmalign.config import ConfigError

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        train(config, [*overrides, f"run.output_dir={out}"])
    assert not out.exists()


def test_help_config_suggests_only_rows():
    """--help-config's loss.name examples are METHODS rows (it once suggested ``listwise``, an alias refused with
    the default kwargs), and a wrong name lists every recipe of the family as valid."""
    from mmalign.config import describe
    from mmalign.schema import LOSS_NAME_EXAMPLES, TrainConfig

    assert set(LOSS_NAME_EXAMPLES) <= set(METHODS)
    assert ", ".join(LOSS_NAME_EXAMPLES) in describe(TrainConfig)
    with pytest.raises(ConfigError) as err:
        get_method("bogus", CausalLMFamily)
    recipes = {n for n, m in METHODS.items() if m.family == "causal_lm"}
    assert recipes and all(repr(n) in str(err.value) for n in recipes)
