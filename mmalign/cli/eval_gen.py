"""``mmalign eval text`` and ``mmalign eval diffusion``: a trained model against its reference on a prompt set, by
sampling (plain functions; :mod:`mmalign.cli` registers them from the ``text`` and ``diffusion`` rows of
:data:`mmalign.registry.MODALITIES`).

    mmalign eval text --model outputs/dpo/final --reference outputs/sft/final --prompts prompts.txt \\
        --reward warm_colors --seeds 0 --seeds 1 --seeds 2 --out outputs/dpo/eval
    mmalign eval diffusion --model outputs/dpo/final --prompts captions.txt --reward shapes \\
        --seeds 0 --seeds 1 --seeds 2 --seeds 3 --out outputs/dpo/eval

Text: mean reward, win-rate against the reference's samples (same prompt and seed), KL(policy ‖ reference) per
sequence (:mod:`mmalign.eval.text`); diffusion: mean image reward of model and base, win-rate over (prompt,
seed) pairs, and a PNG grid with prompt labels (:mod:`mmalign.eval.diffusion`). Every number is given per seed
and as mean ± spread over seeds; ``--out`` gets them as JSON with the samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from typer import Option


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _fmt(result: dict, key: str) -> str:
    if result.get(key) is None:
        return "-"
    return f"{result[key]:.4f} ± {result.get(f'{key}_std', 0.0):.4f}"


def _print(result: dict, rows: list[tuple[str, str]], seeds: list[int]) -> None:
    typer.echo(f"over {len(seeds)} seed(s) {seeds} (mean ± spread of the per-seed means):")
    for label, key in rows:
        if result.get(key) is not None:
            typer.echo(f"  {label:<34}{_fmt(result, key)}")


def _text_reward(spec: str | None):
    from ..methods.rewards import ModelReward, load_reward_fn

    if spec is None:
        return None
    from ..config import ConfigError
    from ..train.evaluate import reward_message

    try:
        return ModelReward(spec) if Path(spec).expanduser().is_dir() else load_reward_fn(spec)
    except ConfigError as err:
        raise ConfigError([f"--reward {spec}: {reward_message(e)}" for e in err.errors]) from None


def eval_text(
    model: Annotated[str, Option(help="checkpoint directory (e.g. outputs/dpo/final; LoRA adapters too)")],
    prompts: Annotated[str, Option(help="prompt file: .txt one per line, or .jsonl with a 'prompt' per row")],
    reference: Annotated[str | None, Option(help="reference checkpoint (e.g. the SFT model): win-rate and KL "
                                                 "against it")] = None,
    reward: Annotated[str | None, Option(help="warm_colors | addition | 'package.module:function' | a reward-model "
                                              "directory (an rm run's final/)")] = None,
    seeds: Annotated[list[int] | None, Option(help="sampling seed (repeatable; default 0)")] = None,
    samples: Annotated[int, Option(help="completions per prompt and seed")] = 1,
    max_new_tokens: int = 64,
    temperature: Annotated[float, Option(help="1.0: KL is the unbiased estimate; other values: a log-ratio")] = 1.0,
    chat: Annotated[bool, Option(help="wrap prompts in the tokenizer's chat template")] = False,
    batch_size: int = 32,
    device: Annotated[str | None, Option(help="cpu, cuda, ... (default: cuda when available)")] = None,
    out: Annotated[str | None, Option(help="write eval_text.json and samples.jsonl to this directory")] = None,
) -> None:
    """Sample MODEL (and REFERENCE) on PROMPTS with the same seeds: mean reward, win-rate, KL per sequence."""
    import torch

    from ..config import ConfigError
    from ..data.rows import DataError
    from ..eval.paired import read_prompts
    from ..eval.text import compare_text
    from ..models.text import load_causal_lm, load_tokenizer

    seeds = list(seeds or [0])
    if samples < 1:
        _fail(f"--samples {samples} must be >= 1")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        prompt_list = read_prompts(prompts, where="--prompts")
        reward_fn = _text_reward(reward)
        policy, tok = load_causal_lm(model).to(dev).eval(), load_tokenizer(model)
        ref = ref_tok = None
        if reference:
            ref, ref_tok = load_causal_lm(reference).to(dev).eval(), load_tokenizer(reference)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    if reward_fn is None and ref is None:
        _fail("nothing to measure: give --reward (mean reward), --reference (KL), or both (win-rate too)")
    result = compare_text(policy, tok, prompt_list, reference=ref, reference_tokenizer=ref_tok, reward_fn=reward_fn,
                          seeds=seeds, samples_per_prompt=samples, max_new_tokens=max_new_tokens,
                          temperature=temperature, chat=chat, batch_size=batch_size)
    _print(result, [("mean reward (model)", "reward"), ("mean reward (reference)", "reward_reference"),
                    ("win-rate vs reference", "win_rate"), ("KL(model ‖ reference), nats/seq", "kl")], seeds)
    if reference and result.get("kl") is None:
        typer.echo("  (no KL: the two tokenizers differ, so the reference cannot score the model's tokens)")
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"model": model, "reference": reference, "prompts": prompts, "reward": reward, "seeds": seeds,
                "samples_per_prompt": samples, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "chat": chat}
        summary = {k: v for k, v in result.items() if k != "samples"}
        (folder / "eval_text.json").write_text(json.dumps({**meta, **summary}, indent=1))
        (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result["samples"]))
        typer.echo(f"wrote {folder / 'eval_text.json'} and {folder / 'samples.jsonl'} ({result['n_samples']} "
                   "samples)")


def eval_diffusion(
    model: Annotated[str, Option(help="trained run directory (<output_dir>/final, LoRA or full) or a pipeline")],
    prompts: Annotated[str, Option(help="prompt file: .txt one per line, or .jsonl with 'prompt' / 'caption'")],
    base: Annotated[str | None, Option(help="base pipeline = the reference (default: the one the run recorded)")]
    = None,
    reward: Annotated[str | None, Option(help="shapes | 'package.module:function' of (images, prompts)")] = None,
    seeds: Annotated[list[int] | None, Option(help="one column per seed (repeatable; default 0 1 2 3)")] = None,
    guidance_scale: Annotated[float, Option(help="CFG scale w")] = 5.0,
    steps: Annotated[int, Option(help="sampling steps")] = 25,
    sampler: Annotated[str, Option(help="ddim | euler | dpm | ddpm (flow-matching models keep theirs)")] = "ddim",
    dtype: Annotated[str, Option(help="weights dtype")] = "float32",
    batch_size: int = 32,
    device: Annotated[str | None, Option(help="cpu / cuda (default: cuda when available)")] = None,
    out: Annotated[str, Option(help="directory for grid.png and eval_diffusion.json")] = "eval_diffusion",
) -> None:
    """Sample MODEL and its BASE on PROMPTS × SEEDS (same noise): mean reward, win-rate, labelled grid."""
    import torch

    from ..config import ConfigError
    from ..data.rows import DataError
    from ..eval.diffusion import compare_diffusion, load_image_reward, sample_images, save_comparison_grid
    from ..eval.paired import read_prompts
    from ..sample import diffusion as SD

    seeds = list(seeds or [0, 1, 2, 3])
    try:
        prompt_list = read_prompts(prompts, where="--prompts")
        reward_fn = load_image_reward(reward) if reward else None
        comps = SD.load_components(base or model, dtype=dtype)
        base_dir = SD.base_pipeline_dir(base or model)
        same = Path(model).resolve() == base_dir.resolve()
        positive = comps.denoiser if same else SD.load_denoiser(model, comps)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    comps.to(dev)
    positive.to(dev)
    opts = dict(guidance_scale=guidance_scale, steps=steps, batch_size=batch_size)
    images = {"base": sample_images(SD.build_pipeline(comps, sampler=sampler), prompt_list, seeds, **opts),
              "model": sample_images(SD.build_pipeline(comps, positive, sampler=sampler), prompt_list, seeds, **opts)}
    try:
        result = compare_diffusion(images["model"], prompt_list, seeds, reference_images=images["base"],
                                   reward_fn=reward_fn)
    except ValueError as err:  # a shapes reward on non-shapes captions, say
        _fail(f"--reward {reward}: {err}")
    folder = Path(out)
    rewards = result.get("rewards")
    rewards = {"base": rewards["reference"], "model": rewards["model"]} if rewards else None
    grid = save_comparison_grid(images, prompt_list, seeds, folder / "grid.png", rewards=rewards,
                                title=f"{model} vs {base_dir} (w={guidance_scale:g}, {steps} {sampler} steps)")
    _print(result, [("mean reward (model)", "reward"), ("mean reward (base)", "reward_reference"),
                    ("win-rate vs base", "win_rate")], seeds)
    meta = {"model": model, "base": str(base_dir), "prompts": prompt_list, "reward": reward, "seeds": seeds,
            "guidance_scale": guidance_scale, "steps": steps, "sampler": sampler, "grid": grid.name}
    (folder / "eval_diffusion.json").write_text(json.dumps({**meta, **result}, indent=1))
    typer.echo(f"wrote {grid} and {folder / 'eval_diffusion.json'} ({result['n_images']} images per model)")
