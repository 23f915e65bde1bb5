"""``data.chat_template`` / ``--chat-template`` (usability issue, item 6): a template string or file replaces the
tokenizer's own for training, sampling and pair making, and is saved with the model; bad values are config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmalign.api import load_train_config, train
from mmalign.config import ConfigError
from mmalign.data.synthetic import addition_rows, write_jsonl
from mmalign.models.chat import read_chat_template, set_chat_template

ROOT = Path(__file__).resolve().parents[2]
# Every user turn rendered as "<<Q>> text <<A>>": a marker no tokenizer's default template writes.
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<<Q>> {{ m['content'] }} <<A>>{% else %}"
            "{{ m['content'] }}{% endif %}{% endfor %}")


def _tok():
    from mmalign.models.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(["<<Q>> add: 1 2 <<A>> 3", "hello world"], vocab_size=300)


def test_template_text_or_file(tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE)
    assert read_chat_template(TEMPLATE) == TEMPLATE
    assert read_chat_template(str(path)) == TEMPLATE
    assert read_chat_template(None) is None
    tok = set_chat_template(_tok(), str(path))
    text = tok.apply_chat_template([{"role": "user", "content": "add: 1 2"}], tokenize=False)
    assert text == "<<Q>> add: 1 2 <<A>>"


@pytest.mark.parametrize(("value", "match"), [
    ("no/such/file.jinja", "neither a Jinja template"),
    ("{% for m in messages %}{{ m.content }", "does not parse"),
])
def test_bad_template_is_a_config_error(value, match):
    with pytest.raises(ConfigError, match=match):
        read_chat_template(value)


def test_missing_template_file_refused_at_config_load(tmp_path):
    with pytest.raises(ConfigError, match=r"data.chat_template='nope.jinja' is neither"):
        load_train_config(ROOT / "configs/text/tiny_dpo.yaml", ["data.chat_template=nope.jinja"])


def test_training_uses_and_saves_the_template(tmp_path):
    data = tmp_path / "pairs_chat.jsonl"
    write_jsonl(addition_rows(16, format="pairs", conversational=True, seed=3), data)
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    out = tmp_path / "out"
    train(ROOT / "configs/text/tiny_dpo.yaml",
          [f"data.train=[{data}]", "data.eval=[]", "run.max_steps=1", "run.batch_size=4", "run.progress=false",
           f"run.output_dir={out}", f"data.chat_template={tmp_path / 'chat.jinja'}"])
    from mmalign.models.text import load_tokenizer

    saved = load_tokenizer(out / "final")
    assert saved.chat_template == TEMPLATE
    # the encoded prompts of the run carry the template's marker
    from mmalign.data.text import build_text_dataset

    ds, _ = build_text_dataset(data, saved, format="pairs", max_length=128)
    assert "<<Q>>" in saved.decode(ds.examples[0].prompt_ids)


def test_sample_text_chat_template_option(tmp_path, monkeypatch):
    from mmalign.cli import app
    from mmalign.models.text import build_tiny_causal_lm, save_causal_lm
    from mmalign.sample import text as sample_text

    tok = _tok()
    model_dir = save_causal_lm(build_tiny_causal_lm(len(tok), seed=0, hidden_size=16, num_layers=1, num_heads=2,
                                                    num_kv_heads=1, intermediate_size=32), tok, tmp_path / "m")
    seen = []
    real = sample_text.generate

    def spy(model, tokenizer, prompts, **kw):
        seen.append(tokenizer.chat_template)
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(sample_text, "generate", spy)
    res = CliRunner().invoke(app, ["sample", "text", "--model", str(model_dir), "--prompt", "add: 1 2", "--chat",
                                   "--chat-template", TEMPLATE, "--max-new-tokens", "2",
                                   "--out", str(tmp_path / "s.jsonl")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert seen == [TEMPLATE]
    assert json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])["prompt"] == "add: 1 2"
    bad = CliRunner().invoke(app, ["sample", "text", "--model", str(model_dir), "--prompt", "x", "--chat",
                                   "--chat-template", "missing.jinja"])
    assert bad.exit_code == 2 and "neither a Jinja template" in bad.output


def test_sample_text_bad_checkpoint_is_one_error_line(tmp_path):
    from mmalign.cli import app

    (tmp_path / "empty").mkdir()
    for model in (tmp_path / "missing", tmp_path / "empty"):
        res = CliRunner().invoke(app, ["sample", "text", "--model", str(model), "--prompt", "x"])
        assert res.exit_code == 2 and res.output.startswith("error: ") and "Traceback" not in res.output, res.output
