"""Sequence-level contrastive preference optimisation with self-made negatives (``loss.name=seq_contrastive``).

Feng et al. 2025, "Sequence-level Large Language Model Training with Contrastive Preference Optimization",
arXiv 2502.16433 (research/llm_losses.md §1). On plain SFT rows (prompt/completion) the ground-truth
continuation is the positive and K−1 negatives are made by :mod:`mmalign.data.negatives` (AN/BN/MN/TN) before
every training micro-batch (:meth:`SeqContrastiveTask.prepare_batch`, seeded from the run seed, the step and the
batch's data indices, so a resumed run makes the same negatives). The loss is the Plackett–Luce DPO
(:func:`mmalign.losses.plackett_luce`) over ``s_k = β·(log π_θ(y_k|x) − log π_ref(y_k|x))``:

- top-1 ("choice") form, ``−s_1 + log Σ_j exp s_j``, when only "the positive is best" is known (AN, BN, MN, TN);
- the full ranking, positive first then negatives by decreasing similarity, with ``rank_by_similarity``
  (the paper's "…R" variants, e.g. ANR).

With one negative both forms are sigmoid DPO with chosen = ground truth. π_ref is the model before this run
(a frozen copy, or the LoRA-disabled base), as in the paper.

Where this follows and where it deviates from the paper (no public code was found; the loss is read from a
digest of the paper, research/llm_losses.md §1):
- the published equation lacks the leading minus sign; restored;
- *unverified*: whether the unranked runs used the top-1 form (the digest only shows the ranked one);
- *unverified*: the similarity used for ranking (ours: ROUGE-L F1 of token ids), the mean-field rate c (ours:
  0.25 by default), and the MLE mixing weight (``loss.sft_weight``, 0 by default; the paper mentions combining
  with MLE without giving a coefficient);
- negatives identical to their positive are dropped, and EOS is never corrupted (see the data module);
- AN negatives come from the *current* policy (the paper allows the current or the reference model).
Evaluation batches get negatives too (same generators, seeds fixed per eval batch), so ``eval/rewards/accuracies``
is the rate at which the positive out-scores every negative.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..adapters.causal_lm import unwrap_causal_lm
from ..adapters.causal_lm_family import content_key
from ..config import ConfigError, from_dict
from ..data import negatives as N
from ..data.batches import TextBatch
from ..schema import StageConfig, TrainConfig
from ..types import Scores
from .table import METHODS
from .task import StageData
from .text import TextTask

Kind = Literal["autoregressive", "batch", "mean_field", "truncation"]


@dataclass
class SeqContrastiveOptions:
    """The run config's ``options:`` for ``loss.name=seq_contrastive``."""

    negatives: list[Kind] = field(default_factory=lambda: ["autoregressive", "truncation"])
    num_per_kind: int = 1  # negatives of each kind per row
    mean_field_rate: float = 0.25  # c: share of content positions replaced (unverified default)
    mean_field_sample: bool = False  # MN replacement: sample at `temperature` instead of argmax
    rank_by_similarity: bool = False  # the "…R" variants: full PL ranking by similarity to the positive
    temperature: float = 1.0  # AN sampling temperature (0 = greedy)
    top_p: float = 1.0
    max_new_tokens: int = 64  # AN length cap
    eval_negatives: bool = True  # make negatives for eval batches too (else eval loss is 0)

    def validate(self) -> list[str]:
        errors = []
        if not self.negatives:
            errors.append("negatives is empty: name at least one of " + str(list(N.KINDS)))
        if len(set(self.negatives)) != len(self.negatives):
            errors.append(f"negatives={self.negatives} repeats a kind; use num_per_kind for more of one kind")
        if self.num_per_kind < 1:
            errors.append(f"num_per_kind={self.num_per_kind} must be >= 1")
        if not 0.0 < self.mean_field_rate <= 1.0:
            errors.append(f"mean_field_rate={self.mean_field_rate} must be in (0, 1] (a share of positions)")
        if self.temperature < 0:
            errors.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            errors.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            errors.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        return errors


METHOD = METHODS["seq_contrastive"]  # its row: Plackett–Luce over the log-ratios, options of L.plackett_luce


def config_problems(cfg: TrainConfig) -> list[str]:
    """Every problem of a seq_contrastive run beyond its loss names and kwargs (checked against the row):
    ``options``, the reference strategy and the data format."""
    errors: list[str] = []
    try:
        from_dict(SeqContrastiveOptions, cfg.options, source="options")
    except ConfigError as e:
        errors += [f"options: {m}" for m in e.errors]
    if cfg.reference.strategy in ("precomputed", "none"):
        errors.append(f"reference.strategy={cfg.reference.strategy!r} cannot serve seq_contrastive: negatives are "
                      "new every step (no cached scores) and the loss needs π_ref; use auto, copy, adapter, sync "
                      "or ema")
    if cfg.data.format not in ("auto", "sft"):
        errors.append(f"data.format={cfg.data.format!r}: seq_contrastive reads SFT rows (prompt/completion); "
                      "set data.format=sft or auto")
    return errors


