"""The vision-language LM family: LLaVA (vision tower → projector → LM) and the encoder-free :class:`PatchLVLM`,
trained with any preference loss of the METHODS table on TRL-style vision rows.

- **Build**: ``model.name_or_path: tiny`` builds a random tiny LVLM of kind ``prior.lvlm`` (``llava`` | ``patch``)
  with a BPE tokenizer trained on the run's text (``model.tokenizer`` to use another); anything else is loaded
  with :func:`~mmalign.models.lvlm.load_lvlm` (a LLaVA-hf checkpoint, a saved PatchLVLM, a LoRA adapter dir).
- **Freezing**: ``prior.freeze_vision_tower`` (default true) freezes the image encoder: LLaVA's vision tower,
  PatchLVLM's patch embedding (unless the task builds the family with ``train_patch_embed=True``: PRIOR's
  encoder-free setting learns its only image pathway); LoRA (``lora.enabled``) then leaves it out of the adapter
  too, and LLaVA's ``prior.modules_to_save`` (the projector) train in full beside the adapter. With it false,
  LLaVA's unread vision layers are still frozen (they get no gradient, which DDP would reject).
- **Data**, by the format of the stage's row: preference rows (:mod:`mmalign.data.vision_rows`: ``images`` +
  prompt/chosen/rejected, or prompt/completion/label), or ``captions`` (:mod:`mmalign.data.captions`: image +
  caption, LLaVA's pre-training rows; the PRIOR row), read once per list of files; images relative to the data
  file or ``prior.image_root``; the model's own preprocessing per batch.
- **Scores**: preference rows: :func:`~mmalign.adapters.lvlm.score_candidates` (image once per example, prompt
  KV cache shared by the candidates, a frozen encoder's output shared with the reference pass); KTO's
  mismatched pairs (prompt i, completion i−1) ride on the same prompt cache as one extra candidate. Captions:
  :func:`~mmalign.adapters.lvlm.score_captions` (per-token log-probs of the caption after image and prompt).
- **Save**: :func:`~mmalign.models.lvlm.save_lvlm` (``load_lvlm`` reads it back; LoRA over a tiny in-memory base
  is saved merged).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.batches import VisionTextBatch
from ..data.captions import CaptionDataset, caption_and_prompt, read_caption_rows
from ..data.rows import DataError
from ..models.lvlm import (
    PATCH_CONFIG_FILE,
    PatchLVLM,
    build_tiny_lvlm,
    extract_language_model,
    load_lvlm,
    save_lvlm,
    unwrap_lvlm,
)
from ..types import Scores, StageData
from .family import ModelFamily
from .lvlm import score_candidates, score_captions

__all__ = ["CAPTIONS", "LVLMFamily", "apply_lvlm_lora", "build_lvlm_tokenizer", "freeze_image_encoder",
           "train_sources"]

CAPTIONS = "captions"  # the data format of image-caption rows (a row reads it when it is the row's first format)

_TEXT_KEYS = ("prompt", "chosen", "rejected", "completion", "completions")


def _texts(value) -> list[str]:
    """Plain strings of a row's text field (strings, conversations, content parts), image markers removed."""
    if isinstance(value, str):
        return [value.replace("<image>", " ")]
    out = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, dict) and "content" in item:
            out += _texts(item["content"])
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            out.append(item["text"])
        elif isinstance(item, (str, list)):
            out += _texts(item)
    return out


def train_sources(cfg) -> list[str]:
    """``data.train`` and then every stage's own training files, each once."""
    out = list(cfg.data.train)
    for s in cfg.stages:
        out += [x for x in (s.train or []) if x not in out]
    return out


def build_lvlm_tokenizer(cfg, *, captions: bool = False):
    """``model.tokenizer`` if set, else a BPE trained on the run's prompts and completions (``captions``: on the
    prompts and captions of image-caption rows) (``model.tiny.vocab_size``, default 512); ``<image>`` is added
    either way."""
    from ..data.rows import load_rows
    from ..models.lvlm import add_image_token
    from ..models.text import load_tokenizer
    from ..models.tokenizer import train_bpe_tokenizer

    if cfg.model.tokenizer:
        tok = load_tokenizer(cfg.model.tokenizer)
    else:
        if captions:
            texts = []
            for _, _, row in load_rows(train_sources(cfg) + list(cfg.data.eval), skip_bad_rows=True):
                caption, prompt, _ = caption_and_prompt(row, cfg.prior.caption_field, cfg.prior.prompt)
                texts += [t for t in (prompt, caption) if isinstance(t, str) and t]
        else:
            sources = [*cfg.data.train, *cfg.data.eval, *(s for st in cfg.stages for s in (st.train or []))]
            texts = [t for _, _, row in load_rows(sources, skip_bad_rows=True) for k in _TEXT_KEYS
                     for t in _texts(row.get(k)) if t.strip()]
        tok = train_bpe_tokenizer(texts, vocab_size=int(cfg.model.tiny.get("vocab_size", 512)))
        tok.padding_side = "left"
    add_image_token(tok)
    return tok


