"""``mmalign sample text``: side-by-side samples from two saved checkpoints, through the CLI.

The checkpoints are tiny random Llamas saved with ``save_pretrained`` (plus their tokenizer), which the
command loads back the way it loads a trained ``outputs/<run>/final``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmalign.cli import app
from mmalign.data.synthetic import addition_rows, corpus

PROMPTS = ["add: 1 2 =", "add: 7 5 ="]
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    from mmalign.models.text import build_tiny_causal_lm
    from mmalign.models.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(corpus(addition_rows(64, seed=0)), vocab_size=300)
    dirs = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"model{seed}")
        build_tiny_causal_lm(len(tok), seed=seed, **TINY).save_pretrained(str(path))
        tok.save_pretrained(str(path))
        dirs.append(path)
    return dirs[0], dirs[1]


def _sample(model: Path, reference: Path | None, out: Path | None, *extra: str):
    args = ["sample", "text", "--model", str(model), "--max-new-tokens", "6"]
    if reference is not None:
        args += ["--reference", str(reference)]
    for p in PROMPTS:
        args += ["--prompt", p]
    if out is not None:
        args += ["--out", str(out)]
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_side_by_side_columns_and_jsonl(checkpoints, tmp_path):
    model, reference = checkpoints
    result = _sample(model, reference, tmp_path / "s.jsonl", "--seed", "3")
    rows = _rows(tmp_path / "s.jsonl")
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(set(r) == {"prompt", "model", "reference"} and isinstance(r["model"], str) for r in rows)
    assert any(r["model"] != r["reference"] for r in rows)  # two different random models
    # stdout (transformers' loading bars go to stderr): per prompt, the prompt then one line per column
    expected = "".join(f"> {r['prompt']!r}\n  [model] {r['model']!r}\n  [reference] {r['reference']!r}\n" for r in rows)
    assert result.stdout == expected


def test_same_seed_same_samples(checkpoints, tmp_path):
    model, reference = checkpoints
    _sample(model, reference, tmp_path / "a.jsonl", "--seed", "5")
    _sample(model, reference, tmp_path / "b.jsonl", "--seed", "5")
    _sample(model, reference, tmp_path / "c.jsonl", "--seed", "6")
    a, b, c = (_rows(tmp_path / f"{n}.jsonl") for n in "abc")
    assert a == b
    assert a != c


def test_model_only_and_prompts_file(checkpoints, tmp_path):
    model, _ = checkpoints
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("add: 2 2 =\n\nadd: 3 3 =\n")
    result = CliRunner().invoke(app, ["sample", "text", "--model", str(model), "--prompts-file", str(prompts),
                                      "--max-new-tokens", "4", "--temperature", "0", "--out",
                                      str(tmp_path / "g.jsonl")])
    assert result.exit_code == 0, result.output
    assert "[model]" in result.stdout and "[reference]" not in result.stdout
    rows = _rows(tmp_path / "g.jsonl")
    assert [r["prompt"] for r in rows] == ["add: 2 2 =", "add: 3 3 ="] and set(rows[0]) == {"prompt", "model"}


def test_no_prompt_is_an_error(checkpoints):
    result = CliRunner().invoke(app, ["sample", "text", "--model", str(checkpoints[0])])
    assert result.exit_code == 2 and "give --prompt or --prompts-file" in result.stderr


def test_prompts_are_encoded_like_training_prompts(checkpoints):
    """Generation conditions on the same prompt ids the text encoder trains on (BOS included)."""
    from mmalign.data.rows import PairRow
    from mmalign.data.text import TextEncoder
    from mmalign.models.text import load_causal_lm, load_tokenizer
    from mmalign.sample.text import generate

    tok = load_tokenizer(checkpoints[0])
    samples = generate(load_causal_lm(checkpoints[0]), tok, PROMPTS, max_new_tokens=2, seed=0)
    encoder = TextEncoder(tok, max_length=64)
    for prompt, ids in zip(PROMPTS, samples.prompt_ids, strict=True):
        assert ids == encoder.encode(PairRow(prompt, " 3", " 4")).prompt_ids
        assert ids[0] == tok.bos_token_id
