"""Online DPO (Guo et al., arXiv 2402.04792) and XPO (Xie et al., arXiv 2405.21046) as one text recipe.

Each training micro-batch holds prompts only; :meth:`OnlineDPOTask.prepare_batch` (called by the loop before
scoring) samples completions with the KV cache (``model.generate``), scores them with a reward function or a
saved reward model, and orders them chosen/rejected. The step then trains with :func:`mmalign.losses.dpo` on
that pair, as TRL's ``experimental/online_dpo`` trainer does:

- **online_dpo**: two samples of the current policy per prompt.
- **xpo**: one policy sample y and one *reference* sample ỹ per prompt (paper Algorithm 1; TRL's
  ``XPOTrainer``, research note llm_losses.md §6), and the loss adds the exploration term ``α · log π_θ(ỹ)``
  (:func:`mmalign.losses.xpo_bonus`; summed token log-probs, taken whether ỹ won or lost). α = 0 is exactly the
  DPO loss on the same pair. Default α = 1e-5 (TRL's; TRL also accepts a per-epoch list, not supported here).

Follows TRL: ``chosen = first if r(first) ≥ r(second)`` (ties go to the first sample, the policy's sample for
XPO), optional ``missing_eos_penalty`` subtracted from completions without EOS, generation defaults
``max_new_tokens=64, temperature=0.9``, sigmoid/IPO (any :func:`mmalign.losses.dpo` ``loss_type``) on summed
log-probs. Deviations from TRL:

- ``options.ties=drop`` (not in TRL) gives tied pairs weight 0 in the DPO mean; ties are counted either way
  (``samples/ties``). XPO's bonus is kept for tied rows (it does not depend on the judgement).
- Generation is seeded from (run seed, step, the batch's example indices) under a forked RNG, so a resumed
  run regenerates exactly the samples it would have drawn and training's own random stream is untouched.
- TRL's ``logps/*`` metrics are policy sums only here (the note flags TRL's mixing as a quirk);
  ``objective/kl`` is TRL's crude estimator (mean sequence log-ratio over the two scored samples; for XPO one
  of them is a reference sample, so it is not an on-policy estimate).
- XPO samples ỹ from the adapter-disabled policy with LoRA, otherwise from a frozen copy of the initial
  policy made here (the loop's reference is not visible to a task): moving references (sync/ema) and
  re-anchored stages would make sampler and scorer differ, so XPO refuses them.
- ``data.eval`` (preference pairs) is evaluated with the DPO loss on those fixed pairs (the loop scores eval
  batches without generation); XPO's bonus is left out there.

The paper's guarantees (coverage-free sample efficiency) are not tested here; they are not verifiable on a
tiny model. Generation through FSDP/DeepSpeed-ZeRO3 sharded models is untested.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .. import losses as L
from ..config import ConfigError, from_dict
from ..data.batches import TextBatch
from ..data.rows import DataError, RowProblem, load_rows
from ..data.text import EncodedExample, PreferenceDataset
from ..models.chat import chat_prompt_ids
from ..schema import StageConfig, TrainConfig
from ..types import Scores
from .preference import stage_loss
from .rewards import ModelReward, load_reward_fn, reward_model_problem
from .task import StageData
from .text import TextTask

ONLINE_LOSSES = ("online_dpo", "xpo")  # the rows of mmalign.methods.table.METHODS this recipe runs


@dataclass
class OnlineOptions:
    """``options:`` of an online_dpo / xpo run (give exactly one of reward_fn / reward_model)."""

    reward_fn: str | None = None  # "module:function"; f(completion) | f(prompt, completion) | f(prompts=, completions=)
    reward_model: str | None = None  # a directory written by an `rm` run (ValueHeadModel + tokenizer)
    max_new_tokens: int = 64
    temperature: float = 0.9
    top_p: float = 1.0
    ties: Literal["keep", "drop"] = "keep"
    missing_eos_penalty: float | None = None


def parse_options(cfg: TrainConfig) -> OnlineOptions:
    opts = from_dict(OnlineOptions, dict(cfg.options), source="options")
    errors = []
    if (opts.reward_fn is None) == (opts.reward_model is None):
        errors.append("options: give exactly one of reward_fn ('module:function') or reward_model (a directory "
                      f"saved by an `rm` run); got reward_fn={opts.reward_fn!r}, reward_model={opts.reward_model!r}")
    if opts.max_new_tokens < 1:
        errors.append(f"options.max_new_tokens={opts.max_new_tokens} must be >= 1")
    if not (opts.temperature > 0 and math.isfinite(opts.temperature)):
        errors.append(f"options.temperature={opts.temperature} must be > 0 (greedy decoding would make both "
                      "samples identical, so every pair would tie)")
    if not 0 < opts.top_p <= 1:
        errors.append(f"options.top_p={opts.top_p} must be in (0, 1]")
    if errors:
        raise ConfigError(errors)
    return opts


# -- prompts ---------------------------------------------------------------------------------------------


def build_prompt_dataset(sources, tokenizer, *, limit: int | None = None, max_prompt_length: int | None = None,
                         skip_bad_rows: bool = False) -> tuple[PreferenceDataset, dict[str, int]]:
    """Prompts of any text rows (prompt-only rows, pairs, SFT rows, ...): only ``prompt`` is read.

    Each example carries a one-token placeholder completion (replaced by generation) and the prompt itself
    in ``meta["prompt"]`` for the reward. Long prompts keep their last ``max_prompt_length`` tokens (BOS kept)."""
    skipped: Counter = Counter()
    rows = load_rows(sources, limit=limit, skip_bad_rows=skip_bad_rows, skipped=skipped)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    examples, problems, truncated = [], [], 0
    for file, row, data in rows:
        prompt = data.get("prompt")
        ok = (isinstance(prompt, str) and prompt.strip()) or (
            isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt))
        if not ok:
            problems.append(RowProblem(file, row, "bad_prompt", "prompt", prompt,
                                       "must be a non-empty string or a list of chat messages",
                                       "give every row a 'prompt' (online methods generate the completions)"))
            continue
        if isinstance(prompt, str):
            ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            ids = chat_prompt_ids(tokenizer, prompt)
        ids = ids or ([bos] if bos is not None else [])
        if not ids:
            problems.append(RowProblem(file, row, "empty_prompt", "prompt", prompt, "tokenises to no tokens and "
                                       "the tokenizer has no BOS token", "give every row a non-empty prompt"))
            continue
        if max_prompt_length and len(ids) > max_prompt_length:
            truncated += 1
            ids = [bos] + ids[len(ids) - max_prompt_length + 1:] if ids[0] == bos else ids[-max_prompt_length:]
        examples.append(EncodedExample(ids, [[eos]], [float("nan")],
                                       {"prompt": prompt, "data_file": file, "data_row": row}))
    if problems and not skip_bad_rows:
        raise DataError.from_problems(problems)
    skipped.update(p.reason for p in problems)
    if not examples:
        raise DataError(f"{sources}: no usable prompts ({len(rows)} rows read); fix: give rows with a 'prompt'")
    stats = {"rows_read": len(rows) + sum(v for k, v in skipped.items() if k in ("invalid_json", "not_an_object")),
             "rows_used": len(examples), "rows_skipped": len(problems), "encode/prompts_truncated": truncated}
    stats.update({f"skipped/{k}": v for k, v in sorted(skipped.items())})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return PreferenceDataset(examples, pad_token_id=pad, format="prompts"), stats


# -- the task --------------------------------------------------------------------------------------------


def generation_seed(run_seed: int, step: int, indices: list[int]) -> int:
    """Seed of one micro-batch's sampling: the same (seed, step, examples) always draws the same samples."""
    digest = hashlib.sha256(repr((run_seed, step, indices)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def config_problems(cfg: TrainConfig) -> list[str]:
    """The online-specific problems of a run's loss, stages and reference settings (names and ``loss.kwargs``
    are checked against the METHODS rows, ``options`` by :func:`parse_options`), without building anything."""
    errors = []
    names = set()
    for i, stage in enumerate([None, *cfg.stages]):
        where = "loss" if stage is None else f"stages.{i - 1}.loss"
        name, kwargs, _, _ = stage_loss(cfg, stage)
        names.add(name)
        if name != "xpo":
            continue
        alpha = kwargs.get("alpha", 1e-5)  # XPO's alpha lives in loss.kwargs beside DPO's options
        if not isinstance(alpha, (int, float)) or not (alpha >= 0 and math.isfinite(alpha)):
            errors.append(f"{where}.kwargs.alpha={alpha!r} must be a number >= 0 (TRL's default 1e-5)")
        if stage is not None and stage.reanchor_reference and not cfg.lora.enabled:
            errors.append(f"stages.{i - 1}.reanchor_reference: XPO samples from a frozen initial copy; "
                          "use lora.enabled=true (adapter-disabled sampling) or drop the re-anchoring")
    if cfg.loss.sft_weight:
        errors.append(f"loss.sft_weight={cfg.loss.sft_weight}: not supported by online_dpo/xpo; set it to 0")
    strategy = cfg.reference.strategy
    if strategy in ("precomputed", "none"):
        errors.append(f"reference.strategy={strategy} cannot score freshly generated samples; use auto/copy/adapter")
    if strategy in ("sync", "ema") and "xpo" in names:
        errors.append(f"reference.strategy={strategy}: XPO samples from the initial reference and would score "
                      "with a moving one; use copy or adapter (LoRA)")
    return errors


class OnlineDPOTask(TextTask):
    """Online DPO / XPO recipe (see the module docstring): the text task (its causal-LM family builds the
    tokenizer and the policy; scoring, saving and LoRA merges are the family's) plus the hooks
    :meth:`prepare_batch` (generate and judge a pair per prompt), :meth:`stage_data` (prompts) and :meth:`loss`
    (DPO on the judged pair, XPO's bonus, the sample metrics)."""

    @classmethod
    def check(cls, cfg: TrainConfig, uses) -> list[str]:
        errors = config_problems(cfg)
        try:
            opts = parse_options(cfg)
        except ConfigError as e:
            return [*e.errors, *errors]
        if opts.reward_fn:  # a typo fails here, before the policy is built
            try:
                load_reward_fn(opts.reward_fn)
            except ConfigError as e:
                errors += e.errors
        elif (why := reward_model_problem(opts.reward_model)) is not None:
            errors.append(why)
        return errors

    def __init__(self, cfg: TrainConfig, *, tokenizer=None, model: nn.Module | None = None):
        super().__init__(cfg, tokenizer=tokenizer, model=model)  # checks everything (check above), builds once
        self.options = parse_options(cfg)
        self._reward = (load_reward_fn(self.options.reward_fn) if self.options.reward_fn
                        else ModelReward(self.options.reward_model))  # type: ignore[arg-type]
        self._ref_sampler: nn.Module | None = None
        uses_xpo = any(stage_loss(cfg, s)[0] == "xpo" for s in [None, *cfg.stages])
        if uses_xpo and not cfg.lora.enabled:  # a frozen copy of the initial policy to sample ỹ from
            self._ref_sampler = copy.deepcopy(self.model).eval().requires_grad_(False)

    # -- data ---------------------------------------------------------------------------------------------
    def stage_data(self, stage: StageConfig) -> StageData:
        from ..data.text import build_text_dataset

        dc = self.cfg.data
        budget = dc.max_prompt_length
        if budget is None and dc.max_length:  # prompt + generated tokens fit in data.max_length
            budget = dc.max_length - self.options.max_new_tokens
            if budget < 1:
                raise ConfigError(f"data.max_length={dc.max_length} leaves no prompt tokens next to "
                                  f"options.max_new_tokens={self.options.max_new_tokens}; raise data.max_length, "
                                  "lower options.max_new_tokens or set data.max_prompt_length")
        train, stats = build_prompt_dataset(stage.train or dc.train, self.tokenizer, limit=dc.limit,
                                            max_prompt_length=budget, skip_bad_rows=dc.skip_bad_rows)
        eval_ds = None
        if dc.eval:  # fixed preference pairs: the DPO loss and implicit-reward accuracy on held-out data
            eval_ds, eval_stats = build_text_dataset(dc.eval, self.tokenizer, format="pairs", limit=dc.limit,
                                                     max_length=dc.max_length, truncation=dc.truncation,
                                                     skip_bad_rows=dc.skip_bad_rows)
            stats.update({f"eval/{k}": v for k, v in eval_stats.items()})
        return StageData(train=train, collate=train.collate, eval=eval_ds, stats=stats)

    # -- generation and judging ---------------------------------------------------------------------------
    def _sample(self, model: nn.Module, ids: Tensor, mask: Tensor, seed: int) -> list[list[int]]:
        o, tok = self.options, self.tokenizer
        model = getattr(model, "module", model)
        was_training = model.training
        model.eval()
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        dev = ids.device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=o.temperature,
                                  top_p=o.top_p, top_k=0, max_new_tokens=o.max_new_tokens, pad_token_id=pad,
                                  eos_token_id=eos)
        model.train(was_training)
        out = []
        for row in seqs[:, ids.shape[1]:].tolist():
            if eos in row:  # keep EOS (it is scored, as in TRL); what follows is padding
                row = row[: row.index(eos) + 1]
            out.append(row)
        return out

    @torch.no_grad()
    def prepare_batch(self, model: nn.Module, batch: TextBatch, step: int) -> TextBatch:
        """Replace the batch's placeholder completions by a judged (chosen, rejected) pair per prompt."""
        B, dev = batch.batch_size, batch.prompt_ids.device
        index = batch.extras.get("index")
        seed = generation_seed(self.cfg.run.seed, step, index.tolist() if index is not None else [])
        xpo = self.method.name == "xpo"
        if xpo:
            first = self._sample(model, batch.prompt_ids, batch.prompt_mask, seed)
            if self._ref_sampler is not None:
                self._ref_sampler.to(dev)
                second = self._sample(self._ref_sampler, batch.prompt_ids, batch.prompt_mask, seed + 1)
            else:
                with getattr(model, "module", model).disable_adapter():
                    second = self._sample(model, batch.prompt_ids, batch.prompt_mask, seed + 1)
        else:  # two policy samples per prompt in one generate call (shared prompt rows, KV cached)
            both = self._sample(model, batch.prompt_ids.repeat(2, 1), batch.prompt_mask.repeat(2, 1), seed)
            first, second = both[:B], both[B:]
        prompts = [m.get("prompt", "") for m in batch.meta] or [""] * B
        comps = first + second
        texts = self.tokenizer.batch_decode(comps, skip_special_tokens=True)
        if isinstance(self._reward, ModelReward):
            self._reward.model.to(dev)
        rewards = torch.tensor(self._reward(prompts * 2, texts), dtype=torch.float32)
        if rewards.shape != (2 * B,) or not torch.isfinite(rewards).all():
            raise ValueError(f"the reward ({self.options.reward_fn or self.options.reward_model}) must return one "
                             f"finite number per completion; got {rewards.tolist()} for {2 * B} completions")
        eos = self.tokenizer.eos_token_id
        has_eos = torch.tensor([bool(c) and c[-1] == eos for c in comps])
        if self.options.missing_eos_penalty is not None:
            rewards = rewards - self.options.missing_eos_penalty * (~has_eos).float()
        r1, r2 = rewards[:B], rewards[B:]
        first_wins = r1 >= r2  # TRL: ties go to the first sample (XPO: the policy's)
        order = [(i, i + B) if first_wins[i] else (i + B, i) for i in range(B)]
        width = max(len(c) for c in comps)
        pad = torch.full((B, 2, width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((B, 2, width), dtype=torch.long)
        for i, pair in enumerate(order):
            for k, j in enumerate(pair):
                pad[i, k, : len(comps[j])] = torch.tensor(comps[j])
                mask[i, k, : len(comps[j])] = 1
        cr = torch.tensor(order)
        tie = r1 == r2
        extras = dict(batch.extras)
        extras.update(sample_rewards=rewards[cr], ties=tie.float(), contain_eos=has_eos[cr].float(),
                      first_rewards=r1, second_rewards=r2)
        if self.options.ties == "drop":
            extras["sample_weight"] = (~tie).float()
        if xpo:  # where the reference sample ỹ ended up: candidate 1 if the policy's won
            extras["ref_sample_index"] = first_wins.long()
        return TextBatch(batch.prompt_ids, batch.prompt_mask, pad.to(dev), mask.to(dev), None,
                         torch.tensor([[0.0, 1.0]]).expand(B, 2).clone().to(dev), batch.meta,
                         {k: v.to(dev) if torch.is_tensor(v) else v for k, v in extras.items()})

    # -- loss ---------------------------------------------------------------------------------------------
    def loss(self, policy: Scores, reference: Scores | None, batch: TextBatch, aux: Scores | None = None):
        kwargs = dict(self.loss_kwargs)  # the row's options; xpo's row adds alpha (default 1e-5)
        alpha = float(kwargs.pop("alpha", 0.0))
        return online_loss(policy, reference, batch, kwargs, alpha=alpha, xpo=self.method.name == "xpo")


def online_loss(policy: Scores, reference: Scores, batch: TextBatch, kwargs: dict, *, alpha: float = 0.0,
                xpo: bool = False) -> L.LossOutput:
    """DPO on the judged pair (+ XPO's ``α · log π_θ(ỹ)``), with the sample metrics of ``prepare_batch``."""
    ex = batch.extras
    lengths = policy.lengths.float()
    out = L.dpo(policy.logps[:, 0], policy.logps[:, 1], reference.logps[:, 0], reference.logps[:, 1],
                chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1], sample_weight=ex.get("sample_weight"),
                **kwargs)
    metrics = dict(out.metrics)
    loss, per_example = out.loss, out.per_example
    if xpo and "ref_sample_index" in ex:  # eval batches (fixed pairs) have no reference sample
        lp = policy.logps.gather(1, ex["ref_sample_index"].long()[:, None]).squeeze(1)
        bonus = L.xpo_bonus(lp, alpha=alpha)
        metrics.update({"loss/dpo": out.loss.detach(), "loss/xpo": bonus.loss.detach(), "alpha": alpha,
                        **bonus.metrics})
        loss, per_example = loss + bonus.loss, per_example + bonus.per_example
    if "sample_rewards" in ex:
        r = ex["sample_rewards"]
        metrics.update({"samples/reward_chosen": r[:, 0].mean(), "samples/reward_rejected": r[:, 1].mean(),
                        "samples/reward_mean": r.mean(), "samples/reward_margin": (r[:, 0] - r[:, 1]).mean(),
                        "samples/ties": ex["ties"].sum(), "samples/contain_eos": ex["contain_eos"].mean(),
                        "objective/kl": (policy.logps - reference.logps).detach().mean()})
        if xpo:  # the policy's samples are the first ones; reward_mean mixes in the reference's
            metrics.update({"samples/reward_policy": ex["first_rewards"].mean(),
                            "samples/reward_ref": ex["second_rewards"].mean()})
        else:
            metrics["samples/reward_policy"] = r.mean()
    return L.LossOutput(loss, per_example, {k: torch.as_tensor(v).detach().float() for k, v in metrics.items()})
