"""Text encoding and collation: the offline tokenizer, plain and chat tokenisation, truncation counters,
padding sides and masks of TextBatch, and the stats that build_text_dataset hands to the logs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader

from mmalign.data.batches import TextBatch
from mmalign.data.rows import DataError, PairRow, RankedRow, SFTRow, UnpairedRow, parse_rows
from mmalign.data.synthetic import addition_rows, corpus, write_jsonl
from mmalign.data.text import (
    EncodedExample,
    PreferenceDataset,
    TextEncoder,
    build_text_dataset,
    collate,
    ranking_order,
)
from mmalign.models.tokenizer import DEFAULT_CHAT_TEMPLATE, train_bpe_tokenizer

USER = {"role": "user", "content": "add: 3 5"}


@pytest.fixture(scope="module")
def tok():
    texts = corpus(addition_rows(200, format="ranked")) + ["the sky is blue", "the grass is green"]
    return train_bpe_tokenizer(texts, vocab_size=320)


def _ids(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


# ------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_is_deterministic_and_has_special_tokens(tok):
    texts = corpus(addition_rows(200, format="ranked")) + ["the sky is blue", "the grass is green"]
    again = train_bpe_tokenizer(texts, vocab_size=320)
    assert again.get_vocab() == tok.get_vocab()
    specials = ("<pad>", "<bos>", "<eos>", "<unk>")
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == specials
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = _ids(tok, "add: 3 5 = 8 ünïcødé", special=True)
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tok.decode(ids, skip_special_tokens=True) == "add: 3 5 = 8 ünïcødé"
    rendered = tok.apply_chat_template([USER, {"role": "assistant", "content": "8"}], tokenize=False)
    assert rendered == "<bos><|user|>add: 3 5<|assistant|>8<eos>"


def test_tokenizer_round_trips_through_save_pretrained(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "add: 12 7 = 19"
    assert _ids(loaded, text, special=True) == _ids(tok, text, special=True)
    assert loaded.chat_template == tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    conv = [USER, {"role": "assistant", "content": "8"}]
    assert loaded.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(conv, tokenize=False)
    assert len(loaded) == len(tok)


def test_tokenizer_rejects_a_vocab_smaller_than_the_bytes():
    with pytest.raises(ValueError, match="vocab_size=100.*>= 263"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


# ------------------------------------------------------------------------------------------------------------
# Encoding


def test_plain_row_prompt_gets_bos_and_completions_get_eos(tok):
    rec = PairRow("add: 3 5 =", " 8", " 9", meta={"difficulty": 0}, origin=("f.jsonl", 7))
    ex = TextEncoder(tok).encode(rec)
    assert ex.prompt_ids == _ids(tok, "add: 3 5 =", special=True) and ex.prompt_ids[0] == tok.bos_token_id
    assert ex.completions == [_ids(tok, " 8") + [tok.eos_token_id], _ids(tok, " 9") + [tok.eos_token_id]]
    assert ex.labels == [0.0, 1.0]
    assert ex.meta == {"difficulty": 0, "data_file": "f.jsonl", "data_row": 7}
    no_eos = TextEncoder(tok, add_eos=False).encode(rec)
    assert no_eos.completions[0] == _ids(tok, " 8")
    # An EOS already present is not doubled.
    with_eos = TextEncoder(tok).encode(PairRow("p", " 8<eos>", " 9"))
    assert with_eos.completions[0] == no_eos.completions[0] + [tok.eos_token_id]


def test_empty_prompt_falls_back_to_bos(tok):
    ex = TextEncoder(tok).encode(parse_rows([{"text": "the sky is blue"}]).records[0])
    assert ex.prompt_ids == [tok.bos_token_id] and ex.completions[0][-1] == tok.eos_token_id


def test_chat_row_uses_the_template(tok):
    rec = PairRow([USER], [{"role": "assistant", "content": "8"}], [{"role": "assistant", "content": "9"}])
    ex = TextEncoder(tok).encode(rec)
    prompt_text = tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert ex.prompt_ids == _ids(tok, prompt_text)
    assert tok.decode(ex.completions[0]) == "8<eos>" and tok.decode(ex.completions[1]) == "9<eos>"
    full = tok.apply_chat_template([USER, {"role": "assistant", "content": "8"}], tokenize=False)
    assert tok.decode(ex.prompt_ids + ex.completions[0]) == full


def test_chat_template_mismatch_falls_back_to_the_assistant_content(tok):
    # This template marks the last message, so the prompt renders differently once an answer follows.
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                "{% if loop.last %}.{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    enc = TextEncoder(tok, chat_template=template)
    ex = enc.encode(UnpairedRow([USER], [{"role": "assistant", "content": "8"}], True))
    assert enc.stats.template_mismatches == 1
    assert ex.completions == [_ids(tok, "8") + [tok.eos_token_id]]
    assert tok.decode(ex.prompt_ids) == "<bos><|user|>add: 3 5.<|assistant|>"


def test_conversational_row_without_a_chat_template_is_refused(tok, tmp_path):
    bare = train_bpe_tokenizer(["abc"], vocab_size=270, chat_template=None)
    rec = SFTRow([USER], [{"role": "assistant", "content": "8"}], origin=("c.jsonl", 4))
    with pytest.raises(DataError, match=r"c\.jsonl:4: conversational row.*chat_template="):
        TextEncoder(bare).encode(rec)
    path = write_jsonl(addition_rows(3, format="sft", conversational=True), tmp_path / "c.jsonl")
    with pytest.raises(DataError, match="no chat template"):
        build_text_dataset(path, bare, skip_bad_rows=True)


def test_keep_end_of_prompt_truncation(tok):
    long_prompt = " ".join(["add: 1 2"] * 20)
    rec = PairRow(long_prompt, " 3" * 30, " 4")
    prompt_full = _ids(tok, long_prompt, special=True)
    comp_full = _ids(tok, " 3" * 30) + [tok.eos_token_id]
    enc = TextEncoder(tok, max_length=40, max_prompt_length=10)
    ex = enc.encode(rec)
    assert len(prompt_full) > 30 and len(comp_full) > 30
    # Prompt cut to max_prompt_length, keeping BOS and its last tokens; completions then fill the rest.
    assert ex.prompt_ids == [tok.bos_token_id] + prompt_full[-9:]
    assert ex.completions[0] == comp_full[:30] and ex.completions[1] == _ids(tok, " 4") + [tok.eos_token_id]
    assert enc.stats.as_dict() == {"prompts_truncated": 1, "completions_truncated": 1, "rows_dropped": 0,
                                   "template_mismatches": 0}
    # Only as much prompt as needed is removed when the completions are short.
    enc2 = TextEncoder(tok, max_length=len(prompt_full))
    ex2 = enc2.encode(PairRow(long_prompt, " 3", " 4"))
    assert len(ex2.prompt_ids) + max(map(len, ex2.completions)) == len(prompt_full)
    assert enc2.stats.prompts_truncated == 1 and enc2.stats.completions_truncated == 0


def test_prompt_filling_max_length_raises_or_is_dropped(tok):
    rec = PairRow(" ".join(["add: 1 2"] * 20), " 3", " 4", origin=("long.jsonl", 12))
    with pytest.raises(DataError) as err:
        TextEncoder(tok, max_length=16, truncation="keep_start").encode(rec)
    msg = str(err.value)
    assert "long.jsonl:12" in msg and "max_length=16" in msg and "skip_bad_rows" in msg and "fix:" in msg
    enc = TextEncoder(tok, max_length=16, truncation="keep_start", skip_bad_rows=True)
    assert enc.encode(rec) is None
    assert enc.stats.rows_dropped == 1 and enc.dropped == {"prompt_too_long": 1}
    # keep_start cuts completions from the right and never the prompt.
    ok = TextEncoder(tok, max_length=8, truncation="keep_start").encode(PairRow("add:", " 3" * 20, " 4"))
    assert ok.prompt_ids == _ids(tok, "add:", special=True)
    assert len(ok.prompt_ids) + len(ok.completions[0]) == 8


@pytest.mark.parametrize("kwargs, match", [
    ({"truncation": "left"}, "truncation='left'"),
    ({"max_length": 1}, "max_length=1"),
    ({"max_length": 16, "max_prompt_length": 16}, "max_prompt_length=16"),
    ({"truncation": "keep_start", "max_prompt_length": 4}, "only applies"),
])
def test_encoder_config_errors(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextEncoder(tok, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# Collation


def _ex(prompt, comps, labels, **meta):
    return EncodedExample(prompt, comps, labels, meta)


def test_collate_pads_prompts_left_and_completions_right():
    batch = collate([_ex([5, 6, 7], [[1, 2], [3]], [0.0, 1.0], margin=0.5),
                     _ex([8], [[4, 4, 4], [9, 9]], [0.0, 1.0])], pad_token_id=0)
    assert isinstance(batch, TextBatch) and batch.batch_size == 2 and batch.num_candidates == 2
    assert batch.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.completion_ids.tolist() == [[[1, 2, 0], [3, 0, 0]], [[4, 4, 4], [9, 9, 0]]]
    assert batch.completion_mask.tolist() == [[[1, 1, 0], [1, 0, 0]], [[1, 1, 1], [1, 1, 0]]]
    assert batch.candidate_mask is None  # nothing ragged
    assert batch.labels.tolist() == [[0.0, 1.0], [0.0, 1.0]]
    assert batch.extras["margin"][0].item() == 0.5 and math.isnan(batch.extras["margin"][1].item())
    assert batch.meta == [{"margin": 0.5}, {}]


def test_collate_ragged_lists_and_pad_multiple():
    batch = collate([_ex([1], [[1], [2], [3]], [2.0, 0.0, 1.0]), _ex([1, 2], [[5]], [1.0])],
                    pad_token_id=9, pad_to_multiple_of=4)
    assert tuple(batch.prompt_ids.shape) == (2, 4) and tuple(batch.completion_ids.shape) == (2, 3, 4)
    assert batch.candidate_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.completion_mask[1, 1:].sum() == 0 and (batch.completion_ids[1, 1:] == 9).all()
    assert batch.labels[0].tolist() == [2.0, 0.0, 1.0] and batch.labels[1, 0] == 1.0
    assert torch.isnan(batch.labels[1, 1:]).all()
    assert ranking_order(batch.labels).tolist() == [[1, 2, 0], [0, -1, -1]]


def test_labels_per_format(tok):
    records = [PairRow("p", "a", "b"), UnpairedRow("p", "a", False),
               RankedRow("p", ["a", "b", "c"], [1, 2, 0]), SFTRow("p", "a")]
    enc = TextEncoder(tok)
    batch = collate([enc.encode(r) for r in records], pad_token_id=tok.pad_token_id)
    labels = batch.labels.tolist()
    assert labels[0][:2] == [0.0, 1.0] and labels[1][0] == 0.0 and labels[2] == [1.0, 2.0, 0.0]
    assert math.isnan(labels[3][0])
    assert batch.candidate_mask.tolist() == [[True, True, False], [True, False, False], [True] * 3,
                                             [True, False, False]]


# ------------------------------------------------------------------------------------------------------------
# Datasets and stats


def test_build_text_dataset_and_dataloader(tok, tmp_path):
    path = write_jsonl(addition_rows(6, format="ranked", num_candidates=3), tmp_path / "ranked.jsonl")
    ds, stats = build_text_dataset(path, tok, max_length=32)
    assert isinstance(ds, PreferenceDataset) and ds.format == "ranked" and len(ds) == 6
    assert stats["rows_read"] == 6 and stats["rows_used"] == 6 and stats["rows_skipped"] == 0
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=ds.collate)))
    assert tuple(batch.completion_ids.shape[:2]) == (4, 3)
    assert [m["data_index"] for m in batch.meta] == [0, 1, 2, 3]
    assert [m["data_row"] for m in batch.meta] == [1, 2, 3, 4]
    assert batch.meta[0]["source"] == "synthetic/addition"


def test_build_text_dataset_counts_every_skipped_row(tok, tmp_path):
    good = addition_rows(4)
    lines = [json.dumps(r) for r in good]
    lines.insert(1, "{broken")                                                       # line 2: invalid_json
    lines.append(json.dumps({"prompt": "p", "chosen": "", "rejected": "x"}))          # empty_completion
    lines.append(json.dumps({"prompt": "add: 1 1 =" * 20, "chosen": " 2", "rejected": " 3"}))  # too long
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"mixed\.jsonl:2"):
        build_text_dataset(path, tok, max_length=24, truncation="keep_start")
    ds, stats = build_text_dataset(path, tok, max_length=24, truncation="keep_start", skip_bad_rows=True)
    assert len(ds) == 4
    assert stats == {"rows_read": 7, "rows_used": 4, "rows_skipped": 3, "skipped/empty_completion": 1,
                     "skipped/invalid_json": 1, "skipped/prompt_too_long": 1,
                     "encode/prompts_truncated": 0, "encode/completions_truncated": 0,
                     "encode/rows_dropped": 1, "encode/template_mismatches": 0}


def test_encoding_errors_are_collected_with_row_numbers(tok, tmp_path):
    rows = [{"prompt": "add: 1 1 =" * 20, "chosen": " 2", "rejected": " 3"}] * 3
    path = write_jsonl(rows, tmp_path / "long.jsonl")
    with pytest.raises(DataError) as err:
        build_text_dataset(path, tok, max_length=24, truncation="keep_start")
    assert str(err.value).startswith("3 bad rows") and [p.row for p in err.value.problems] == [1, 2, 3]


def test_no_usable_rows(tok, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no usable rows"):
        build_text_dataset(path, tok)


def test_batches_feed_the_causal_lm_adapter(tok):
    """Contract check: a collated ragged ranked batch is accepted by the adapter and padding scores 0."""
    from mmalign.adapters.causal_lm import score_batch
    from mmalign.models.text import build_tiny_causal_lm

    records = parse_rows(addition_rows(2, format="ranked", num_candidates=3)
                         + [{"prompt": "add: 1 1 =", "completions": [" 2", " 3"], "ranking": [0, 1]}]).records
    enc = TextEncoder(tok)
    batch = collate([enc.encode(r) for r in records], pad_token_id=tok.pad_token_id)
    model = build_tiny_causal_lm(len(tok), hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    with torch.no_grad():
        scores = score_batch(model, batch)
    assert tuple(scores.logps.shape) == (3, 3) and torch.isfinite(scores.logps).all()
    assert scores.logps[2, 2] == 0 and (scores.logps[:2] < 0).all()
