"""After training: a model card in ``final/README.md``, and ``run.push_to_hub`` (usability issue, item 5).

The card says what produced the weights — modality, base model, method (loss and options per stage), data,
the training settings that change the result, the final and evaluation metrics — and how to load the folder,
with front matter the hub reads (``library_name``, ``tags``, ``base_model``). The push uploads ``final/`` as it is
(adapter or full weights, tokenizer, card) with ``huggingface_hub``; the token comes from the environment
(``HF_TOKEN``) or the local login. A failed push never touches the saved run: the error names the folder and the
command that uploads it later.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..config import ConfigError, to_dict
from ..schema import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["model_card", "publish"]

_LOADERS = {
    "text": "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(PATH)  # a LoRA folder: peft.AutoPeftModelForCausalLM\n"
            "tokenizer = AutoTokenizer.from_pretrained(PATH)",
    "diffusion": "from mmalign.models.diffusion import load_diffusion_components\n"
                 "parts = load_diffusion_components(PATH)  # a LoRA folder loads with diffusers' load_lora_weights",
    "clip": "from mmalign.models.clip import load_clip\nmodel = load_clip(PATH)",
    "prior": "from mmalign.models.lvlm import load_lvlm\nmodel = load_lvlm(PATH)",
}


def _stages(cfg: TrainConfig) -> list[dict]:
    if not cfg.stages:
        return [{"name": "main", "loss": cfg.loss.name, "kwargs": dict(cfg.loss.kwargs)}]
    out = []
    for i, s in enumerate(cfg.stages):
        loss = s.loss or {}
        out.append({"name": s.name if s.name != "main" else f"stage{i}", "loss": loss.get("name", cfg.loss.name),
                    "kwargs": loss.get("kwargs", dict(cfg.loss.kwargs))})
    return out


def model_card(cfg: TrainConfig, summary: dict) -> str:
    """The markdown model card of a finished run (``summary``: what :func:`mmalign.train.loop.fit` returned)."""
    base = cfg.model.name_or_path
    methods = sorted({s["loss"] for s in _stages(cfg)})
    front = ["---", "library_name: mmalign", "tags:", "- mmalign", *(f"- {m}" for m in methods)]
    if base not in ("tiny", "tiny-hf"):
        front.append(f"base_model: {base}")
    front.append("---")
    lines = [*front, "", f"# {Path(cfg.run.output_dir).name}", "",
             f"Trained with [mmalign](https://github.com/) (`modality: {cfg.modality}`) from "
             f"`{base}`{' (random tiny model)' if base.startswith('tiny') else ''}"
             f"{', LoRA r ' + str(cfg.lora.r) if cfg.lora.enabled else ''}.", "", "## Method", ""]
    for s in _stages(cfg):
        opts = ", ".join(f"{k}={v}" for k, v in s["kwargs"].items()) or "defaults"
        lines.append(f"- stage `{s['name']}`: loss `{s['loss']}` ({opts})")
    lines += ["", "## Data", "", f"- train: {', '.join(map(str, cfg.data.train)) or '(per stage)'}",
              f"- eval: {', '.join(map(str, cfg.data.eval)) or '-'}", "", "## Training", "",
              f"- steps: {summary.get('global_step')}, batch size {cfg.run.batch_size} × accumulation "
              f"{cfg.run.grad_accum}, lr {cfg.optim.lr}, seed {cfg.run.seed}, precision {cfg.run.mixed_precision}",
              "", "## Metrics (last logged values)", "", "| stage | metric | value |", "|---|---|---|"]
    for st in summary.get("stages", []):
        for part in ("final", "eval"):
            for k, v in (st.get(part) or {}).items():
                if isinstance(v, (int, float)):
                    lines.append(f"| {st.get('name')} | {k} | {v:.4g} |")
    lines += ["", "## Loading", "", "```python", "PATH = \"<this folder or repo id>\"",
              _LOADERS.get(cfg.modality, "# see the mmalign README"), "```", "",
              "<details><summary>resolved config</summary>", "", "```json",
              json.dumps(to_dict(cfg), indent=1, default=str), "```", "", "</details>", ""]
    return "\n".join(lines)


def publish(cfg: TrainConfig, summary: dict) -> dict:
    """Write the model card into ``final/`` (main process) and push it when ``run.push_to_hub`` is set; returns
    ``summary`` with ``model_card`` (and ``pushed_to``)."""
    final = summary.get("final_model")
    if not final or not Path(final).is_dir() or int(os.environ.get("RANK", "0")) != 0:
        return summary
    card = Path(final) / "README.md"
    card.write_text(model_card(cfg, summary), encoding="utf-8")
    summary["model_card"] = str(card)
    if cfg.run.push_to_hub:
        summary["pushed_to"] = push_folder(Path(final), cfg.run.push_to_hub, private=cfg.run.hub_private)
    return summary


def push_folder(folder: Path, repo_id: str, *, private: bool) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created if missing); the repo's URL."""
    later = (f"the trained model is saved in {folder}; fix: upload it later with `hf upload {repo_id} {folder}` "
             "(or huggingface_hub.HfApi().upload_folder) where the hub is reachable and you are logged in")
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=os.environ.get("HF_TOKEN"))
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="mmalign: upload final model")
    except Exception as err:  # offline mode, network, auth (401/403), a repo of another type
        raise ConfigError(f"run.push_to_hub={repo_id!r}: the upload failed ({type(err).__name__}: {err}); {later}") \
            from None
    log.info("pushed %s to %s", folder, url)
    return str(url)
