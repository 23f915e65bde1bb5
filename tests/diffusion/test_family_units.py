"""The diffusion family scores in the losses' own units (``logps = −c·err``, c = ½ original / 1 diffusers), so the
generic rows of the one METHODS table reproduce the former diffusion-only formulas bit for bit: Diffusion-DPO
(every ``loss_type``) against :func:`mmalign.losses.diffusion_dpo` on the errors, Diffusion-NPO against
:func:`mmalign.losses.diffusion_npo`, and the former Diffusion-KTO / Plackett–Luce / SFT code (re-stated below).
The whole task path runs: family score → β defaults → row → family metrics."""

from __future__ import annotations

import pytest
import torch

from mmalign import losses as L
from mmalign.api import load_train_config
from mmalign.data.batches import ImageBatch
from mmalign.losses.pairwise import DPO_LOSS_TYPES
from mmalign.methods.diffusion import DiffusionTask
from mmalign.methods.table import ranking_order
from mmalign.schema import StageConfig
from mmalign.types import Scores

from . import tiny_config

B = 6
# In the diffusers convention logps = −err and β = β_diffusers; every loss type that reads the logit only through
# β·logit (and its metrics) agrees bit for bit. These two also read the implicit rewards without β (IPO's
# (logit − 1/(2β))², SPPO-hard's (log-ratio − 1/(2β))²), so there they use the diffusers script's own units: IPO
# is then exactly the IPO that the diffusers SD1.5 script intends, (ref_diff − model_diff − 1/(2β_diffusers))²,
# four times the former value. In the original convention every loss type agrees bit for bit.
OWN_UNITS_IN_DIFFUSERS = {"ipo", "sppo_hard"}


class _Errors:
    """Stands in for DiffusionAdapter: returns given errors as the adapter does (logps = −err, extras err)."""

    def __init__(self):
        self.err = None

    def score(self, model, batch):
        return Scores(logps=-self.err, extras={"err": self.err, "timesteps": torch.full((self.err.shape[0],), 7.0)})


@pytest.fixture(scope="module", params=["original", "diffusers"])
def task(request, tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("units"), diffusion={"resolution": 16,
                                                                     "beta_convention": request.param})
    t = DiffusionTask(load_train_config(cfg))
    t.family.adapter = _Errors()
    return t


def _errors(seed: int, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m, r = torch.rand(B, k, generator=g) * 0.02 + 0.1, torch.rand(B, k, generator=g) * 0.02 + 0.1
    m[0], r[0] = 0.1, 0.1  # one exact tie (s = 0)
    return m, r


def _scores(task, m: torch.Tensor, r: torch.Tensor) -> tuple[Scores, Scores]:
    task.family.adapter.err = m
    policy = task.score(None, None)
    task.family.adapter.err = r
    ref = Scores(logps=task.score(None, None).logps)  # as a precomputed reference stores it: logps only
    return policy, ref


def _configure(task, name: str, kwargs: dict) -> None:
    task.cfg.loss.name, task.cfg.loss.kwargs = name, kwargs
    task.configure_stage(StageConfig())


def test_logps_are_minus_c_err(task):
    m, _ = _errors(0)
    task.family.adapter.err = m
    s = task.score(None, None)
    c = 0.5 if task.family.convention == "original" else 1.0
    assert torch.equal(s.logps, -c * m) and torch.equal(s.extras["nll"], m)
    assert torch.equal(s.lengths, torch.ones_like(m))


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSS_TYPES))
@pytest.mark.parametrize("name", ["dpo", "npo_diffusion"])
def test_dpo_rows_equal_the_former_diffusion_dpo(task, name, loss_type):
    conv = task.family.convention
    beta = 5000.0 if conv == "original" else 2500.0
    m, r = _errors(1)
    extra = {"label_smoothing": 1e-3} if loss_type == "exo_pair" else {}
    _configure(task, name, {"beta": beta, "loss_type": loss_type, **extra})
    policy, ref = _scores(task, m, r)
    out = task.loss(policy, ref, ImageBatch(captions=[""] * B, extras={}))
    former = L.diffusion_npo if name == "npo_diffusion" else L.diffusion_dpo
    old = former(m[:, 0], m[:, 1], r[:, 0], r[:, 1], beta=beta, beta_convention=conv, loss_type=loss_type,
                 **extra)
    if conv == "diffusers" and loss_type in OWN_UNITS_IN_DIFFUSERS:
        assert not torch.equal(out.loss, old.loss)
        if loss_type == "ipo":
            torch.testing.assert_close(out.loss, 4 * old.loss)
        return
    assert torch.equal(out.loss, old.loss) and torch.equal(out.per_example, old.per_example)
    for key, value in old.metrics.items():  # rewards/*, diffusion/* metrics: the same values
        assert torch.equal(out.metrics[key], value), key
    assert not [k for k in out.metrics if k.startswith("logps/")]
    # the diffusers scripts' accuracy (ties ½) and the shared timestep, as the former DiffusionTask logged them
    w, lo = (1, 0) if name == "npo_diffusion" else (0, 1)
    s = -(L.convert_beta(beta, conv, "original") / 2) * ((m[:, w] - r[:, w]) - (m[:, lo] - r[:, lo]))
    assert torch.equal(out.metrics["rewards/accuracies_ties_half"], ((s > 0).float() + 0.5 * (s == 0).float()).mean())
    assert out.metrics["diffusion/timestep"] == 7.0


