"""Shared builders for the PRIOR tests: a few synthetic image-caption rows and a tiny run config."""

from __future__ import annotations

from pathlib import Path

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
        "vocab_size": 400, "image_size": 16, "patch_size": 4, "vision_hidden_size": 16, "vision_layers": 2,
        "vision_heads": 2, "vision_intermediate_size": 32}


def write_rows(dir: Path, n: int = 12, seed: int = 0) -> Path:
    """``n`` caption rows (16×16 PNG shapes) in ``dir/captions.jsonl``; prompts of two lengths for padding."""
    from mmalign.demos.prior import caption_rows, write_jsonl

    rows = caption_rows(n, seed=seed, image_dir=dir / "images")
    for i, r in enumerate(rows):
        if i % 3 == 1:
            r["prompt"] = "describe:"
    return write_jsonl(rows, dir / "captions.jsonl")


def config(tmp: Path, data: Path, *overrides: str, lvlm: str = "llava"):
    from mmalign.api import load_train_config

    return load_train_config(
        {"modality": "prior", "loss": {"name": "prior"}, "reference": {"strategy": "none"},
         "model": {"name_or_path": "tiny", "tiny": dict(TINY)},
         "data": {"train": [str(data)], "max_length": 64},
         "prior": {"lvlm": lvlm, "reference_steps": 2, "freeze_vision_tower": False},
         "optim": {"lr": 1e-2, "scheduler": "constant"},
         "run": {"output_dir": str(tmp / "run"), "max_steps": 2, "batch_size": 4, "progress": False,
                 "report_to": ["jsonl"], "resume": "never"}},
        list(overrides))


def caption_tokenizer(cfg):
    """The tokenizer a tiny PRIOR run trains on its captions (the LVLM family's, for ``captions`` rows)."""
    from mmalign.adapters.lvlm_family import build_lvlm_tokenizer

    return build_lvlm_tokenizer(cfg, captions=True)


def hf_loss(model, batch):
    """The model's own forward with labels: HF's mean cross-entropy over the caption tokens of ``batch``."""
    import torch

    comp = batch.completion_ids[:, 0]
    cmask = batch.completion_mask[:, 0]
    ids = torch.cat([batch.prompt_ids, comp], 1)
    mask = torch.cat([batch.prompt_mask, cmask], 1)
    labels = torch.cat([torch.full_like(batch.prompt_ids, -100), comp.masked_fill(cmask == 0, -100)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, pixel_values=batch.extras["pixel_values"], attention_mask=mask, position_ids=pos,
                 labels=labels).loss
