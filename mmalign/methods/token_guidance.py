"""Preference-grounded token-level guidance (Yang et al. 2023, arXiv 2306.00398; NeurIPS'23).

Research note: ``research/llm_losses.md`` §2 (reference code ``Shentao-YANG/Preference_Grounded_Guidance``,
as summarised there). Two models train in alternation under the one loop (:func:`mmalign.train.loop.fit`):

1. **Guidance learning** (§3.1 of the paper): for each prompt, K completions are sampled from the *current*
   policy in :meth:`TokenGuidanceTask.prepare_batch` and scored by a programmatic sequence-level reward
   (``options.reward_fn``). A token-reward model r_φ (a causal-LM backbone + a linear or 1-hidden-layer MLP
   head, one squashed scalar per completion token) is fitted so that the *aggregate* of its token rewards,
   ``aggregate_token_values`` (``sum`` | ``mean`` | ``mean_list_len`` = mean × list-average length |
   ``softmax``/``softmin`` = ±T·logsumexp(±r/T) × list-average length), reproduces the ranking: ListMLE
   (:func:`mmalign.losses.listmle`), ties broken by a generator seeded from (run seed, step).
2. **LM training** (§3.2) with r_φ as token weights (no gradient into φ):
   ``lm_objective: wmle`` — reward-weighted MLE on the data's own completions, weights normalised to sum 1
   per sequence (:func:`mmalign.losses.token_weighted_nll`, ``per_sequence``);
   ``lm_objective: self_sample`` — Σ_t r_t·NLL_t / n on the policy's own K samples (the code's plain
   reward-weighted NLL; r > 0, so it only reinforces) minus ``entropy_coef`` × mean token entropy
   (:func:`mmalign.losses.entropy_bonus`; 0.125 in the reference's prompt task).

Schedule: ``guidance_steps`` optimizer steps of the reward model, then ``lm_steps`` of the policy, repeated
(first cycle starts with guidance). Both live in one ``nn.Module`` (:class:`GuidanceModel`) under the loop's one
optimizer; each step's loss touches only one of them, so the other's parameters get no gradient (``None``) and
AdamW leaves them (and their moments and weight decay) untouched. ``save_pretrained`` writes the **policy** (the
trained LM, loadable with ``load_causal_lm``); the reward model goes beside it in ``token_reward_model/``.

Where this follows / deviates from the reference code (per the research note; exact code not re-verified):

- ListMLE on aggregates, list-average-length rescaling, soft max/min T=2, per-sequence weight normalisation,
  ``use_q_for_weight`` (``reward_to_go``) and ``exp_in_wmle`` (``exp_weights``) options: as in the code.
- Tie-breaking: the code shuffles with an unseeded ``randperm``; here a generator seeded by (seed, step).
- Refit schedule: the code refits r_φ every ``reward_retrain_period`` (0.5 epoch / 1000 steps) with its own lr
  (5e-5) and early stopping on a validation ListMLE; here a fixed step alternation, one lr for both models
  (the loop builds one optimizer) and no early stopping. Samples are always fresh from the current policy.
- Squash: the code's default is a double-softplus clamp into ≈[1e-8, 1] (exact form unverified); the default
  here is ``sigmoid`` (same range, strictly inside it); ``softplus`` is softplus(x) + 1e-8 (positive,
  unbounded above), ``none`` the raw head output (then ``exp_weights`` is required for non-negative weights).
- Head: the code uses a 1-hidden-layer MLP of width 2048; ``head_hidden=0`` (default) is a linear head.
- Sequence evaluator: the paper uses METEOR / task-LM accuracy; here any Python function of
  (prompt, completion) text (``reward_fn``), e.g. the warm-colours reward of the demo.
- Prompt-task REINFORCE/entropy: no baseline, immediate reward (as the code); the reference's optional
  REINFORCE term in WMLE is not implemented.

Not supported: LoRA merges between stages (``stage.merge_lora``), DDP without ``find_unused_parameters``
(each step leaves one model unused).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from ..adapters.causal_lm import score_batch, unwrap_causal_lm
from ..adapters.causal_lm_family import build_model, content_key
from ..config import ConfigError, from_dict
from ..data.batches import TextBatch
from ..losses import (
    LossOutput,
    aggregate_token_values,
    combine,
    entropy_bonus,
    listmle,
    reward_to_go,
    token_weighted_nll,
)
from ..schema import StageConfig, TrainConfig
from ..types import Scores
from .rewards import TokenRewardModel, flat_sequences, load_reward_fn
from .task import StageData
from .text import TextTask

log = logging.getLogger(__name__)

GUIDANCE, LM = 0, 1  # phase ids carried in batch.extras["tg_phase"]


@dataclass
class TokenGuidanceOptions:
    """``options:`` of a ``loss.name: token_guidance`` run (see the module docstring)."""

    num_samples: int = 4  # K completions per prompt (reference: 3 summarisation, 5 prompts)
    guidance_steps: int = 1  # reward-model steps per cycle
    lm_steps: int = 1  # policy steps per cycle
    aggregate: Literal["sum", "mean", "mean_list_len", "softmax", "softmin"] = "mean_list_len"
    soft_temperature: float = 2.0  # T of softmax/softmin aggregation (reference soft_maxmin_temp)
    listmle_temperature: float = 1.0
    lm_objective: Literal["wmle", "self_sample"] = "wmle"
    entropy_coef: float = 0.0  # self_sample only (reference prompt task: 0.125)
    reward_to_go: bool = False  # reference use_q_for_weight
    exp_weights: bool = False  # reference exp_in_wmle
    reward_fn: str = "warm_colors"  # a REWARD_FNS name or "module:function" of (prompt, completion) -> float
    reward_backbone: str = "policy"  # "policy" (same init as the policy), "tiny", or a checkpoint path
    reward_tiny: dict = field(default_factory=dict)  # tiny_llama_config kwargs for reward_backbone=tiny
    head_hidden: int = 0  # 0: linear head; >0: 1-hidden-layer MLP (reference: 2048)
    squash: Literal["sigmoid", "softplus", "none"] = "sigmoid"
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0

    def validate(self) -> list[str]:
        errs = []
        for name in ("num_samples", "guidance_steps", "lm_steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                errs.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_samples < 2:
            errs.append(f"num_samples={self.num_samples}: a ranking needs K >= 2 samples per prompt")
        for name in ("soft_temperature", "listmle_temperature"):
            if not getattr(self, name) > 0:
                errs.append(f"{name}={getattr(self, name)} must be > 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            errs.append(f"temperature={self.temperature} must be >= 0 and top_p={self.top_p} in (0, 1]")
        if self.entropy_coef < 0:
            errs.append(f"entropy_coef={self.entropy_coef} must be >= 0")
        if self.entropy_coef > 0 and self.lm_objective != "self_sample":
            errs.append("entropy_coef > 0 needs lm_objective=self_sample (the entropy of the policy's own samples)")
        if self.head_hidden < 0:
            errs.append(f"head_hidden={self.head_hidden} must be >= 0 (0 = linear head)")
        if self.squash == "none" and not self.exp_weights:
            errs.append("squash=none gives token rewards of any sign; set exp_weights=true (weights must be >= 0) "
                        "or use squash=sigmoid|softplus")
        return errs


# -- models --------------------------------------------------------------------------------------------------

class GuidanceModel(nn.Module):
    """The Task's model: the policy and the token-reward model, trained in alternation by one optimizer."""

    def __init__(self, policy: nn.Module, reward: TokenRewardModel):
        super().__init__()
        self.policy, self.reward = policy, reward


