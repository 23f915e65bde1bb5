"""The causal-LM family: builds a causal LM (+ tokenizer), text preference data, scores with
:func:`~mmalign.adapters.causal_lm.score_batch` (summed completion log-probs: the losses' own units), saves in the
HF / TRL layouts and merges LoRA.

``model.name_or_path: tiny`` builds a random tiny Llama and trains a byte-level BPE tokenizer on the run's own
data, so everything works offline on a laptop CPU; any other value is a checkpoint loaded with
``from_pretrained`` (the same path users take for Qwen/Llama checkpoints).

Token-level methods (``tdpo``, ``sparsepo``, ``sparsepo_activation``; research/llm_losses.md §5) need the
reference's per-token distribution, not only its sequence log-probs: :meth:`CausalLMFamily.score` then also
returns each model's final hidden states at the completion positions (and, for the reference of a SparsePO run,
every layer's), and :meth:`CausalLMFamily.finish_scores` turns the two sets of states into per-token
KL(pi_ref || pi) chunk by chunk (:func:`~mmalign.adapters.causal_lm.token_kl_from_states`). SparsePO's learned
mask heads (:class:`~mmalign.adapters.sparse_masks.SparseMaskHeads`) are a submodule of the policy, so the one
optimizer trains them with it (repo: joint training; its separate ``mask_weight_decay`` is not offered, the
heads get ``optim.weight_decay``), checkpoints hold them, and :meth:`CausalLMFamily.save` writes them to
``sparsepo_mask_heads.pt`` beside the model. ``reference.strategy=precomputed`` caches sequence scores only
and is refused for these methods.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, from_dict
from ..data.batches import TextBatch
from ..models import sub_state_dict
from ..models.chat import set_chat_template
from ..types import Scores, StageData
from .causal_lm import score_batch, token_kl_from_states, unwrap_causal_lm
from .family import ModelFamily
from .sparse_masks import MASK_HEADS, SparseMaskHeads, TokenOptions

__all__ = ["MASK_HEADS", "CausalLMFamily", "build_model", "build_tokenizer", "content_key"]


def _all_sources(cfg) -> list[str]:
    out = list(cfg.data.train) + list(cfg.data.eval)
    for s in cfg.stages:
        out += list(s.train or [])
    if cfg.retain is not None:
        out += list(cfg.retain.train)
    return out


def build_tokenizer(cfg):
    from ..models.text import load_tokenizer

    if cfg.model.name_or_path != "tiny" or cfg.model.tokenizer:
        return load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                              trust_remote_code=cfg.model.trust_remote_code)
    from ..data.row_files import HubOptions
    from ..data.rows import load_rows
    from ..data.synthetic import corpus
    from ..models.tokenizer import train_bpe_tokenizer

    rows = [r for _, _, r in load_rows(_all_sources(cfg), skip_bad_rows=True, hub=HubOptions.of(cfg.data))]
    tok = train_bpe_tokenizer(corpus(rows), vocab_size=int(cfg.model.tiny.get("vocab_size", 512)))
    tok.padding_side = "left"
    return tok


def build_model(cfg, tokenizer, *, value_head: bool) -> nn.Module:
    # Value-head and LoRA weights are drawn from torch's global RNG: seed them from the run so that the same
    # config gives the same initial model, whatever ran before in the process (tests, notebooks, sweeps).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return _build_model(cfg, tokenizer, value_head=value_head)


def _build_model(cfg, tokenizer, *, value_head: bool) -> nn.Module:
    from ..models.text import ValueHeadModel, apply_lora, build_tiny_causal_lm, load_causal_lm

    if cfg.model.name_or_path == "tiny":
        tiny = {k: v for k, v in cfg.model.tiny.items() if k != "vocab_size"}
        model = build_tiny_causal_lm(len(tokenizer), seed=cfg.run.seed, **tiny)
        if value_head:
            model = ValueHeadModel(model)
        if cfg.model.gradient_checkpointing:
            base = model.base if value_head else model
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
    else:
        model = load_causal_lm(cfg.model.name_or_path, dtype=cfg.model.dtype,
                               attn_implementation=cfg.model.attn_implementation,
                               trust_remote_code=cfg.model.trust_remote_code, load_in_4bit=cfg.model.load_in_4bit,
                               load_in_8bit=cfg.model.load_in_8bit, value_head=value_head,
                               gradient_checkpointing=cfg.model.gradient_checkpointing)
    if cfg.lora.enabled:
        model = apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                           target_modules=cfg.lora.target_modules)
    return model


def content_key(dataset) -> str:
    h = hashlib.sha256()
    for ex in dataset.examples:
        h.update(repr((ex.prompt_ids, ex.completions, ex.labels)).encode())
    return h.hexdigest()


def _with_mismatched(batch: TextBatch) -> TextBatch:
    """Append candidate K: prompt i with the completion of example i+1 (KTO's KL reference point).

    It shares prompt i's KV cache with the real completions, so z0 costs one extra completion, not an extra
    forward over the prompts."""
    rolled_ids = batch.completion_ids[:, :1].roll(1, dims=0)
    rolled_mask = batch.completion_mask[:, :1].roll(1, dims=0)
    return TextBatch(batch.prompt_ids, batch.prompt_mask, torch.cat([batch.completion_ids, rolled_ids], 1),
                     torch.cat([batch.completion_mask, rolled_mask], 1), None, batch.labels, batch.meta,
                     batch.extras)


class CausalLMFamily(ModelFamily):
    """Causal LMs (transformers ``*ForCausalLM``, PEFT LoRA over one, or a ``ValueHeadModel`` for ``rm``).

    Prebuilt parts: ``tokenizer=``, ``model=`` (built from the config when absent)."""

    name = "causal_lm"
    modality = "text"
    provides = frozenset({"logps", "lengths", "nll", "token_logps", "token_kl", "values"})

    def __init__(self, cfg, methods, *, tokenizer=None, model: nn.Module | None = None):
        self.cfg = cfg
        self.merged = False  # a LoRA adapter was merged into the in-memory base (stage.merge_lora)
        # data.chat_template lives on the tokenizer: encoding, generation and the saved final/ all use it
        self.tokenizer = set_chat_template(tokenizer or build_tokenizer(cfg), cfg.data.chat_template)
        self.model = model or build_model(cfg, self.tokenizer, value_head=any(m.value_head for m in methods))
        self.token_options = (from_dict(TokenOptions, dict(cfg.options or {}), source="options")
                              if any(m.token_kl for m in methods) else TokenOptions())
        self._ref_model: nn.Module | None = None  # a frozen/moving reference copy, seen when it scores a batch
        self.mask_heads: SparseMaskHeads | None = None
        if any(m.token_masks == "learned" for m in methods):
            self.mask_heads = self._build_mask_heads()
            self._attach_mask_heads()

    @classmethod
    def check(cls, cfg, uses) -> list[str]:
        errors = []
        methods = [u.method for u in uses]
        if len({m.value_head for m in methods}) > 1:
            errors.append("stages mix a reward model (rm, value head) with language-model losses; train the reward "
                          "model in its own run")
        token = [m for m in methods if m.token_kl]
        if not token:
            return errors
        if cfg.reference.strategy == "precomputed":
            errors.append("reference.strategy=precomputed caches sequence log-probs only, but loss "
                          f"{token[0].name!r} (token-level) needs the reference's per-token distribution and "
                          "activations at every step; use reference.strategy=copy, or adapter with lora.enabled=true")
        try:
            opts = from_dict(TokenOptions, dict(cfg.options or {}), source="options")
        except ConfigError as e:
            return errors + [f"options: {m}" for m in e.errors]
        if opts.kl_chunk_size < 1:
            errors.append(f"options.kl_chunk_size={opts.kl_chunk_size} must be >= 1 (typical: 512-4096)")
        if not 0.0 <= opts.mask_dropout < 1.0:
            errors.append(f"options.mask_dropout={opts.mask_dropout} must be in [0, 1)")
        if opts.mask_max is not None and not opts.mask_max > 0:
            errors.append(f"options.mask_max={opts.mask_max} must be > 0 or null (unbounded, as the repo)")
        if not opts.mask_init > 0:
            errors.append(f"options.mask_init={opts.mask_init} must be > 0 (0 starts every ReLU dead)")
        return errors

    # -- SparsePO's mask heads ----------------------------------------------------------------------------------
    def _build_mask_heads(self) -> SparseMaskHeads:
        config = unwrap_causal_lm(self.model).lm.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        o = self.token_options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.run.seed)
            heads = SparseMaskHeads(config.hidden_size, config.num_hidden_layers, n_masks=2 if o.independent_masks
                                    else 1, dropout=o.mask_dropout, max_value=o.mask_max, init=o.mask_init)
        param = next(self.model.parameters())
        return heads.to(device=param.device)

    def _attach_mask_heads(self) -> None:
        # A submodule of the policy: the loop's optimizer, DDP and checkpoints see it; PEFT froze the model's own
        # weights before it was added, so its parameters stay trainable.
        self.mask_heads.requires_grad_(True)
        self.model.add_module(MASK_HEADS, self.mask_heads)

    # -- data ---------------------------------------------------------------------------------------------------
    def _dataset(self, sources, dc, *, fmt: str):
        from ..data.row_files import HubOptions
        from ..data.text import build_text_dataset

        return build_text_dataset(sources, self.tokenizer, format=fmt, limit=dc.limit,
                                  max_length=dc.max_length, max_prompt_length=dc.max_prompt_length,
                                  truncation=dc.truncation, skip_bad_rows=dc.skip_bad_rows, hub=HubOptions.of(dc))

    def stage_data(self, stage, method) -> StageData:
        dc = self.cfg.data
        fmt = dc.format if dc.format != "auto" else method.data_format
        train, stats = self._dataset(stage.train or dc.train, dc, fmt=fmt)
        eval_ds = None
        if dc.eval:  # its counts go to the logs too: skipped eval rows must not vanish silently
            eval_ds, eval_stats = self._dataset(dc.eval, dc, fmt=fmt)
            stats.update({f"eval/{k}": v for k, v in eval_stats.items()})
        aux = None
        if getattr(method, "aux", "") == "retain" and self.cfg.retain is not None and self.cfg.retain.train:
            aux, retain_stats = self._dataset(self.cfg.retain.train, self.cfg.retain, fmt="sft")
            stats.update({f"retain/{k}": v for k, v in retain_stats.items()})
        return StageData(train=train, collate=train.collate, eval=eval_ds, aux=aux, stats=stats,
                         key=content_key(train), eval_key=content_key(eval_ds) if eval_ds is not None else "")

    # -- scores -------------------------------------------------------------------------------------------------
    def score(self, model: nn.Module, batch: TextBatch, method) -> Scores:
        if method.token_kl:
            if unwrap_causal_lm(model).lm is not unwrap_causal_lm(self.model).lm:
                self._ref_model = model  # a frozen or moving copy: its lm_head forms the reference logits
            # Layer activations are read from the reference only (no grad: the loop scores it under no_grad).
            layers = bool(method.token_masks) and not torch.is_grad_enabled()
            return score_batch(model, batch, return_states=True, return_layer_states=layers)
        if method.mismatched_kl and batch.completion_ids.shape[0] > 1:
            s = score_batch(model, _with_mismatched(batch), compute_values=method.value_head)
            k = batch.num_candidates
            return Scores(logps=s.logps[:, :k], token_logps=s.token_logps[:, :k], token_mask=s.token_mask[:, :k],
                          lengths=s.lengths[:, :k], extras={"kl_logps": s.logps[:, k].detach()})
        return score_batch(model, batch, compute_values=method.value_head)

    def finish_scores(self, policy: Scores, reference: Scores | None, method) -> Scores:
        """Token-level rows: the policy's Scores plus ``token_kl`` = KL(pi_ref || pi) per token and the SparsePO
        masks, formed from both models' hidden states."""
        if not method.token_kl:
            return policy
        if "states" not in policy.extras or reference is None or "states" not in reference.extras:
            raise ValueError(f"loss {method.name!r} needs hidden states from the causal-LM family's score for the "
                             "policy and the reference (reference.strategy copy, sync, ema or adapter)")
        ref_model = self._ref_model  # None: the PEFT policy with its adapter disabled
        if ref_model is None and self.cfg.reference.strategy not in ("adapter", "auto"):
            raise RuntimeError("per-token KL: the reference model has not scored a batch yet")
        kl = token_kl_from_states(self.model, ref_model, policy.extras["states"], reference.extras["states"],
                                  policy.token_mask, chunk_size=self.token_options.kl_chunk_size,
                                  direction="ref_policy")
        extras = {k: v for k, v in policy.extras.items() if k not in ("states", "layer_states")}
        extras["token_kl"] = kl
        if method.token_masks:
            layers = reference.extras.get("layer_states")
            if layers is None:
                raise ValueError(f"loss {method.name!r} needs the reference's layer activations")
            valid = policy.token_mask
            if method.token_masks == "learned":
                masks = self.mask_heads(layers) * valid[..., None]  # [B, K, C, n_masks]
                extras["reward_mask"] = masks[..., 0]
                if masks.shape[-1] > 1:
                    extras["kl_mask"] = masks[..., 1]
            else:
                from ..losses import activation_token_mask

                B, K, C, L, H = layers.shape
                per_layer = [layers[..., i, :].reshape(B * K, C, H) for i in range(L)]
                extras["reward_mask"] = activation_token_mask([per_layer], valid.reshape(B * K, C)).view(B, K, C)
        return Scores(policy.logps, policy.token_logps, policy.token_mask, policy.lengths, policy.values,
                      policy.embeddings, extras)

    # -- model lifecycle ----------------------------------------------------------------------------------------
    def save(self, model: nn.Module, path: Path, state_dict: dict | None = None, method=None) -> None:
        """``save_pretrained`` the model and tokenizer. A LoRA policy is saved as its adapter (TRL's layout);
        when the adapter's base exists only in memory (a random ``tiny`` model, or a base that earlier stages'
        adapters were merged into) that base is saved to ``path/base`` too and the adapter points at it, so
        ``load_causal_lm(path)`` / ``PeftModel.from_pretrained`` reproduce the trained model. SparsePO's mask
        heads go to ``sparsepo_mask_heads.pt`` (state dict + shape), not into the HF checkpoint.
        ``state_dict``: the full weights of a sharded run (keys relative to ``model``), written instead of the
        model's own tensors."""
        from ..models.text import save_causal_lm

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        heads = model._modules.pop(MASK_HEADS, None)  # saved on their own: not part of the HF checkpoint
        heads_state = None if heads is None else (
            heads.state_dict() if state_dict is None else sub_state_dict(state_dict, f"{MASK_HEADS}."))
        if state_dict is not None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{MASK_HEADS}.")}
        try:
            save_causal_lm(model, self.tokenizer, path, state_dict=state_dict,
                           in_memory_base=self.cfg.model.name_or_path == "tiny" or self.merged)
        finally:
            if heads is not None:
                model.add_module(MASK_HEADS, heads)
        if heads is not None:
            torch.save({"state_dict": heads_state, "hidden_size": heads.norm.normalized_shape[0],
                        "num_layers": heads.num_layers, "n_masks": heads.n_masks, "max_value": heads.max_value},
                       path / f"{MASK_HEADS}.pt")

    def merge_lora(self) -> None:
        from ..models.text import ValueHeadModel, apply_lora

        holder = self.model if isinstance(self.model, ValueHeadModel) else None  # reward models: LoRA on .base
        peft_model = holder.base if holder is not None else self.model
        if not hasattr(peft_model, "merge_and_unload"):
            raise ConfigError("stage.merge_lora needs lora.enabled=true")
        lc = self.cfg.lora
        merged = apply_lora(peft_model.merge_and_unload(), r=lc.r, alpha=lc.alpha, dropout=lc.dropout,
                            target_modules=lc.target_modules)
        self.merged = True
        if holder is not None:
            holder.base = merged
        else:
            self.model = merged
        if self.mask_heads is not None:  # merge_and_unload dropped the wrapper that held them
            self._attach_mask_heads()
