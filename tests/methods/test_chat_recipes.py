"""Conversational (chat-message) rows through every text recipe, ``mmalign sample text --chat`` and
``mmalign pairs --chat`` (issue 17, bug 1): with transformers 5 ``apply_chat_template(tokenize=True)`` returns a
``BatchEncoding``, which the prompt encoders read as its key names; every chat path now goes through
:func:`mmalign.models.chat.chat_prompt_ids`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmalign.api import train
from mmalign.data.synthetic import addition_rows, write_jsonl
from mmalign.models.chat import chat_prompt_ids, ids_of

ROOT = Path(__file__).resolve().parents[2]
# recipe → (config, data format of its rows, extra overrides)
RECIPES = {
    "dpo": ("tiny_dpo", "pairs", []),
    "kto": ("tiny_kto", "unpaired", []),
    "online_dpo": ("tiny_online_dpo", "sft", []),  # its module:function reward gets the prompt as text
    "xpo": ("tiny_xpo", "sft", []),
    "seq_contrastive": ("tiny_seq_contrastive", "sft", []),
    "token_guidance": ("tiny_token_guidance", "sft", []),
    "sft": ("tiny_dpo", "sft", ["loss.name=sft", "loss.kwargs={}", "reference.strategy=none"]),
    "rm": ("tiny_rm", "pairs", []),
}


class _Encoding(dict):
    """Stand-in for what tokenizers may return; BatchEncoding itself is checked with a real tokenizer below."""


def test_ids_of_every_return_type():
    from transformers import BatchEncoding

    want = [5, 6, 7]
    for out in (want, BatchEncoding({"input_ids": want, "attention_mask": [1, 1, 1]}),
                _Encoding(input_ids=want), torch.tensor(want), torch.tensor([want]), [want],
                BatchEncoding({"input_ids": torch.tensor([want])})):
        assert ids_of(out) == want, type(out)
    with pytest.raises(TypeError, match="token ids"):
        ids_of(["input_ids", "attention_mask"])


def test_chat_prompt_ids_real_tokenizer():
    from mmalign.models.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["add: 1 2 = 3", "hello world"], vocab_size=300)
    msgs = [{"role": "user", "content": "add: 1 2"}]
    ids = chat_prompt_ids(tok, msgs)
    assert ids and all(isinstance(i, int) for i in ids)
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids) == tok.decode(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_text_recipe_on_chat_rows(recipe, tmp_path):
    config, fmt, extra = RECIPES[recipe]
    data = tmp_path / f"{fmt}_chat.jsonl"
    write_jsonl(addition_rows(16, format=fmt, conversational=True, seed=3), data)
    summary = train(ROOT / "configs" / "text" / f"{config}.yaml",
                    [f"data.train=[{data}]", "data.eval=[]", "run.max_steps=2", "run.batch_size=4",
                     "run.progress=false", "run.save_final=false", f"run.output_dir={tmp_path / 'out'}", *extra])
    assert [s["steps"] for s in summary["stages"]] == [2], summary


def _chat_model(root: Path, seed: int) -> Path:
    """A tiny causal LM saved with a chat-template tokenizer (what `mmalign demo text` writes to final/)."""
    from mmalign.models.text import build_tiny_causal_lm, save_causal_lm
    from mmalign.models.tokenizer import train_bpe_tokenizer

    rows = addition_rows(32, format="sft", conversational=False, seed=0)
    tok = train_bpe_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=300)
    model = build_tiny_causal_lm(len(tok), seed=seed, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                 intermediate_size=32, initializer_range=1.0)
    return save_causal_lm(model, tok, root / f"model{seed}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return _chat_model(tmp_path_factory.mktemp("chat_model"), 0)


def test_sample_text_chat_cli(chat_model):
    from mmalign.cli import app

    res = CliRunner().invoke(app, ["sample", "text", "--model", str(chat_model), "--prompt", "list colors:",
                                   "--chat", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output + repr(res.exception)


def test_pairs_chat_cli(chat_model, tmp_path):
    from mmalign.cli import app

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"add: {i} 1"}) + "\n" for i in range(3)))
    out = tmp_path / "pairs.jsonl"
    weak = _chat_model(tmp_path, 1)
    res = CliRunner().invoke(app, ["pairs", "--prompts", str(prompts), "--strong", str(chat_model),
                                   "--weak", str(weak), "--chat", "--max-new-tokens", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
