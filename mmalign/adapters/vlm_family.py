"""The vision-language model family for images and video (``modality: vlm``): Qwen2-VL, Qwen2.5-VL (TEMPLE's
model, arXiv 2503.16929), LLaVA-OneVision and LLaVA-NeXT-Video, trained with any preference loss of the METHODS
table the family can feed (DPO and every ``loss_type``, IPO, KTO, BCO, SimPO, ORPO, CPO, NPO, Plackett–Luce, SFT).

- **Build**: ``model.name_or_path: tiny`` builds a random tiny model of the real class of ``vlm.arch`` with its
  real processor and a BPE tokenizer trained on the run's text (:mod:`mmalign.models.vlm`); anything else is
  loaded with :func:`~mmalign.models.vlm.load_vlm` (a full checkpoint or a LoRA adapter directory), its arch read
  from its ``config.json``. ``vlm.min_pixels`` / ``vlm.max_pixels`` bound the Qwen processors' resize.
- **What trains**: ``vlm.freeze_vision_tower`` / ``vlm.freeze_projector`` (both true by default, TEMPLE's
  ``freeze_vit``) freeze the vision encoder and the vision→LM projector and keep them out of LoRA
  (``lora.enabled``: peft ``all-linear`` over the rest; LoRA reaches an unfrozen tower too, as ms-swift does).
  An unfrozen LLaVA tower has its unread layers frozen (they get no gradient, which DDP would reject).
- **Data**: :func:`mmalign.data.vlm_rows.read_vlm_rows` (TRL / ms-swift / TEMPLE rows with images and videos,
  frames sampled at ``vlm.fps`` up to ``vlm.max_frames``), tokenised once by the model's processor
  (:mod:`mmalign.adapters.vlm_data`: over-long completions cut to ``data.max_length`` and counted).
- **Scores**: :func:`~mmalign.adapters.vlm.score_candidates` (media once per example, prompt KV cache shared by
  the candidates, M-RoPE positions from the model's own ``get_rope_index``, frozen visual features shared with
  the reference pass). KTO's mismatched pairs (prompt i, completion i−1) ride on the same prompt cache as one
  extra candidate.
- **Save**: :func:`~mmalign.models.vlm.save_vlm`: a LoRA adapter over a base on disk; full weights with the
  adapter folded in when the base is a tiny in-memory one or earlier stages merged adapters into it
  (``stage.merge_lora``, TEMPLE's curriculum).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.row_files import DataError
from ..models.text import DTYPES
from ..models.vlm import QWEN, build_tiny_vlm, build_vlm_tokenizer, load_vlm, save_vlm, unwrap_vlm
from ..types import Scores, StageData
from .family import ModelFamily
from .lvlm_family import _texts, freeze_image_encoder, train_sources
from .vlm import VLMBatch, score_candidates
from .vlm_data import VLMDataset, encode_examples

__all__ = ["VLMFamily", "freeze_visual", "visual_module_names"]


def visual_module_names(arch: str) -> tuple[list[str], list[str]]:
    """Module paths (under ``model.``) of the vision encoder and of the vision→LM projector of ``arch``."""
    if arch in QWEN:
        return ["visual.patch_embed", "visual.blocks"], ["visual.merger"]
    return ["vision_tower"], ["multi_modal_projector", "vision_resampler", "image_newline"]


def freeze_visual(model: nn.Module, arch: str, *, tower: bool, projector: bool) -> None:
    """Freeze the vision encoder (``tower``) and / or the projector (``projector``); with an unfrozen LLaVA tower,
    freeze the layers its ``vision_feature_layer`` never reads."""
    inner = unwrap_vlm(model).model
    enc, proj = visual_module_names(arch)
    for names, frozen in ((enc, tower), (proj, projector)):
        for name in names:
            obj = getattr(inner, name, None) if "." not in name else inner.get_submodule(name)
            if isinstance(obj, nn.Module):
                obj.requires_grad_(not frozen)
            elif isinstance(obj, nn.Parameter):
                obj.requires_grad_(not frozen)
    if not tower and arch not in QWEN:
        freeze_image_encoder(unwrap_vlm(model), False)


def _exclude_pattern(arch: str, tower: bool, projector: bool) -> str | None:
    enc, proj = visual_module_names(arch)
    names = (enc if tower else []) + (proj if projector else [])
    if not names:
        return None
    alternatives = "|".join(n.replace(".", r"\.") for n in names)
    return r".*\.(" + alternatives + r")(\..*)?"


class VLMFamily(ModelFamily):
    """Vision-language LMs on images and video (see the module docstring). Prebuilt parts: ``tokenizer=`` (for a
    tiny model), or ``model=`` with ``inputs=`` (its :class:`~mmalign.models.vlm.VLMInputs`)."""

    name = "vlm"
    modality = "vlm"
    provides = frozenset({"logps", "lengths", "nll", "token_logps"})
    cannot = {"token_kl": "per-token KL against the reference is not implemented for VLMs yet",
              "values": "VLMs carry no value head (reward models train on the causal-LM family)",
              "embeddings": "a VLM gives no paired embeddings"}

    def __init__(self, cfg, methods, *, tokenizer=None, model: nn.Module | None = None, inputs=None):
        self.cfg, self.vc = cfg, cfg.vlm
        self.merged = False
        self._rows: dict[tuple, tuple] = {}
        if model is None:
            model, inputs = self._build(tokenizer)
        elif inputs is None:
            raise ValueError("VLMFamily(model=...) needs inputs= (the VLMInputs of that model)")
        self.inputs = inputs
        with torch.random.fork_rng(devices=[]):  # LoRA weights come from the global RNG: seed them from the run
            torch.manual_seed(cfg.run.seed)
            self.model = self._prepare(model)

    @property
    def tokenizer(self):
        return self.inputs.tokenizer

    @property
    def arch(self) -> str:
        return self.inputs.arch

    # -- model --------------------------------------------------------------------------------------------------
    def _build(self, tokenizer):
        mc, vc = self.cfg.model, self.vc
        if mc.name_or_path != "tiny":
            model, inputs = load_vlm(mc.name_or_path, dtype=mc.dtype, attn_implementation=mc.attn_implementation,
                                     gradient_checkpointing=mc.gradient_checkpointing,
                                     trust_remote_code=mc.trust_remote_code)
            _pixel_bounds(inputs, vc.min_pixels, vc.max_pixels)
            return model, inputs
        tiny = dict(mc.tiny)
        if tokenizer is None:
            from ..data.rows import load_rows

            sources = [*train_sources(self.cfg), *self.cfg.data.eval]
            texts = [t.replace("<image>", " ").replace("<video>", " ") for _, _, row in
                     load_rows(sources, skip_bad_rows=True) for k in ("prompt", "chosen", "rejected", "completion",
                                                                      "completions", "messages", "rejected_response")
                     for t in _texts(row.get(k)) if t.strip()]
            tokenizer = build_vlm_tokenizer(vc.arch, texts, vocab_size=int(tiny.pop("vocab_size", 400)))
        else:
            tiny.pop("vocab_size", None)
        for key, value in (("min_pixels", vc.min_pixels), ("max_pixels", vc.max_pixels)):
            if value is not None:
                tiny.setdefault(key, value)
        model, inputs = build_tiny_vlm(vc.arch, tokenizer, seed=self.cfg.run.seed, **tiny)
        model = model.to(DTYPES[mc.dtype])
        if mc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, inputs

    def _prepare(self, model: nn.Module) -> nn.Module:
        vc = self.vc
        if hasattr(model, "peft_config"):
            return model  # a loaded adapter: already trainable
        freeze_visual(model, self.arch, tower=vc.freeze_vision_tower, projector=vc.freeze_projector)
        if not self.cfg.lora.enabled:
            return model
        from peft import LoraConfig, get_peft_model

        lc = self.cfg.lora
        config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                            task_type="CAUSAL_LM",
                            exclude_modules=_exclude_pattern(self.arch, vc.freeze_vision_tower, vc.freeze_projector))
        model = get_peft_model(model, config)
        if not vc.freeze_projector:  # the newline is a bare parameter (no LoRA on it): it trains in full
            newline = getattr(unwrap_vlm(model).model, "image_newline", None)
            if isinstance(newline, nn.Parameter):
                newline.requires_grad_(True)
        return model

    # -- data ---------------------------------------------------------------------------------------------------
    def _media_spec(self):
        from ..data.vlm_media import MediaSpec

        vc = self.vc
        ip = self.inputs.processor.image_processor
        qwen = self.arch in QWEN
        factor = int(getattr(ip, "patch_size", 14)) * int(getattr(ip, "merge_size", 2)) if qwen else 1
        return MediaSpec(fps=vc.fps, max_frames=vc.max_frames, min_pixels=vc.min_pixels, max_pixels=vc.max_pixels,
                         factor=factor, frame_factor=2 if qwen and vc.max_frames >= 2 else 1,
                         backend=vc.video_backend)

    def dataset(self, sources, fmt: str, *, skip: bool | None = None) -> tuple[VLMDataset, dict]:
        """A :class:`~mmalign.adapters.vlm_data.VLMDataset` of ``sources`` (rows read and decoded once per list of
        files) in format ``fmt`` (``auto``: the rows' own, which must be one) and its stats."""
        from ..data.vlm_rows import read_vlm_rows

        dc = self.cfg.data
        skip = dc.skip_bad_rows if skip is None else skip
        key = (tuple(sources), skip)
        if key not in self._rows:
            self._rows[key] = read_vlm_rows(list(sources), media=self._media_spec(), root=self.vc.media_root,
                                            skip_bad_rows=skip, limit=dc.limit)
        examples, counts = self._rows[key]
        kinds = sorted({ex.kind for ex in examples})
        if len(kinds) > 1:
            raise DataError(f"{list(sources)}: rows of several formats {kinds}; one stage reads one format (split "
                            "the files, or give each format its own stage)")
        found = kinds[0] if kinds else (fmt if fmt != "auto" else "pairs")
        if fmt not in ("auto", found) and not (fmt == "sft" and found == "pairs"):
            raise DataError(f"{list(sources)}: the rows are in the {found!r} format, not data.format={fmt!r}; fix "
                            "data.format (or auto)")
        encoded, stats = encode_examples(self.inputs, examples, max_length=dc.max_length, skip_bad_rows=skip)
        out = {**counts.as_dict(), **stats}
        out["rows_used"] = len(encoded)
        return VLMDataset(encoded, self.inputs, format=found), out

    def stage_data(self, stage, method) -> StageData:
        """Train (and eval, retain) data of ``stage``: the rows' format must be one the loss reads
        (``method.formats``; SFT also takes pairs and trains on the chosen side)."""
        dc = self.cfg.data
        sources = stage.train or dc.train
        train, stats = self.dataset(sources, dc.format)
        if train.format not in method.formats:
            raise DataError(f"{list(sources)}: the rows are in the {train.format!r} format, but loss "
                            f"{method.name!r} reads {list(method.formats)}; fix: give it such rows (see "
                            f"mmalign.data.vlm_rows) or pick a loss for {train.format!r} rows")
        eval_ds = None
        if dc.eval:
            eval_ds, eval_stats = self.dataset(dc.eval, train.format)
            stats.update({f"eval/{k}": v for k, v in eval_stats.items()})
        aux = None
        if getattr(method, "aux", "") == "retain" and self.cfg.retain is not None and self.cfg.retain.train:
            aux, retain_stats = self.dataset(self.cfg.retain.train, "auto", skip=self.cfg.retain.skip_bad_rows)
            stats.update({f"retain/{k}": v for k, v in retain_stats.items()})
        return StageData(train=train, collate=train.collate, eval=eval_ds, aux=aux, stats=stats,
                         key=train.content_key(), eval_key=eval_ds.content_key() if eval_ds is not None else "")

    # -- scores -------------------------------------------------------------------------------------------------
    def score(self, model: nn.Module, batch: VLMBatch, method) -> Scores:
        share = self.vc.share_prompt
        if getattr(method, "winners_only", False) and batch.num_candidates > 1:
            batch = batch.with_candidates(batch.completion_ids[:, :1], batch.completion_mask[:, :1],
                                          None if batch.labels is None else batch.labels[:, :1])
        if getattr(method, "mismatched_kl", False) and batch.batch_size > 1:
            k = batch.num_candidates
            ids = torch.cat([batch.completion_ids, batch.completion_ids[:, :1].roll(1, dims=0)], 1)
            mask = torch.cat([batch.completion_mask, batch.completion_mask[:, :1].roll(1, dims=0)], 1)
            s = score_candidates(model, batch.with_candidates(ids, mask, batch.labels), share_prompt=share)
            return Scores(logps=s.logps[:, :k], token_logps=s.token_logps[:, :k], token_mask=s.token_mask[:, :k],
                          lengths=s.lengths[:, :k], extras={"kl_logps": s.logps[:, k].detach()})
        return score_candidates(model, batch, share_prompt=share)

    # -- model lifecycle ----------------------------------------------------------------------------------------
    def save(self, model: nn.Module, path: Path, state_dict: dict | None = None, method=None) -> None:
        """:func:`~mmalign.models.vlm.save_vlm`: the model and its processor, readable by ``load_vlm``. After a
        ``stage.merge_lora`` the LoRA model is saved with every adapter folded in (full weights): the last adapter
        alone, over the base on disk, would lose the merged stages."""
        save_vlm(model, self.inputs, Path(path), state_dict=state_dict, merged=self.merged)

    def merge_lora(self) -> None:
        if not hasattr(self.model, "merge_and_unload"):
            raise ValueError("stage.merge_lora needs lora.enabled=true")
        self.model = self.model.merge_and_unload()
        self.merged = True
        self.model = self._prepare(self.model)


def _pixel_bounds(inputs, min_pixels: int | None, max_pixels: int | None) -> None:
    """``vlm.min_pixels`` / ``vlm.max_pixels`` on a loaded Qwen processor's image and video resize."""
    if inputs.arch not in QWEN or (min_pixels is None and max_pixels is None):
        return
    for proc in (inputs.processor.image_processor, getattr(inputs.processor, "video_processor", None)):
        if proc is None:
            continue
        size = dict(proc.size)
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        proc.size = type(proc.size)(**size) if not isinstance(proc.size, dict) else size
