"""PRIOR (Chen, Peng, Zhang, Ji 2025, arXiv 2505.08971): prioritise image-related caption tokens in LVLM training.

The recipe, all under the one loop (``modality: prior``):

1. **Reference.** A text-only LM with the LVLM's tokenizer, SFT-trained on the caption text alone (no image),
   by ``mmalign.train(modality=text, loss.name=sft)`` into ``<output_dir>/prior_reference`` (reused when its
   data and settings are unchanged), or loaded from ``prior.reference_path``.
2. **Weights, cached.** Every caption token gets the reference's probability p̂ and a weight w(p̂) from
   :func:`mmalign.losses.prior_token_weights`; they are computed once and cached on disk per caption (key:
   prompt + caption text + token ids), in a file named by the reference-model hash and the weight settings, so
   a changed reference or setting recomputes and anything unchanged is reused.
3. **Weighted NTP.** The LVLM's loss is :func:`mmalign.losses.token_weighted_nll` (``per_token``: mean over
   the micro-batch's caption tokens, as HF's loss) with those weights; weights are data, no gradient flows.

Formula choices, all UNVERIFIED (the paper's code is unreleased and its method section was not read;
research/video_audio_clip_prior.md §3.2): default w = (1 − p̂)^α with α = 1, rescaled to mean 1 over the valid
tokens of each micro-batch (so the effective learning rate matches NTP); options ``surprisal`` (−log p̂)^α and
``inverse_p`` min(p̂^(−α), clip) (the importance-ratio reading), ``normalize`` per caption or none, and a
``floor`` so near-certain tokens (EOS, fixed phrases) keep some signal. Per-caption quantities are what is
cached (raw weights for ``batch``/``none``, final ones for ``sequence``); the batch rescaling happens in the
loss. α = 0 (or ``prior.enabled=false``) is plain next-token prediction through the same code.

Other choices the paper does not pin down (as far as could be read), stated so they can be revisited:

- normalisation scope: each micro-batch on each process is rescaled on its own (with ``grad_accum`` > 1 or
  DDP, the mean-1 constraint holds per micro-batch, not per optimizer step);
- sequence layout: the LVLM reads ``[BOS] <image>×N prompt caption EOS`` (LLaVA's "plain" pre-training
  template), the reference ``[BOS] prompt caption EOS``; both score the same caption tokens (+ EOS);
- the reference: an SFT run on the same captions, started from the LVLM's own language model
  (``reference_init: lvlm``; a tiny LVLM gets a fresh tiny LM of its size) for ``reference_steps`` steps; the
  paper's reference size and training budget are unknown;
- multi-process runs train the reference on all processes together (one distributed text run) and fill the
  weight cache on the main process first; across nodes without a shared filesystem, train the reference
  beforehand and pass ``prior.reference_path``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import losses as L
from ..adapters.causal_lm import score_batch
from ..config import ConfigError
from ..data.batches import TextBatch
from ..data.captions import CaptionDataset, caption_and_prompt, read_caption_rows
from ..hashing import model_hash
from ..models.lvlm import (
    PatchLVLM,
    build_tiny_lvlm,
    extract_language_model,
    load_lvlm,
    save_lvlm,
    tiny_text_settings,
    unwrap_lvlm,
)
from ..schema import PriorConfig, StageConfig, TrainConfig
from ..types import Scores
from .task import StageData, Task

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def weight_settings(pc: PriorConfig) -> dict:
    """What the cached per-caption weights depend on besides the caption and the reference."""
    return {"form": pc.form, "alpha": pc.alpha, "clip": pc.clip, "floor": pc.floor,
            "cached_normalize": "sequence" if pc.normalize == "sequence" else "none", "version": CACHE_VERSION}


class PriorWeightCache:
    """Per-caption PRIOR weights and reference log-probs in one file per (reference hash, weight settings)."""

    def __init__(self, path: str | Path, meta: dict | None = None):
        self.path = Path(path)
        self.entries: dict[str, tuple[Tensor, Tensor]] = {}
        self.meta = meta or {}
        if self.path.exists():
            blob = torch.load(self.path, weights_only=True)
            off = blob["offsets"].tolist()
            for i, k in enumerate(blob["keys"]):
                self.entries[k] = (blob["weights"][off[i]:off[i + 1]], blob["ref_logps"][off[i]:off[i + 1]])

    @classmethod
    def for_reference(cls, cache_dir: str | Path, reference_hash: str, settings: dict) -> PriorWeightCache:
        """The cache file of one reference model (by weight hash) and one set of weight settings."""
        key = hashlib.sha256(json.dumps({"reference": reference_hash, **settings}, sort_keys=True).encode())
        return cls(Path(cache_dir) / f"prior-weights-{key.hexdigest()[:16]}.pt",
                   {"reference_hash": reference_hash, "settings": settings})

    def get(self, key: str) -> tuple[Tensor, Tensor] | None:
        return self.entries.get(key)

    def save(self) -> None:
        keys = list(self.entries)
        lengths = [self.entries[k][0].numel() for k in keys]
        offsets = torch.tensor([0] + lengths).cumsum(0)
        empty = torch.zeros(0)
        blob = {"keys": keys, "offsets": offsets,
                "weights": torch.cat([self.entries[k][0] for k in keys]) if keys else empty,
                "ref_logps": torch.cat([self.entries[k][1] for k in keys]) if keys else empty,
                "meta": json.dumps(self.meta)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(self.path)  # atomic: a crash never leaves a half-written cache


@torch.no_grad()
def reference_token_logps(reference: nn.Module, batch: TextBatch) -> Tensor:
    """``[B, C]`` log p̂ of each caption token under the text-only reference (0 on padding)."""
    return score_batch(reference, batch).token_logps[:, 0]


def compute_weights(dataset: CaptionDataset, reference: nn.Module, pc: PriorConfig, cache: PriorWeightCache, *,
                    batch_size: int, device: torch.device | str = "cpu") -> tuple[list[Tensor], dict]:
    """Per-example weights ``[len(completion)]`` from the cache, scoring only captions it lacks."""
    todo = [i for i, ex in enumerate(dataset.examples) if cache.get(ex.cache_key) is None]
    if todo:
        was_training = reference.training
        reference.eval()
        cached_norm = weight_settings(pc)["cached_normalize"]
        for idx, batch in dataset.text_batches(batch_size, todo):
            batch = batch.to(device)
            logps = reference_token_logps(reference, batch)
            mask = batch.completion_mask[:, 0].bool()
            w = L.prior_token_weights(logps, mask, alpha=pc.alpha, form=pc.form, normalize=cached_norm,
                                      clip=pc.clip, floor=pc.floor)
            for row, i in enumerate(idx):
                n = len(dataset.examples[i].completion_ids)
                cache.entries[dataset.examples[i].cache_key] = (w[row, :n].float().cpu(), logps[row, :n].float().cpu())
        reference.train(was_training)
        cache.save()
    weights = [cache.get(ex.cache_key)[0] for ex in dataset.examples]
    return weights, {"prior/cache_hits": len(dataset) - len(todo), "prior/cache_computed": len(todo)}


def prior_loss(policy: Scores, batch: TextBatch, normalize: str = "batch") -> L.LossOutput:
    """Weighted next-token loss over caption tokens; ``extras["prior_weights"]`` absent → plain NTP."""
    logps, mask = policy.token_logps[:, 0], policy.token_mask[:, 0]
    w = batch.extras.get("prior_weights")
    extra = {}
    if w is not None:
        w = w[:, 0].to(logps.device, torch.float32).detach()
        valid = mask.bool()
        raw = w[valid]
        if normalize == "batch" and raw.numel():
            mean = raw.mean()
            w = w / mean if mean > 0 else torch.zeros_like(w)
        extra = {"prior/raw_weight_mean": raw.mean() if raw.numel() else w.new_zeros(()),
                 "prior/weight_max": w[valid].max() if raw.numel() else w.new_zeros(())}
    out = L.token_weighted_nll(logps, mask, weights=w, normalize="per_token")
    out.metrics.update({k: v.detach() for k, v in extra.items()})
    return out


def _all_train_sources(cfg: TrainConfig) -> list[str]:
    out = list(cfg.data.train)
    for s in cfg.stages:
        out += [x for x in (s.train or []) if x not in out]
    return out


def process_state():
    """accelerate's process state, set up as the loop sets it up: a launcher's CPU-only processes need
    ``cpu=True`` for gloo, and the first call fixes the shared state for the whole run."""
    from accelerate import PartialState

    acc = getattr(torch, "accelerator", None)
    has_device = bool(acc.is_available()) if acc is not None else torch.cuda.is_available()
    return PartialState(cpu=True) if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_device else PartialState()


def _freeze_unread_vision_layers(llava: nn.Module) -> None:
    """Freeze the vision layers LLaVA never reads (after ``vision_feature_layer``, and ``post_layernorm``):
    they get no gradient, which DDP without ``find_unused_parameters`` would reject."""
    layer = llava.config.vision_feature_layer
    tower = llava.model.vision_tower
    for name, module in tower.named_modules():
        if name.endswith("post_layernorm") or name.endswith(".head"):
            module.requires_grad_(False)
        if name.endswith("encoder.layers") and isinstance(module, nn.ModuleList):
            n = len(module)
            read = max(layer) if isinstance(layer, list) else layer
            first_unread = read if read >= 0 else n + 1 + read  # hidden_states[k] is the output of layer k-1
            for m in list(module)[first_unread:]:
                m.requires_grad_(False)


def build_caption_tokenizer(cfg: TrainConfig):
    """Tokenizer of a tiny LVLM: ``model.tokenizer`` if set, else a BPE trained on the run's prompts and captions
    (``model.tiny.vocab_size``, default 512), with ``<image>`` added."""
    from ..data.rows import load_rows
    from ..models.lvlm import add_image_token
    from ..models.text import load_tokenizer
    from ..models.tokenizer import train_bpe_tokenizer

    if cfg.model.tokenizer:
        tok = load_tokenizer(cfg.model.tokenizer)
    else:
        texts = []
        for _, _, row in load_rows(_all_train_sources(cfg) + list(cfg.data.eval), skip_bad_rows=True):
            caption, prompt, _ = caption_and_prompt(row, cfg.prior.caption_field, cfg.prior.prompt)
            texts += [t for t in (prompt, caption) if isinstance(t, str) and t]
        tok = train_bpe_tokenizer(texts, vocab_size=int(cfg.model.tiny.get("vocab_size", 512)))
        tok.padding_side = "left"
    add_image_token(tok)
    return tok


class PriorTask(Task):
    """Method recipe for LVLM training with PRIOR token weights (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, *, tokenizer=None, model: nn.Module | None = None, inputs=None,
                 reference: nn.Module | None = None, train_fn=None):
        """``train_fn(config, overrides) -> summary`` trains PRIOR's text-only reference when it is not cached
        (:func:`mmalign.api.build_task` passes :func:`mmalign.api.train`; methods do not import the API). Without
        it, the reference is trained by :meth:`run_prerequisites`, which ``mmalign.api.train(cfg, task=task)``
        calls before the loop."""
        errs = []
        if cfg.loss.name != "prior":
            errs.append(f"loss.name={cfg.loss.name!r}: modality=prior trains with loss.name=prior (plain next-token "
                        "prediction: prior.enabled=false)")
        if cfg.loss.kwargs:
            errs.append(f"loss.kwargs={cfg.loss.kwargs}: PRIOR's weight settings live under prior.* (alpha, form, "
                        "normalize, clip, floor)")
        if errs:
            raise ConfigError(errs)
        self.cfg, self.pc = cfg, cfg.prior
        self.needs_reference = False  # PRIOR's reference is text-only; its weights arrive with the data
        self._examples: dict[tuple, tuple] = {}
        if model is None:
            model, inputs = self._build_model(tokenizer)
        elif inputs is None:
            raise ValueError("PriorTask(model=...) needs inputs= (the LVLMInputs of that model)")
        self.inputs, self.tokenizer = inputs, inputs.tokenizer
        self._reference_dir: Path | None = None
        self._train_fn, self._pending_reference = train_fn, None
        self.reference = reference
        if self.pc.enabled and reference is None:
            self._reference_dir = self._prepare_reference(model)
        self.model = self._prepare_training(model)

    # -- model ----------------------------------------------------------------------------------------------
    def _build_model(self, tokenizer):
        mc = self.cfg.model
        if mc.name_or_path != "tiny":
            return load_lvlm(mc.name_or_path, dtype=mc.dtype, attn_implementation=mc.attn_implementation,
                             gradient_checkpointing=mc.gradient_checkpointing, trust_remote_code=mc.trust_remote_code)
        return build_tiny_lvlm(self.pc.lvlm, tokenizer or build_caption_tokenizer(self.cfg), seed=self.cfg.run.seed,
                               **mc.tiny)

    def _prepare_training(self, model: nn.Module) -> nn.Module:
        base = unwrap_lvlm(model)
        if not isinstance(base, PatchLVLM):
            if self.pc.freeze_vision_tower:
                base.model.vision_tower.requires_grad_(False)
            else:
                _freeze_unread_vision_layers(base)
        lc = self.cfg.lora
        if not lc.enabled:
            return model
        from ..models.text import apply_lora

        if isinstance(model, PatchLVLM):  # LoRA on the LM; the patch embedding trains in full
            model.lm = apply_lora(model.lm, r=lc.r, alpha=lc.alpha, dropout=lc.dropout,
                                  target_modules=lc.target_modules)
            return model
        return apply_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules,
                          modules_to_save=list(self.pc.modules_to_save) or None)

    # -- reference (step 1) ---------------------------------------------------------------------------------
    def _prepare_reference(self, model: nn.Module) -> Path:
        if self.pc.reference_path:
            path = Path(self.pc.reference_path).expanduser()
            if not path.is_dir():
                raise ConfigError(f"prior.reference_path={self.pc.reference_path!r} is not a directory; give a "
                                  "text-only causal-LM checkpoint (or null to train one on the captions)")
            return path
        state = process_state()
        ref_dir = Path(self.cfg.run.output_dir) / "prior_reference"
        examples = self._read(_all_train_sources(self.cfg))[0]
        corpus = [{"prompt": ex.prompt, "completion": ex.caption} for ex in examples]
        mc, pc = self.cfg.model, self.pc
        run = {"modality": "text", "loss": {"name": "sft"}, "reference": {"strategy": "none"},
               "data": {"train": [str(ref_dir / "captions.jsonl")], "max_length": self.cfg.data.max_length},
               "model": {"name_or_path": pc.reference_init, "tokenizer": str(ref_dir / "tokenizer"),
                         "dtype": mc.dtype},
               "run": {"output_dir": str(ref_dir), "max_steps": pc.reference_steps, "seed": self.cfg.run.seed,
                       "batch_size": pc.reference_batch_size or self.cfg.run.batch_size, "resume": "never",
                       "report_to": ["jsonl"], "progress": self.cfg.run.progress, "save_every": 0},
               "optim": {"lr": pc.reference_lr, "scheduler": "cosine", "warmup_ratio": 0.05}}
        if pc.reference_init == "lvlm":
            if mc.name_or_path == "tiny":
                run["model"].update(name_or_path="tiny", tiny=tiny_text_settings(mc.tiny))
            else:
                run["model"]["name_or_path"] = str(ref_dir / "init")
        key = hashlib.sha256(json.dumps([run, list(pc.reference_overrides), corpus, mc.name_or_path],
                                        sort_keys=True).encode()).hexdigest()
        final, marker = ref_dir / "final", ref_dir / "prior_reference.json"
        if (final / "config.json").is_file() and marker.is_file() and json.loads(marker.read_text()).get("key") == key:
            log.info("PRIOR reference reused from %s", final)
            return final
        if state.is_main_process:
            ref_dir.mkdir(parents=True, exist_ok=True)
            (ref_dir / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
            self.tokenizer.save_pretrained(str(ref_dir / "tokenizer"))
            if run["model"]["name_or_path"] == str(ref_dir / "init"):
                extract_language_model(model).save_pretrained(str(ref_dir / "init"))
                self.tokenizer.save_pretrained(str(ref_dir / "init"))
        state.wait_for_everyone()
        self._pending_reference = (run, marker, key, len(corpus), ref_dir)
        if self._train_fn is not None:
            self.run_prerequisites(self._train_fn)
        return final

    def run_prerequisites(self, train_fn) -> None:
        """Train the text-only reference with ``train_fn`` (``mmalign.api.train``) if it is still pending."""
        if self._pending_reference is None:
            return
        run, marker, key, n, ref_dir = self._pending_reference
        state = process_state()
        log.info("PRIOR step 1: training the text-only reference LM on %d captions in %s", n, ref_dir)
        train_fn(run, list(self.pc.reference_overrides))  # every process joins: the text run may be distributed
        state.wait_for_everyone()
        if state.is_main_process:
            marker.write_text(json.dumps({"key": key}))
        self._pending_reference = None

    def _load_reference(self) -> nn.Module:
        from ..models.text import load_causal_lm, load_tokenizer

        if self.reference is not None:
            return self.reference
        if self._pending_reference is not None:
            raise RuntimeError("PRIOR's text-only reference is not trained yet: build the task with "
                               "mmalign.api.build_task, pass train_fn=mmalign.api.train, or train through "
                               "mmalign.api.train(cfg, task=task)")
        path = self._reference_dir
        ref = load_causal_lm(path, dtype=self.cfg.model.dtype)
        if any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            self._check_tokenizer(load_tokenizer(path), path)
        return ref

    def _check_tokenizer(self, ref_tok, path: Path) -> None:
        """PRIOR's weights only line up if the reference tokenises captions exactly as the LVLM does (§3.3)."""
        for ex in [e for exs, _ in self._examples.values() for e in exs][:32]:
            ids = list(ref_tok(ex.caption, add_special_tokens=False)["input_ids"])
            n = min(len(ids), len(ex.completion_ids))  # the LVLM's copy may be truncated to data.max_length
            if ids[:n] != ex.completion_ids[:n]:
                raise ConfigError(f"PRIOR reference {str(path)!r}: its tokenizer splits the caption "
                                  f"{ex.caption[:60]!r} into {ids[:12]}..., the LVLM's into "
                                  f"{ex.completion_ids[:12]}...; the reference must use the LVLM's tokenizer")

    # -- data -----------------------------------------------------------------------------------------------
    def _read(self, sources: list[str]):
        key = tuple(sources)
        if key not in self._examples:
            dc, pc = self.cfg.data, self.pc
            self._examples[key] = read_caption_rows(
                sources, self.tokenizer, image_field=pc.image_field, caption_field=pc.caption_field,
                default_prompt=pc.prompt, image_root=pc.image_root, max_length=dc.max_length, limit=dc.limit,
                skip_bad_rows=dc.skip_bad_rows, verify_images=pc.verify_images)
        return self._examples[key]

    def dataset(self, sources: list[str]) -> tuple[CaptionDataset, dict]:
        examples, stats = self._read(list(sources))
        tok, io = self.tokenizer, self.inputs
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return CaptionDataset(examples, pad_token_id=pad, image_token_id=io.image_token_id,
                              num_image_tokens=io.num_image_tokens, bos_token_id=tok.bos_token_id,
                              pixel_values=io.pixel_values), dict(stats)

    def attach_weights(self, datasets: list[CaptionDataset]) -> dict:
        """Compute (or read from the cache) PRIOR weights for ``datasets`` and attach them."""
        state = process_state()
        ref = self._load_reference()
        cache_dir = self.pc.cache_dir or Path(self.cfg.run.output_dir) / "prior_cache"
        stats: dict = {}
        with state.main_process_first():  # the main process fills the cache, the others then read it
            ref = ref.to(state.device)
            cache = PriorWeightCache.for_reference(cache_dir, model_hash(ref), weight_settings(self.pc))
            for ds in datasets:
                weights, s = compute_weights(ds, ref, self.pc, cache, device=state.device,
                                             batch_size=self.pc.reference_batch_size or self.cfg.run.batch_size)
                ds.attach_weights(weights)
                for k, v in s.items():
                    stats[k] = stats.get(k, 0) + v
        if self.reference is None:
            del ref  # a loaded reference is not needed during training
        stats["prior/cache_file"] = str(cache.path)
        return stats

    def stage_data(self, stage: StageConfig) -> StageData:
        dc = self.cfg.data
        train, stats = self.dataset(list(stage.train or dc.train))
        eval_ds = self.dataset(list(dc.eval))[0] if dc.eval else None
        if self.pc.enabled:
            stats.update({k: v for k, v in self.attach_weights([d for d in (train, eval_ds) if d]).items()
                          if not isinstance(v, str)})
        return StageData(train=train, collate=train.collate, eval=eval_ds, stats=stats, key=train.content_key())

    def configure_stage(self, stage: StageConfig) -> None:
        if stage.loss:
            raise ConfigError(f"stage {stage.name!r}: PRIOR stages take no loss overrides (got {stage.loss}); "
                              "weight settings are the prior.* keys")

    # -- scores and loss ------------------------------------------------------------------------------------
    def score(self, model: nn.Module, batch: TextBatch) -> Scores:
        from ..adapters.lvlm import score_captions

        return score_captions(model, batch)

    def loss(self, policy: Scores, reference: Scores | None, batch: TextBatch, aux: Scores | None = None):
        return prior_loss(policy, batch, self.pc.normalize)

    # -- model lifecycle ------------------------------------------------------------------------------------
    def save_pretrained(self, model: nn.Module, path: Path, state_dict: dict | None = None) -> None:
        save_lvlm(model, self.inputs, path, state_dict=state_dict)

    def merge_lora(self) -> None:
        lc = self.cfg.lora
        if not lc.enabled:
            raise ValueError("stage.merge_lora needs lora.enabled=true")
        if isinstance(self.model, PatchLVLM):
            self.model.lm = self.model.lm.merge_and_unload()
        else:
            self.model = self.model.merge_and_unload()
        self.model = self._prepare_training(self.model)