def freeze_image_encoder(model: nn.Module, freeze: bool) -> None:
    """``freeze``: LLaVA's vision tower / PatchLVLM's patch embedding get no gradient. Otherwise only the vision
    layers LLaVA never reads (after ``vision_feature_layer``, and ``post_layernorm``) are frozen."""
    base = unwrap_lvlm(model)
    if isinstance(base, PatchLVLM):
        base.patch_embed.requires_grad_(not freeze)
        return
    tower = base.model.vision_tower
    if freeze:
        tower.requires_grad_(False)
        return
    layer = base.config.vision_feature_layer
    read = max(layer) if isinstance(layer, list) else layer
    for name, module in tower.named_modules():
        if name.endswith("post_layernorm") or name.endswith(".head"):
            module.requires_grad_(False)
        if name.endswith("encoder.layers") and isinstance(module, nn.ModuleList):
            first_unread = read if read >= 0 else len(module) + 1 + read  # hidden_states[k] = output of layer k-1
            for m in list(module)[first_unread:]:
                m.requires_grad_(False)


def apply_lvlm_lora(model: nn.Module, lc, *, freeze_encoder: bool, modules_to_save: list[str]) -> nn.Module:
    """LoRA on the language model (PatchLVLM: on ``.lm``; the patch embedding trains in full unless frozen);
    LLaVA: on the whole model minus the vision tower when it is frozen, ``modules_to_save`` in full."""
    from peft import LoraConfig, get_peft_model

    from ..models.text import apply_lora

    if isinstance(model, PatchLVLM):
        model.lm = apply_lora(model.lm, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules)
        model.patch_embed.requires_grad_(not freeze_encoder)
        return model
    config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                        modules_to_save=list(modules_to_save) or None, task_type="CAUSAL_LM",
                        exclude_modules=r".*vision_tower.*" if freeze_encoder else None)
    return get_peft_model(model, config)


def _with_mismatched(batch: VisionTextBatch) -> VisionTextBatch:
    """Append candidate K: image + prompt i with the completion of example i−1 (KTO's reference point z0); it
    shares example i's image features and prompt cache with the real candidates."""
    ids = torch.cat([batch.completion_ids, batch.completion_ids[:, :1].roll(1, dims=0)], 1)
    mask = torch.cat([batch.completion_mask, batch.completion_mask[:, :1].roll(1, dims=0)], 1)
    return VisionTextBatch(batch.prompt_ids, batch.prompt_mask, ids, mask, batch.pixel_values, None, batch.labels,
                           batch.meta, batch.extras, batch.encoder_cache)


