"""PRIOR (Chen, Peng, Zhang, Ji 2025, arXiv 2505.08971): prioritise image-related caption tokens in LVLM training.

The generic task over the LVLM family (:class:`PriorTask` is an :class:`~mmalign.methods.lvlm.LVLMTask`): the
family builds the model (tiny or loaded, freezing, LoRA), reads the ``captions`` rows of the ``prior`` row of
METHODS and scores them; this recipe adds a text-only reference run (:meth:`PriorTask.run_prerequisites`) and
the per-token weights it gives (attached to the data in :meth:`PriorTask.stage_data`). All under the one loop
(``modality: prior``):

1. **Reference.** A text-only LM with the LVLM's tokenizer, SFT-trained on the caption text alone (no image),
   by ``mmalign.train(modality=text, loss.name=sft)`` into ``<output_dir>/prior_reference`` (reused when its
   data and settings are unchanged), or loaded from ``prior.reference_path``.
2. **Weights, cached.** Every caption token gets the reference's probability p̂ and a weight w(p̂) from
   :func:`mmalign.losses.prior_token_weights`; they are computed once and cached on disk per caption (key:
   prompt + caption text + token ids), in a file named by the reference-model hash and the weight settings, so
   a changed reference or setting recomputes and anything unchanged is reused.
3. **Weighted NTP.** The LVLM's loss is the ``prior`` row's :func:`~mmalign.methods.table.prior_nll`:
   :func:`mmalign.losses.token_weighted_nll` (``per_token``: mean over the micro-batch's caption tokens, as HF's
   loss) with those weights, rescaled per ``prior.normalize``; weights are data, no gradient flows.

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
- the encoder-free LVLM's patch embedding trains even under ``prior.freeze_vision_tower`` (which freezes
  LLaVA's vision tower): it is that model's only image pathway;
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
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import losses as L
from ..adapters.causal_lm import score_batch
from ..adapters.lvlm_family import train_sources
from ..config import ConfigError
from ..data.batches import TextBatch
from ..data.captions import CaptionDataset
from ..hashing import model_hash
from ..models.lvlm import tiny_text_settings
from ..schema import PriorConfig, StageConfig, TrainConfig
from .lvlm import LVLMTask
from .task import StageData

__all__ = ["PriorTask", "PriorWeightCache", "compute_weights", "reference_token_logps", "weight_settings"]

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


def process_state():
    """accelerate's process state, set up as the loop sets it up: a launcher's CPU-only processes need
    ``cpu=True`` for gloo, and the first call fixes the shared state for the whole run."""
    from accelerate import PartialState

    acc = getattr(torch, "accelerator", None)
    has_device = bool(acc.is_available()) if acc is not None else torch.cuda.is_available()
    return PartialState(cpu=True) if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_device else PartialState()


class PriorTask(LVLMTask):
    """LVLM training with PRIOR token weights (see the module docstring): the LVLM task on the ``prior`` row, with
    the reference run as a prerequisite and the weights attached to each stage's data."""

    _family_options: ClassVar[dict[str, Any]] = {"train_patch_embed": True}  # its only image pathway learns

    def __init__(self, cfg: TrainConfig, *, tokenizer=None, model: nn.Module | None = None, inputs=None,
                 reference: nn.Module | None = None, train_fn=None):
        """``train_fn(config, overrides) -> summary`` trains PRIOR's text-only reference when it is not cached
        (:func:`mmalign.api.build_task` passes :func:`mmalign.api.train`; methods do not import the API). Without
        it, the reference is trained by :meth:`run_prerequisites`, which ``mmalign.api.train(cfg, task=task)``
        calls before the loop. ``reference``: a text-only LM to weight with (nothing is trained)."""
        super().__init__(cfg, tokenizer=tokenizer, model=model, inputs=inputs)
        self.pc, self.reference = cfg.prior, reference
        self.loss_kwargs = {"normalize": self.pc.normalize}
        self._reference_dir: Path | None = None
        self._train_fn, self._pending_reference = train_fn, None
        if self.pc.enabled and reference is None:
            self._reference_dir = self._prepare_reference()

    @classmethod
    def check(cls, cfg: TrainConfig, uses) -> list[str]:
        errs = []
        if cfg.loss.kwargs:
            errs.append(f"loss.kwargs={cfg.loss.kwargs}: PRIOR's weight settings live under prior.* (alpha, form, "
                        "normalize, clip, floor)")
        errs += [f"stages.{i}.loss={s.loss}: PRIOR stages take no loss overrides; weight settings are the prior.* "
                 "keys" for i, s in enumerate(cfg.stages) if s.loss]
        return errs

    def configure_stage(self, stage: StageConfig) -> None:
        super().configure_stage(stage)  # the prior row again (stage overrides are refused at config load)
        self.loss_kwargs = {"normalize": self.pc.normalize}

    # -- reference (step 1) ---------------------------------------------------------------------------------
    def _prepare_reference(self) -> Path:
        if self.pc.reference_path:
            path = Path(self.pc.reference_path).expanduser()
            if not path.is_dir():
                raise ConfigError(f"prior.reference_path={self.pc.reference_path!r} is not a directory; give a "
                                  "text-only causal-LM checkpoint (or null to train one on the captions)")
            return path
        state = process_state()
        ref_dir = Path(self.cfg.run.output_dir) / "prior_reference"
        examples = self.family.caption_dataset(train_sources(self.cfg))[0].examples
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
        run["run"]["overwrite"] = True  # a stale reference (other key) is retrained in place; not in the cache key
        final, marker = ref_dir / "final", ref_dir / "prior_reference.json"
        if (final / "config.json").is_file() and marker.is_file() and json.loads(marker.read_text()).get("key") == key:
            log.info("PRIOR reference reused from %s", final)
            return final
        if state.is_main_process:
            ref_dir.mkdir(parents=True, exist_ok=True)
            (ref_dir / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
            self.tokenizer.save_pretrained(str(ref_dir / "tokenizer"))
            if run["model"]["name_or_path"] == str(ref_dir / "init"):
                self.family.save_language_model(ref_dir / "init")
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

    def _load_reference(self, datasets: list[CaptionDataset]) -> nn.Module:
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
            _check_tokenizer(load_tokenizer(path), path, [e for ds in datasets for e in ds.examples][:32])
        return ref

    # -- weights (step 2) -----------------------------------------------------------------------------------
    def attach_weights(self, datasets: list[CaptionDataset]) -> dict:
        """Compute (or read from the cache) PRIOR weights for ``datasets`` and attach them."""
        state = process_state()
        ref = self._load_reference(datasets)
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
        """The family's caption data, with PRIOR weights attached to the train and eval sets."""
        data = super().stage_data(stage)
        if self.pc.enabled:
            weighted = self.attach_weights([d for d in (data.train, data.eval) if d is not None])
            data.stats.update({k: v for k, v in weighted.items() if not isinstance(v, str)})
        return data


def _check_tokenizer(ref_tok, path: Path, examples) -> None:
    """PRIOR's weights only line up if the reference tokenises captions exactly as the LVLM does (§3.3)."""
    for ex in examples:
        ids = list(ref_tok(ex.caption, add_special_tokens=False)["input_ids"])
        n = min(len(ids), len(ex.completion_ids))  # the LVLM's copy may be truncated to data.max_length
        if ids[:n] != ex.completion_ids[:n]:
            raise ConfigError(f"PRIOR reference {str(path)!r}: its tokenizer splits the caption "
                              f"{ex.caption[:60]!r} into {ids[:12]}..., the LVLM's into "
                              f"{ex.completion_ids[:12]}...; the reference must use the LVLM's tokenizer")
