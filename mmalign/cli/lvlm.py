"""``mmalign sample prior``: answers of a trained PRIOR-family LVLM (LLaVA-hf or the encoder-free PatchLVLM;
arXiv 2505.08971) for images, beside a reference's.

    mmalign sample prior --model outputs/prior/llava_prior/final --reference outputs/prior/llava_ntp/final \\
        --image assets/lvlm/images/red_0.png --prompt "<image>\\nWhat colour is this picture?" --out prior_samples/
    mmalign sample prior --model DIR --images-file assets/lvlm/prefs.jsonl --temperature 0.7 --seed 1

Writes ``samples.md`` (the grid, then a table: image, prompt, one column per model), ``samples.json`` and
``grid.png`` (each image with both answers under it) under ``--out``, and prints the answers. Images come from
``--image`` (repeatable, each asked ``--prompt``) and ``--images-file``: a text file with one image path per line,
or TRL vision rows (``.jsonl`` / ``.json``: ``images`` + ``prompt``, candidates unused; a row without a string
prompt is asked ``--prompt``). Relative paths in a file start from the file's folder. A plain function;
:mod:`mmalign.cli` registers it from the ``prior`` row of :data:`mmalign.registry.MODALITIES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer import Option


def _rows_file(path: Path, prompt: str) -> list[tuple[str, str, str]]:
    """``(image path, prompt, origin)`` of each row of a TRL vision rows file."""
    from ..data.captions import _resolve_image
    from ..data.rows import DataError, load_rows
    from ..data.vision_rows import IMAGE_KEYS, _flatten

    out = []
    for file, row_no, row in load_rows([path]):
        key = next((k for k in IMAGE_KEYS if row.get(k) is not None), None)
        value = row.get(key) if key else None
        value = value[0] if key == "images" and isinstance(value, list) and len(value) == 1 else value
        image = _resolve_image(value, file, None, False) if value is not None else ("missing_field", "is missing",
                                                                                       "add 'images': [path]")
        if isinstance(image, tuple) or not isinstance(image, Path):
            why, fix = (image[1], image[2]) if isinstance(image, tuple) else ("is not a path", "give a file path")
            raise DataError(f"{file}:{row_no}: field '{key or 'images'}' ({value!r}) {why}; fix: {fix}")
        text = row.get("prompt")
        if isinstance(text, list):  # a conversation: its messages' text, image parts as the marker
            text = " ".join(m.get("content", "") for m in _flatten(text, "prompt")[0] if isinstance(m, dict))
        out.append((str(image), text if isinstance(text, str) and text.strip() else prompt, f"{file}:{row_no}"))
    return out


def _list_file(path: Path, prompt: str) -> list[tuple[str, str, str]]:
    """``(image path, prompt, origin)`` for each non-empty line of a text file of image paths."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            p = Path(line.strip()).expanduser()
            out.append((str(p if p.is_absolute() else path.parent / p), prompt, f"{path}:{i}"))
    return out


def _open(path: str, origin: str):
    """The image as RGB; a missing or undecodable file raises DataError naming where it came from."""
    from ..data.rows import DataError
    from ..data.vision_rows import open_image

    if not Path(path).is_file():
        raise DataError(f"{origin}: image {path!r} does not exist; fix: give the path of an image file")
    return open_image(Path(path), (origin, 0))


def sample_prior(
    model: Annotated[str, Option(help="LVLM checkpoint directory (e.g. <output_dir>/final of a prior run)")],
    reference: Annotated[str | None, Option(help="second checkpoint answered side by side (e.g. the base)")] = None,
    image: Annotated[list[str] | None, Option(help="image file (repeatable), asked --prompt")] = None,
    images_file: Annotated[str | None, Option(help="text file of image paths (one a line) or vision rows "
                                                   "(.jsonl / .json: images + prompt)")] = None,
    prompt: Annotated[str, Option(help="question for --image (and rows without a prompt); '<image>' marks where "
                                       "the image goes, else it follows BOS")] = "<image>\nDescribe this picture.",
    max_new_tokens: Annotated[int, Option(help="tokens per answer")] = 32,
    temperature: Annotated[float, Option(help="0: greedy; > 0: sampling, example i seeded seed + i")] = 0.0,
    seed: Annotated[int, Option(help="seed of the first example (example i uses seed + i)")] = 0,
    out: Annotated[str, Option(help="output directory")] = "prior_samples",
) -> None:
    """Answer each image with MODEL (and REFERENCE): markdown + JSON + a PNG grid with the answers under the images."""
    from ..data.rows import DataError
    from ..errors import ConfigError
    from ..models.lvlm import load_lvlm
    from ..sample.lvlm import generate_lvlm, write_report

    if not (image or images_file):
        typer.echo("error: give --image or --images-file", err=True)
        raise typer.Exit(2)
    if max_new_tokens < 1 or temperature < 0:
        typer.echo(f"error: --max-new-tokens={max_new_tokens} must be >= 1 and --temperature={temperature} >= 0",
                   err=True)
        raise typer.Exit(2)
    try:
        items = [(p, prompt, f"--image[{i}]") for i, p in enumerate(image or [])]
        if images_file:
            path = Path(images_file).expanduser()
            if not path.is_file():
                raise DataError(f"--images-file {images_file!r} does not exist; fix: give a text file of image "
                                "paths or a .jsonl / .json of vision rows")
            items += (_rows_file if path.suffix in (".jsonl", ".json") else _list_file)(path, prompt)
        if not items:
            raise DataError(f"--images-file {images_file!r} names no images; fix: one image path per line")
        pictures = [_open(p, origin) for p, _, origin in items]
        prompts = [q for _, q, _ in items]
        columns = {}
        for name, where in (("model", model), ("reference", reference)):
            if where is None:
                continue
            net, inputs = load_lvlm(where)
            columns[name] = generate_lvlm(net, inputs, pictures, prompts, max_new_tokens=max_new_tokens,
                                          temperature=temperature, seed=seed).texts
            del net
    except (ConfigError, DataError) as err:  # a bad checkpoint (ModelLoadError), row or image: one line, exit 2
        lines = [e for e in getattr(err, "errors", None) or [str(err)]]
        typer.echo("error: " + "; ".join(" ".join(line.split()) for line in lines), err=True)
        raise typer.Exit(2) from None
    except ValueError as err:  # two <image> markers in a prompt
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    paths = write_report(out, [{"image": p, "prompt": q} for p, q, _ in items], columns, pictures)
    for i, (p, q, _) in enumerate(items):
        typer.echo(f"> [{i}] {p} {q!r}")
        for name, answers in columns.items():  # repr: a newline inside an answer must not break the columns
            typer.echo(f"  [{name}] {answers[i]!r}")
    typer.echo(f"wrote {paths['markdown']}, {paths['json']} and {paths['grid']}")