class LVLMFamily(ModelFamily):
    """Vision-language LMs (see the module docstring). Prebuilt parts: ``tokenizer=``, or ``model=`` with
    ``inputs=`` (its :class:`~mmalign.models.lvlm.LVLMInputs`). ``train_patch_embed``: a PatchLVLM's patch
    embedding trains even under ``prior.freeze_vision_tower`` (which then freezes LLaVA's vision tower only)."""

    name = "lvlm"
    modality = "prior"
    provides = frozenset({"logps", "lengths", "nll", "token_logps"})
    cannot = {"token_kl": "per-token KL against the reference is not implemented for LVLMs yet",
              "values": "LVLMs carry no value head (reward models train on the causal-LM family)",
              "embeddings": "an LVLM gives no paired embeddings"}

    def __init__(self, cfg, methods, *, tokenizer=None, model: nn.Module | None = None, inputs=None,
                 train_patch_embed: bool = False):
        self.cfg, self.pc = cfg, cfg.prior
        self.merged, self.train_patch_embed = False, train_patch_embed
        self.captions = any(m.data_format == CAPTIONS for m in methods)  # the tiny tokenizer learns caption text
        self._caption_rows: dict[tuple, tuple] = {}
        if model is None:
            model, inputs = self._build(tokenizer)
        elif inputs is None:
            raise ValueError("LVLMFamily(model=...) needs inputs= (the LVLMInputs of that model)")
        self.inputs, self.tokenizer = inputs, inputs.tokenizer
        with torch.random.fork_rng(devices=[]):  # LoRA weights come from the global RNG: seed them from the run
            torch.manual_seed(cfg.run.seed)
            self.model = self._prepare(model)

    @classmethod
    def check(cls, cfg, uses) -> list[str]:
        errors = []
        strategy = cfg.reference.strategy
        adapter_ref = strategy == "adapter" or (strategy == "auto" and cfg.lora.enabled)
        needs_ref = any(u.method.needs_reference for u in uses)
        mc = cfg.model
        patch = cfg.prior.lvlm == "patch" if mc.name_or_path == "tiny" else \
            (Path(mc.name_or_path).expanduser() / PATCH_CONFIG_FILE).is_file()
        if needs_ref and adapter_ref and patch and not cfg.prior.freeze_vision_tower:
            errors.append("reference.strategy=adapter with prior.freeze_vision_tower=false: a PatchLVLM's patch "
                          "embedding trains outside the LoRA adapter, so the adapter-disabled reference would drift "
                          "with it; freeze it (prior.freeze_vision_tower=true) or use reference.strategy=copy")
        return errors

    # -- model --------------------------------------------------------------------------------------------------
    def _build(self, tokenizer):
        mc = self.cfg.model
        if mc.name_or_path != "tiny":
            return load_lvlm(mc.name_or_path, dtype=mc.dtype, attn_implementation=mc.attn_implementation,
                             gradient_checkpointing=mc.gradient_checkpointing, trust_remote_code=mc.trust_remote_code)
        tokenizer = tokenizer or build_lvlm_tokenizer(self.cfg, captions=self.captions)
        model, inputs = build_tiny_lvlm(self.pc.lvlm, tokenizer, seed=self.cfg.run.seed, **mc.tiny)
        if mc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, inputs

    def _prepare(self, model: nn.Module) -> nn.Module:
        patch = isinstance(unwrap_lvlm(model), PatchLVLM)
        freeze = self.pc.freeze_vision_tower and not (patch and self.train_patch_embed)
        if patch and hasattr(unwrap_lvlm(model).lm, "peft_config"):
            unwrap_lvlm(model).patch_embed.requires_grad_(not freeze)
            return model  # a loaded adapter: already trainable
        if hasattr(model, "peft_config"):
            return model
        freeze_image_encoder(model, freeze)
        if not self.cfg.lora.enabled:
            return model
        return apply_lvlm_lora(model, self.cfg.lora, freeze_encoder=freeze,
                               modules_to_save=list(self.pc.modules_to_save))

    def save_language_model(self, path: Path) -> None:
        """The LVLM's language model as a text-only causal-LM checkpoint with the tokenizer (PRIOR's reference
        starts from it). LoRA layers are left out: the base weights, which a fresh adapter (B = 0) does not
        change."""
        lm = extract_language_model(self.model)
        state = {k.replace(".base_layer.", ".").replace(".original_module.", "."): v
                 for k, v in lm.state_dict().items() if ".lora_" not in k and ".modules_to_save." not in k}
        lm.save_pretrained(str(path), state_dict=state)
        self.tokenizer.save_pretrained(str(path))

    # -- data ---------------------------------------------------------------------------------------------------
    def dataset(self, sources, dc, fmt: str):
        """A :class:`~mmalign.data.vision_rows.VisionPreferenceDataset` of ``sources`` and its stats."""
        from ..data.vision_rows import VisionPreferenceDataset, read_vision_rows

        tok, io = self.tokenizer, self.inputs
        template = None
        if getattr(tok, "chat_template", None) is None and io.processor is not None:
            template = getattr(io.processor, "chat_template", None)
        examples, stats, fmt = read_vision_rows(
            list(sources), tok, image_token_id=io.image_token_id, num_image_tokens=io.num_image_tokens, format=fmt,
            image_root=self.pc.image_root, verify_images=self.pc.verify_images, max_length=dc.max_length,
            max_prompt_length=dc.max_prompt_length, truncation=dc.truncation, chat_template=template,
            skip_bad_rows=dc.skip_bad_rows, limit=dc.limit)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return VisionPreferenceDataset(examples, pad_token_id=pad, pixel_values=io.pixel_values, format=fmt), stats

    def caption_dataset(self, sources) -> tuple[CaptionDataset, dict]:
        """A :class:`~mmalign.data.captions.CaptionDataset` of image-caption ``sources`` and its stats; the rows
        of one list of files are read (and their images verified) once."""
        key = tuple(sources)
        if key not in self._caption_rows:
            dc, pc = self.cfg.data, self.pc
            self._caption_rows[key] = read_caption_rows(
                list(sources), self.tokenizer, image_field=pc.image_field, caption_field=pc.caption_field,
                default_prompt=pc.prompt, image_root=pc.image_root, max_length=dc.max_length, limit=dc.limit,
                skip_bad_rows=dc.skip_bad_rows, verify_images=pc.verify_images)
        examples, stats = self._caption_rows[key]
        tok, io = self.tokenizer, self.inputs
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return CaptionDataset(examples, pad_token_id=pad, image_token_id=io.image_token_id,
                              num_image_tokens=io.num_image_tokens, bos_token_id=tok.bos_token_id,
                              pixel_values=io.pixel_values), dict(stats)

    def stage_data(self, stage, method) -> StageData:
        """Train (and eval, retain) data of ``stage``. Rows of the ``captions`` format: image-caption rows
        (``data.format`` does not apply; stats: the training files'). Otherwise ``data.format: auto`` detects
        the rows' format, which must be one the loss reads (``method.formats``: SFT also takes pairs and trains
        on the chosen side)."""
        dc = self.cfg.data
        if method.data_format == CAPTIONS:
            train, stats = self.caption_dataset(stage.train or dc.train)
            eval_ds = self.caption_dataset(dc.eval)[0] if dc.eval else None
            return StageData(train=train, collate=train.collate, eval=eval_ds, stats=stats, key=train.content_key(),
                             eval_key=eval_ds.content_key() if eval_ds is not None else "")
        sources = stage.train or dc.train
        train, stats = self.dataset(sources, dc, dc.format)
        if train.format not in method.formats:
            raise DataError(f"{list(sources)}: the rows are in the {train.format!r} format, but loss "
                            f"{method.name!r} reads {list(method.formats)}; fix: give it such rows (see "
                            f"mmalign.data.vision_rows) or pick a loss for {train.format!r} rows")
        eval_ds = None
        if dc.eval:
            eval_ds, eval_stats = self.dataset(dc.eval, dc, train.format)
            stats.update({f"eval/{k}": v for k, v in eval_stats.items()})
        aux = None
        if getattr(method, "aux", "") == "retain" and self.cfg.retain is not None and self.cfg.retain.train:
            aux, retain_stats = self.dataset(self.cfg.retain.train, self.cfg.retain, "sft")
            stats.update({f"retain/{k}": v for k, v in retain_stats.items()})
        return StageData(train=train, collate=train.collate, eval=eval_ds, aux=aux, stats=stats,
                         key=train.content_key(), eval_key=eval_ds.content_key() if eval_ds is not None else "")

    # -- scores -------------------------------------------------------------------------------------------------
    def score(self, model: nn.Module, batch: VisionTextBatch, method) -> Scores:
        if method.data_format == CAPTIONS:
            return score_captions(model, batch)
        if getattr(method, "winners_only", False) and batch.num_candidates > 1:
            batch = VisionTextBatch(batch.prompt_ids, batch.prompt_mask, batch.completion_ids[:, :1],
                                    batch.completion_mask[:, :1], batch.pixel_values, None,
                                    None if batch.labels is None else batch.labels[:, :1], batch.meta, batch.extras,
                                    batch.encoder_cache)
        if getattr(method, "mismatched_kl", False) and batch.batch_size > 1:
            s = score_candidates(model, _with_mismatched(batch))
            k = batch.num_candidates
            return Scores(logps=s.logps[:, :k], token_logps=s.token_logps[:, :k], token_mask=s.token_mask[:, :k],
                          lengths=s.lengths[:, :k], extras={"kl_logps": s.logps[:, k].detach()})
        return score_candidates(model, batch)

    # -- model lifecycle ----------------------------------------------------------------------------------------
    def save(self, model: nn.Module, path: Path, state_dict: dict | None = None, method=None) -> None:
        """:func:`~mmalign.models.lvlm.save_lvlm`: the model with its tokenizer / processor, readable by
        ``load_lvlm``. ``state_dict``: the full weights of a sharded run (keys relative to ``model``)."""
        # after a stage merged LoRA into the base, the base on disk is stale: save merged weights
        save_lvlm(model, self.inputs, Path(path), state_dict=state_dict, merged=getattr(self, "merged", False))

    def merge_lora(self) -> None:
        base = unwrap_lvlm(self.model)
        if isinstance(self.model, PatchLVLM) and hasattr(self.model.lm, "merge_and_unload"):
            self.model.lm = self.model.lm.merge_and_unload()
        elif hasattr(self.model, "merge_and_unload") and not isinstance(base, PatchLVLM):
            self.model = self.model.merge_and_unload()
        else:
            raise ValueError("stage.merge_lora needs lora.enabled=true")
        self.merged = True
        self.model = self._prepare(self.model)