class _EvalView:
    """The eval dataset with a marker in each example's meta, so the shared collate adds eval negatives."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.examples = dataset.examples

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        ex = self.dataset[index]
        ex.meta["_seq_contrastive_eval"] = True
        return ex


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


class SeqContrastiveTask(TextTask):
    """Text recipe for Feng et al.'s contrastive training on SFT rows (see the module docstring): the text task
    with its row (Plackett–Luce over the log-ratios, the optional SFT term) plus the hooks :meth:`prepare_batch`
    (this step's negatives), :meth:`stage_data` (negatives for eval batches too) and :meth:`loss` (per-kind
    metrics)."""

    @classmethod
    def check(cls, cfg: TrainConfig, uses) -> list[str]:
        return config_problems(cfg)

    def __init__(self, cfg: TrainConfig, *, tokenizer=None, model: nn.Module | None = None):
        super().__init__(cfg, tokenizer=tokenizer, model=model)  # checks everything (check above), builds once
        self.opts = from_dict(SeqContrastiveOptions, cfg.options, source="options")
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise ConfigError("seq_contrastive needs a tokenizer with an eos_token (truncation negatives and "
                              "generation end with it); set tokenizer.eos_token", source=cfg.model.name_or_path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_id

    # -- data ---------------------------------------------------------------------------------------------
    def stage_data(self, stage: StageConfig) -> StageData:
        data = super().stage_data(stage)
        base = data.collate
        if data.eval is None or not self.opts.eval_negatives:
            return data

        def collate(examples):
            batch = base(examples)
            if examples and examples[0].meta.get("_seq_contrastive_eval"):
                idx = tuple(int(e.meta.get("data_index", -1)) for e in examples)
                dev = next(self.model.parameters()).device
                batch = self.add_negatives(self.model, batch.to(dev), _seed(self.cfg.run.seed, "eval", idx))
            return batch

        data.eval = _EvalView(data.eval)
        data.collate = collate
        data.eval_key = data.eval_key or content_key(data.eval)
        return data

    def add_negatives(self, model: nn.Module, batch: TextBatch, seed: int) -> TextBatch:
        """``batch`` (K=1 ground truths) with the configured negatives appended (see
        :func:`mmalign.data.negatives.build_candidates`). Deterministic given ``seed`` and the model."""
        o = self.opts
        gen = torch.Generator().manual_seed(seed)
        lm = unwrap_causal_lm(model).lm  # through DDP/PEFT wrappers; LoRA layers are injected in place
        pos = N.positives(batch)
        rows: list[list[tuple[str, list[int]]]] = [[] for _ in pos]
        for kind in o.negatives:  # in the configured order: same options + seed -> same negatives
            if kind == "autoregressive":
                made = N.autoregressive_negatives(lm, batch, num=o.num_per_kind, max_new_tokens=o.max_new_tokens,
                                                  temperature=o.temperature, top_p=o.top_p, seed=seed,
                                                  eos_id=self.eos_id, pad_id=self.pad_id)
            elif kind == "batch":
                made = N.batch_negatives(pos, num=o.num_per_kind, generator=gen)
            elif kind == "mean_field":
                made = N.mean_field_negatives(lm, batch, rate=o.mean_field_rate, num=o.num_per_kind,
                                              eos_id=self.eos_id, generator=gen, sample=o.mean_field_sample,
                                              temperature=o.temperature)
            else:
                made = N.truncation_negatives(pos, eos_id=self.eos_id, num=o.num_per_kind, generator=gen)
            for i, negs in enumerate(made):
                rows[i] += [(kind, ids) for ids in negs]
        return N.build_candidates(batch, rows, pad_id=self.pad_id, eos_id=self.eos_id,
                                  rank_by_similarity=o.rank_by_similarity)

    @torch.no_grad()
    def prepare_batch(self, model: nn.Module, batch: TextBatch, step: int) -> TextBatch:
        """Called by the loop before each training micro-batch: append this step's negatives."""
        idx = tuple(batch.extras["index"].tolist()) if "index" in batch.extras else ()
        return self.add_negatives(model, batch, _seed(self.cfg.run.seed, step, idx))

    # -- loss ---------------------------------------------------------------------------------------------
    def loss(self, policy: Scores, reference: Scores | None, batch: TextBatch, aux: Scores | None = None):
        """The row's loss (+ ``loss.sft_weight`` × MLE on the positive, as the paper suggests combining; weight
        unverified), with per-kind metrics."""
        if reference is None:
            raise ValueError("seq_contrastive needs reference scores (π_ref = the model before this run)")
        out = super().loss(policy, reference, batch, aux)
        out.metrics.update(_kind_metrics(policy, reference, batch))
        return out


@torch.no_grad()
def _kind_metrics(policy: Scores, reference: Scores, batch: TextBatch) -> dict[str, torch.Tensor]:
    """Per negative kind: ``accuracy/<kind>`` = share of its negatives whose log-ratio is below the positive's,
    ``count/<kind>`` = negatives per row; ``logps/positive`` and ``logps/negatives`` (policy, mean)."""
    ratio = (policy.logps - reference.logps).float()
    kinds = batch.extras.get("candidate_kind")
    if kinds is None:
        return {}
    out = {"logps/positive": policy.logps[:, 0].float().mean()}
    neg = kinds > 0
    if bool(neg.any()):
        out["logps/negatives"] = policy.logps.float()[neg].mean()
    b = ratio.shape[0]
    for kind in N.KINDS:
        sel = kinds == N.KIND_CODES[kind]
        if bool(sel.any()):
            wins = (ratio[:, :1] > ratio).float()
            out[f"accuracy/{kind}"] = wins[sel].mean()
            out[f"count/{kind}"] = sel.sum().float() / b
    return out