def policy_logps_entropy(policy: nn.Module, batch: TextBatch) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and next-token entropies ``[B, K, C]`` from one full forward.

    Materialises ``[B·K, C, V]`` logits (fine for small vocabularies; ``score_batch`` is the chunked path
    used whenever the entropy is not needed)."""
    b, k, c = batch.completion_ids.shape
    ids, mask, pos = flat_sequences(batch)
    p = batch.prompt_ids.shape[1]
    logits = unwrap_causal_lm(policy).lm(input_ids=ids, attention_mask=mask, position_ids=pos,
                                         use_cache=False).logits[:, p - 1: p + c - 1].float()
    logp_all = logits.log_softmax(-1)
    logps = logp_all.gather(-1, batch.completion_ids.reshape(b * k, c, 1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    valid = batch.completion_mask.reshape(b * k, c).bool()
    zero = torch.zeros((), device=logps.device)
    return torch.where(valid, logps, zero).view(b, k, c), torch.where(valid, entropy, zero).view(b, k, c)


# -- the recipe ---------------------------------------------------------------------------------------------

class TokenGuidanceTask(TextTask):
    """``loss.name: token_guidance`` (module docstring): the text task (its family builds, saves the policy) plus the
    token-reward model it owns (``model``: a :class:`GuidanceModel` of both) and hooks for the per-step samples,
    the two phases' scores and losses, and saving the reward model. ``policy`` / ``reward_model``: prebuilt."""

    @classmethod
    def check(cls, cfg: TrainConfig, uses) -> list[str]:
        try:
            opts = from_dict(TokenGuidanceOptions, dict(cfg.options), source="options")
        except ConfigError as e:
            return e.errors
        errors = [f"options.{e}" for e in opts.validate()]
        errors += [f"{u.where}.kwargs={u.kwargs}: token_guidance takes no loss options; its settings are options.*"
                   for u in uses if u.kwargs]
        errors += [f"stages.{i}.merge_lora=true is not supported by token_guidance"
                   for i, s in enumerate(cfg.stages) if s.merge_lora]
        try:
            load_reward_fn(opts.reward_fn)
        except ConfigError as e:
            errors += e.errors
        return errors

    def __init__(self, cfg: TrainConfig, *, tokenizer=None, policy: nn.Module | None = None,
                 reward_model: TokenRewardModel | None = None):
        super().__init__(cfg, tokenizer=tokenizer, model=policy)  # checks everything (check above), builds once
        self.opts: TokenGuidanceOptions = from_dict(TokenGuidanceOptions, dict(cfg.options), source="options")
        self.reward_fn = load_reward_fn(self.opts.reward_fn)
        self._guidance = GuidanceModel(self.family.model, reward_model or self._build_reward_model())

    @property
    def model(self) -> GuidanceModel:
        """The policy (the family's model) and the token-reward model, trained by the loop's one optimizer."""
        return self._guidance

    @model.setter
    def model(self, value: GuidanceModel) -> None:
        self._guidance, self.family.model = value, value.policy

    def _build_reward_model(self) -> TokenRewardModel:
        from ..models.text import build_tiny_causal_lm, load_causal_lm

        o, cfg = self.opts, self.cfg
        if o.reward_backbone == "policy":  # same initial weights as the policy, no LoRA
            backbone = build_model(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, enabled=False)),
                                   self.tokenizer, value_head=False)
        elif o.reward_backbone == "tiny":
            tiny = o.reward_tiny or {k: v for k, v in cfg.model.tiny.items() if k != "vocab_size"}
            backbone = build_tiny_causal_lm(len(self.tokenizer), seed=cfg.run.seed + 1, **tiny)
        else:
            backbone = load_causal_lm(o.reward_backbone, dtype=cfg.model.dtype)
        with torch.random.fork_rng(devices=[]):  # the head's init must not depend on what ran before
            torch.manual_seed(cfg.run.seed + 2)
            model = TokenRewardModel(backbone, head_hidden=o.head_hidden, squash=o.squash)
        return model.train()

    # -- data ---------------------------------------------------------------------------------------------
    def stage_data(self, stage: StageConfig) -> StageData:
        """The rows in ``data.format`` as given (``auto``: SFT rows or pairs, whose chosen is the WMLE target)."""
        from ..data.text import build_text_dataset

        dc = self.cfg.data

        def load(sources):
            return build_text_dataset(sources, self.tokenizer, format=dc.format, limit=dc.limit,
                                      max_length=dc.max_length, max_prompt_length=dc.max_prompt_length,
                                      truncation=dc.truncation, skip_bad_rows=dc.skip_bad_rows)

        train, stats = load(stage.train or dc.train)
        eval_ds = None
        if dc.eval:  # evaluated as the reward-weighted NLL of the held-out completions
            eval_ds, eval_stats = load(dc.eval)
            stats.update({f"eval/{k}": v for k, v in eval_stats.items()})
        return StageData(train=train, collate=train.collate, eval=eval_ds, stats=stats, key=content_key(train),
                         eval_key=content_key(eval_ds) if eval_ds is not None else "")

    def phase(self, step: int) -> int:
        """GUIDANCE for the first ``guidance_steps`` steps of each cycle, then LM for ``lm_steps``."""
        o = self.opts
        return GUIDANCE if step % (o.guidance_steps + o.lm_steps) < o.guidance_steps else LM

    # -- online samples -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, policy: nn.Module, batch: TextBatch, seed: int) -> TextBatch:
        """K samples per prompt from ``policy`` (one batched ``generate``; seeded, global RNG left untouched),
        packed as a ``[B, K, C]`` batch with their programmatic rewards in ``extras["seq_rewards"]``.

        Generates from the batch's token ids rather than through ``mmalign.sample.text.generate`` (which takes
        prompt strings): decoding and re-encoding a (chat-templated) prompt is not guaranteed to round-trip."""
        o, tok = self.opts, self.tokenizer
        lm = unwrap_causal_lm(policy)
        gen_model = lm.peft if lm.peft is not None else lm.lm
        k = o.num_samples
        ids, mask = batch.prompt_ids.repeat_interleave(k, 0), batch.prompt_mask.repeat_interleave(k, 0)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        kwargs = {"do_sample": o.temperature > 0, "max_new_tokens": o.max_new_tokens, "pad_token_id": pad,
                  "eos_token_id": tok.eos_token_id}
        if o.temperature > 0:
            kwargs.update(temperature=o.temperature, top_p=o.top_p, top_k=0)
        dev = ids.device
        was_training = gen_model.training
        gen_model.eval()
        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(seed)
                out = gen_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        finally:
            gen_model.train(was_training)
        p = ids.shape[1]
        comps = []
        for row in out[:, p:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            comps.append([t for t in row if t != pad or t == tok.eos_token_id])
        b, c = batch.batch_size, max(1, max(len(x) for x in comps))
        comp_ids = torch.full((b * k, c), pad, dtype=torch.long)
        comp_mask = torch.zeros((b * k, c), dtype=torch.long)
        prompts = [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                   for r, m in zip(batch.prompt_ids.cpu(), batch.prompt_mask.cpu(), strict=True)]
        for n, x in enumerate(comps):
            comp_ids[n, : len(x)] = torch.tensor(x, dtype=torch.long)
            comp_mask[n, : len(x)] = 1
        texts = [tok.decode(x, skip_special_tokens=True) for x in comps]
        scores = self.reward_fn([prompts[n // k] for n in range(len(comps))], texts)
        rewards = torch.tensor([float(r) for r in scores], dtype=torch.float32)
        cand = comp_mask.sum(-1).view(b, k) > 0
        extras = {"seq_rewards": rewards.view(b, k).to(dev)}
        if "index" in batch.extras:
            extras["index"] = batch.extras["index"]
        return TextBatch(batch.prompt_ids, batch.prompt_mask, comp_ids.view(b, k, c).to(dev),
                         comp_mask.view(b, k, c).to(dev), None if bool(cand.all()) else cand.to(dev),
                         None, list(batch.meta), extras)

    def prepare_batch(self, model: nn.Module, batch: TextBatch, step: int) -> TextBatch:
        """Guidance steps (and ``self_sample`` LM steps): fresh policy samples, ranked by ``reward_fn``;
        ``wmle`` LM steps: the data's first completion. Deterministic from (run seed, step)."""
        phase = self.phase(step)
        if phase == GUIDANCE or self.opts.lm_objective == "self_sample":
            out = self.sample(getattr(model, "policy", model), batch, seed=self.cfg.run.seed * 1_000_003 + step)
        else:
            out = _first_candidate(batch)
        b = out.batch_size
        out.extras["tg_phase"] = torch.full((b,), phase, dtype=torch.long, device=out.prompt_ids.device)
        out.extras["tg_step"] = torch.full((b,), step, dtype=torch.long, device=out.prompt_ids.device)
        return out

    # -- scores and loss ----------------------------------------------------------------------------------
    def score(self, model: nn.Module, batch: TextBatch) -> Scores:
        if "tg_phase" not in batch.extras:  # evaluation batches: held-out completions, weighted NLL
            batch = _first_candidate(batch)
            phase = LM
        else:
            phase = int(batch.extras["tg_phase"][0])
        if phase == GUIDANCE:
            r = model.reward(batch)
            agg = aggregate_token_values(r, batch.completion_mask, mode=self.opts.aggregate,
                                         temperature=self.opts.soft_temperature, candidate_mask=batch.candidate_mask)
            return Scores(logps=agg, token_mask=batch.completion_mask.bool(), lengths=batch.completion_mask.sum(-1),
                          extras={"token_rewards": r})
        with torch.no_grad():
            r = model.reward(batch)
        extras = {"token_rewards": r}
        if self.opts.entropy_coef > 0:
            logps, ent = policy_logps_entropy(model.policy, batch)
            extras["token_entropy"] = ent
            mask = batch.completion_mask.bool()
            return Scores(logps=logps.sum(-1), token_logps=logps, token_mask=mask, lengths=mask.sum(-1),
                          extras=extras)
        s = score_batch(model.policy, batch)
        s.extras.update(extras)
        return s

    def loss(self, policy: Scores, reference: Scores | None, batch: TextBatch, aux: Scores | None = None):
        o = self.opts
        if "tg_phase" not in batch.extras:  # evaluation batch: score() kept only the first completion
            batch = _first_candidate(batch)
        elif int(batch.extras["tg_phase"][0]) == GUIDANCE:
            step = int(batch.extras["tg_step"][0])
            gen = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + step)
            out = listmle(policy.logps, batch.extras["seq_rewards"], candidate_mask=batch.candidate_mask,
                          temperature=o.listmle_temperature, generator=gen)
            metrics = {f"guidance/{k.split('/')[-1]}": v for k, v in out.metrics.items()}
            metrics["guidance/token_reward_mean"] = _masked_mean(policy.extras["token_rewards"].detach(),
                                                                 policy.token_mask)
            return LossOutput(out.loss, out.per_example, {**metrics, **_sample_metrics(batch)})
        weights = token_weights(policy.extras["token_rewards"], policy.token_mask, exp_weights=o.exp_weights,
                                use_reward_to_go=o.reward_to_go)
        b, k, c = policy.token_logps.shape
        mask = policy.token_mask
        if batch.candidate_mask is not None:
            mask = mask & batch.candidate_mask[..., None].bool()
        flat = (policy.token_logps.reshape(b * k, c), mask.reshape(b * k, c), weights.reshape(b * k, c))
        if o.lm_objective == "wmle" or "tg_phase" not in batch.extras:
            out = token_weighted_nll(flat[0], flat[1], weights=flat[2], normalize="per_sequence")
        else:  # Σ_t r_t·NLL_t / n_tokens: the reference's reward-weighted NLL on self-samples
            n = flat[1].sum(-1, keepdim=True).clamp_min(1)
            terms = [("nll", 1.0, token_weighted_nll(flat[0], flat[1], weights=flat[2] / n, normalize="none"))]
            if o.entropy_coef > 0:
                ent = policy.extras["token_entropy"].reshape(b * k, c)
                terms.append(("entropy", 1.0, entropy_bonus(ent, flat[1], coef=o.entropy_coef)))
            out = combine(terms)
        metrics = {f"lm/{k_}": v for k_, v in out.metrics.items()}
        metrics["lm/weight_mean"] = _masked_mean(weights, mask)
        return LossOutput(out.loss, out.per_example, {**metrics, **_sample_metrics(batch)})

    # -- model lifecycle ----------------------------------------------------------------------------------
    def save_pretrained(self, model: nn.Module, path: Path, state_dict: dict | None = None) -> None:
        """The policy (and tokenizer) at ``path`` as the causal-LM family writes an LM; the token-reward model in
        ``path/token_reward_model`` (:meth:`TokenRewardModel.from_pretrained` reads it). ``state_dict``: the
        gathered weights of a sharded run (keys relative to ``model``)."""
        from ..models import sub_state_dict

        wrapped = hasattr(model, "policy")
        policy = model.policy if wrapped else model
        self.family.save(policy, path, state_dict=sub_state_dict(state_dict, "policy.") if wrapped else state_dict,
                         method=self.method)
        reward = getattr(model, "reward", None)
        if reward is not None:
            reward.save_pretrained(Path(path) / "token_reward_model", state_dict=sub_state_dict(state_dict, "reward."))

    def merge_lora(self) -> None:
        raise ConfigError("stage.merge_lora is not supported by token_guidance")


def token_weights(token_rewards: Tensor, mask: Tensor, *, exp_weights: bool = False,
                  use_reward_to_go: bool = False) -> Tensor:
    """LM token weights from r_φ (detached): optionally exp(r) (``exp_in_wmle``), then optionally the reward-to-go
    Σ_{t'≥t} r_t' (``use_q_for_weight``); 0 on masked tokens."""
    w = token_rewards.detach().float()
    if exp_weights:
        w = w.exp()
    if use_reward_to_go:
        w = reward_to_go(w, mask)
    return torch.where(mask.bool(), w, torch.zeros_like(w))


def _first_candidate(batch: TextBatch) -> TextBatch:
    """The data's first completion (SFT rows' only one, a pair's chosen): the WMLE target."""
    return TextBatch(batch.prompt_ids, batch.prompt_mask, batch.completion_ids[:, :1], batch.completion_mask[:, :1],
                     None, None if batch.labels is None else batch.labels[:, :1], batch.meta, dict(batch.extras))


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    m = mask.bool()
    return (torch.where(m, values, torch.zeros_like(values)).sum() / m.sum().clamp_min(1)).detach()


def _sample_metrics(batch: TextBatch) -> dict[str, Tensor]:
    r = batch.extras.get("seq_rewards")
    if r is None:
        return {}
    return {"samples/reward_mean": r.float().mean().detach(), "samples/reward_max": r.float().amax(1).mean().detach()}
