"""``mmalign pairs``: automatic preference pairs from a stronger and a weaker model (Xu et al. 2023,
arXiv 2310.02263), and ``mmalign temple-pairs`` (TEMPLE caption-mode pairs): plain functions that :mod:`mmalign.cli`
registers from the ``text`` row of :data:`mmalign.registry.MODALITIES`.

    mmalign pairs --strong outputs/dpo/final --weak outputs/sft/final --prompts prompts.txt --out pairs.jsonl
    mmalign pairs --strong strong.jsonl --weak weak.jsonl --prompts prompts.txt --reward warm_colors \\
        --out pairs.jsonl --curriculum 2       # also writes the easy→hard stage files and stages.yaml
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts {path}: no such file; give a text file with one prompt per line, or a .jsonl "
                         "with a 'prompt' field per row")
    if p.suffix in (".jsonl", ".json", ".parquet"):
        from ..data.rows import load_rows

        out = []
        for file, n, row in load_rows(p):
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"{file} row {n}: field 'prompt' is {row.get('prompt')!r}; it must be a string")
            out.append(row["prompt"])
        return out
    return [line for line in p.read_text().splitlines() if line.strip()]


def pairs(
    strong: str = typer.Option(..., help="stronger model: checkpoint directory, or a responses .jsonl "
                                         "({prompt, completion} per row, same prompts)"),
    weak: str = typer.Option(..., help="weaker model: checkpoint directory or responses .jsonl"),
    prompts: str = typer.Option(..., help="prompts: text file (one per line) or .jsonl with 'prompt'"),
    out: str = typer.Option(..., help="output pairs .jsonl (TRL prompt/chosen/rejected + difficulty)"),
    reward: str = typer.Option(None, help="optional: difficulty = -reward margin; a name (warm_colors), "
                                          "module:function, or a reward-model directory"),
    on_disagreement: str = typer.Option("keep", help="with --reward, pairs the reward orders the other way: "
                                                     "keep (the paper), drop or flip"),
    curriculum: int = typer.Option(0, help="also split into N easy→hard stage files beside --out (0: no)"),
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    chat: bool = typer.Option(False, help="wrap prompts in the tokenizer's chat template"),
    chat_template: str = typer.Option(None, help="with --chat: a Jinja chat template (text or file) replacing "
                                                 "the models' own"),
) -> None:
    """Pair each prompt's strong and weak responses (strong = chosen), with a difficulty per pair."""
    from ..data.pairs import curriculum_stages, write_jsonl
    from ..data.rows import DataError
    from ..methods.auto_pairs import auto_pairs

    try:
        prompt_list = _read_prompts(prompts)
        rows, stats, _ = auto_pairs({"strong": strong, "weak": weak}, {"strong": 1, "weak": 0}, prompt_list,
                                    reward=reward, on_disagreement=on_disagreement, seed=seed,
                                    max_new_tokens=max_new_tokens, temperature=temperature, chat=chat,
                                    chat_template=chat_template)
        if not rows:
            raise ValueError(f"no pairs: every one of {len(prompt_list)} prompts gave a tie ({stats}); sample with "
                             "a higher temperature or use models that differ more")
        path = write_jsonl(rows, out)
        result: dict = {"out": str(path), **stats}
        if curriculum:
            import yaml

            stages = curriculum_stages(path, curriculum, path.parent / f"{path.stem}_curriculum")
            stages_file = path.parent / f"{path.stem}_stages.yaml"
            stages_file.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
            result["stages_file"] = str(stages_file)
    except (ValueError, DataError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result, indent=1))


def temple_pairs(
    model: str = typer.Option(..., help="text model writing the video captions: a checkpoint directory"),
    videos: str = typer.Option(..., help=".jsonl with {video, clip_captions: [str, ...]} per row (clips in order)"),
    out: str = typer.Option(..., help="output directory: responses.jsonl, pairs.jsonl, temple_r<m>.jsonl, "
                                      "stages.yaml"),
    kinds: str = typer.Option("drop,shuffle,reverse", help="perturbations, comma-separated"),
    magnitudes: str = typer.Option("16,8,4,2", help="magnitudes, comma-separated; the stage order (easy -> hard)"),
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    seed: int = 0,
    chat: bool = typer.Option(False, help="wrap prompts in the tokenizer's chat template"),
    check_videos: bool = typer.Option(True, help="require every video file to exist"),
) -> None:
    """TEMPLE (2503.16929) caption-mode pairs: responses from clean vs perturbed clip-caption lists, filtered as
    the released code does, split into easy -> hard magnitude stages."""
    import yaml

    from ..data.pairs import write_jsonl
    from ..data.rows import DataError, load_rows
    from ..data.temple import build_temple_pairs, magnitude_stages
    from ..methods.temple_gen import generate_temple_responses
    from ..models.text import load_causal_lm, load_tokenizer

    try:
        rows = [row for _, _, row in load_rows(videos)]
        mags = [int(m) for m in magnitudes.split(",") if m.strip()]
        responses = generate_temple_responses(
            load_causal_lm(model), load_tokenizer(model), rows, kinds=[k.strip() for k in kinds.split(",")],
            magnitudes=mags, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, chat=chat)
        out_dir = Path(out)
        write_jsonl([{"video": r.video, "video_id": r.video_id, "chosen": r.chosen,
                      "rejected": {f"{k}_{m}": t for (k, m), t in r.rejected.items()}} for r in responses],
                    out_dir / "responses.jsonl")
        pair_rows, stats = build_temple_pairs(responses, seed=seed, check_videos=check_videos,
                                              base_dir=Path(videos).parent)
        pairs_file = write_jsonl(pair_rows, out_dir / "pairs.jsonl")
        stages = magnitude_stages(pairs_file, out_dir, mags)
        (out_dir / "stages.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
        result = {"out": str(out_dir), "pairs_file": str(pairs_file), "stages_file": str(out_dir / "stages.yaml"),
                  **stats}
    except (ValueError, DataError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result, indent=1))