def test_default_beta_is_the_conventions(task):
    m, r = _errors(2)
    _configure(task, "dpo", {})
    policy, ref = _scores(task, m, r)
    out = task.loss(policy, ref, ImageBatch(captions=[""] * B, extras={}))
    old = L.diffusion_dpo(m[:, 0], m[:, 1], r[:, 0], r[:, 1], beta=5000.0, beta_convention="original")
    assert torch.equal(out.loss, old.loss)  # 5000 original == 2500 diffusers


def test_kto_row_equals_the_former_diffusion_kto(task):
    conv = task.family.convention
    beta = 4000.0
    m, r = _errors(3, k=1)
    labels = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0], [0.0]])
    _configure(task, "diffusion_kto", {"beta": beta})
    policy, ref = _scores(task, m, r)
    out = task.loss(policy, ref, ImageBatch(captions=[""] * B, labels=labels, extras={}))
    # the former methods/diffusion.py _kto: pseudo log-probs −err/2 and the original-convention β
    b = L.convert_beta(beta, conv, "original")
    lp, rp = -0.5 * m[:, 0], -0.5 * r[:, 0]
    old = L.kto(lp, rp, labels[:, 0] > 0.5, kl_ref_point=L.kto_reference_point(lp, rp), beta=b)
    assert torch.equal(out.loss, old.loss) and torch.equal(out.per_example, old.per_example)


def test_plackett_luce_row_equals_the_former_listwise(task):
    conv = task.family.convention
    beta = 3000.0
    m, r = _errors(4, k=4)
    labels = torch.tensor([[2.0, 0.0, 1.0, 3.0]] * B)
    mask = torch.ones(B, 4, dtype=torch.bool)
    mask[1, 3] = False
    m[1, 3], r[1, 3], labels[1, 3] = 0.0, 0.0, float("nan")  # a padding candidate scores 0, as the adapter's
    batch = ImageBatch(captions=[""] * B, labels=labels, candidate_mask=mask, extras={})
    _configure(task, "listwise", {"beta": beta})
    policy, ref = _scores(task, m, r)
    out = task.loss(policy, ref, batch)
    # the former methods/diffusion.py _plackett_luce: scores −(m − r)/2 and the original-convention β
    b = L.convert_beta(beta, conv, "original")
    old = L.plackett_luce(-0.5 * (m - r), ranking_order(labels, mask), candidate_mask=mask, beta=b)
    assert torch.equal(out.loss, old.loss) and torch.equal(out.per_example, old.per_example)


def test_plackett_luce_k2_equals_dpo(task):
    m, r = _errors(5)
    batch = ImageBatch(captions=[""] * B, labels=torch.tensor([[0.0, 1.0]] * B), extras={})
    _configure(task, "plackett_luce", {"beta": 3000.0})
    pl = task.loss(*_scores(task, m, r), batch)
    _configure(task, "dpo", {"beta": 3000.0})
    dpo = task.loss(*_scores(task, m, r), batch)
    torch.testing.assert_close(pl.loss, dpo.loss)


def test_sft_row_is_the_denoising_mse_on_the_winner(task):
    m, _ = _errors(6, k=1)
    _configure(task, "sft", {})
    task.family.adapter.err = m
    out = task.loss(task.score(None, None), None, ImageBatch(captions=[""] * B, extras={}))
    old = L.diffusion_sft(m[:, 0])
    assert torch.equal(out.loss, old.loss) and torch.equal(out.metrics["diffusion/model_mse"], old.metrics[
        "diffusion/model_mse"])


def test_sft_weight_adds_the_winner_mse(task):
    m, r = _errors(7)
    _configure(task, "dpo", {"beta": 5000.0})
    task.sft_weight = 0.5
    try:
        out = task.loss(*_scores(task, m, r), ImageBatch(captions=[""] * B, extras={}))
    finally:
        task.sft_weight = 0.0
    conv = task.family.convention
    old = L.diffusion_dpo(m[:, 0], m[:, 1], r[:, 0], r[:, 1], beta=5000.0, beta_convention=conv)
    torch.testing.assert_close(out.loss, old.loss + 0.5 * m[:, 0].mean())
