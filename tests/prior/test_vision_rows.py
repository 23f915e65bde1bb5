"""TRL-style vision preference rows: image placement, conversational rows, and row errors naming file:row:field."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from mmalign.data.rows import DataError
from mmalign.data.vision_rows import read_vision_rows

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "lvlm"
N = 16  # placeholders per image
IMG = 999  # placeholder id used by these tests (the tokenizer maps <image> to it)

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")
# A LLaVA-hf-style template that iterates over content parts (it renders nothing for string contents).
PARTS_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{% if p['type'] == 'image' %}"
                  "<image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def tok():
    from mmalign.adapters.lvlm_family import _texts
    from mmalign.data.rows import load_rows
    from mmalign.models.lvlm import add_image_token
    from mmalign.models.tokenizer import train_bpe_tokenizer

    rows = [r for _, _, r in load_rows([ASSETS / "prefs.jsonl", ASSETS / "prefs_chat.jsonl"])]
    texts = [t for r in rows for k in ("prompt", "chosen", "rejected") for t in _texts(r.get(k))]
    tok = train_bpe_tokenizer(texts + ["user: assistant:"], vocab_size=300)
    add_image_token(tok)
    return tok


def _read(tok, sources, **kw):
    image_id = tok.convert_tokens_to_ids("<image>")
    return read_vision_rows(sources, tok, image_token_id=image_id, num_image_tokens=N, **kw), image_id


def test_images_go_to_the_marker_or_after_bos(tok):
    (examples, stats, fmt), image_id = _read(tok, [ASSETS / "prefs.jsonl"])
    assert fmt == "pairs" and stats["rows_used"] == 24 and stats["encode/image_after_bos"] == 12
    for ex in examples:
        ids = ex.encoded.prompt_ids
        first = ids.index(image_id)
        assert ids.count(image_id) == N and ids[first:first + N] == [image_id] * N  # one contiguous block
        assert ids[0] == tok.bos_token_id and first == 1  # the asset prompts start with the image either way
        assert len(ex.encoded.completions) == 2 and ex.encoded.completions[0][-1] == tok.eos_token_id
        assert ex.image.is_file() and ex.image.parent.parent == ASSETS  # relative to the jsonl file
    marked = [ex for ex in examples if ex.origin[1] % 2 == 1]  # odd lines carry "<image>\nWhat colour ..."
    assert all(tok.decode(ex.encoded.prompt_ids[1 + N:]).strip().startswith("What colour is this")
               for ex in marked)


def test_unpaired_rows(tok):
    (examples, stats, fmt), _ = _read(tok, [ASSETS / "kto.jsonl"])
    assert fmt == "unpaired" and len(examples) == 24
    assert [ex.encoded.labels for ex in examples[:2]] == [[1.0], [0.0]]


def test_conversational_rows_with_image_parts(tok):
    (examples, _, _), image_id = _read(tok, [ASSETS / "prefs_chat.jsonl"], chat_template=TEMPLATE)
    ex = examples[0]
    ids = ex.encoded.prompt_ids
    first = ids.index(image_id)
    assert tok.decode(ids[:first]).strip() == "user:"  # the image part's place in the rendered prompt
    assert ids.count(image_id) == N and tok.decode(ids[first + N:]).strip().endswith("assistant:")
    assert tok.decode(ex.encoded.completions[0]).strip() == "It is red."
    from mmalign.data.vision_rows import template_takes_parts

    assert template_takes_parts(tok, PARTS_TEMPLATE) and not template_takes_parts(tok, TEMPLATE)
    (parts, _, _), _ = _read(tok, [ASSETS / "prefs_chat.jsonl"], chat_template=PARTS_TEMPLATE)
    assert [e.encoded.prompt_ids for e in parts] == [e.encoded.prompt_ids for e in examples]
    assert [e.encoded.completions for e in parts] == [e.encoded.completions for e in examples]
    (default, _, _), _ = _read(tok, [ASSETS / "prefs_chat.jsonl"])  # the tiny BPE's own template
    assert default[0].encoded.prompt_ids.count(image_id) == N
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        _read(bare, [ASSETS / "prefs_chat.jsonl"])


def _write_bad(tmp: Path) -> Path:
    shutil.copy(ASSETS / "images" / "red_0.png", tmp / "ok.png")
    good = {"images": ["ok.png"], "prompt": "What colour?", "chosen": "It is red.", "rejected": "It is blue."}
    rows = [
        good,
        {k: v for k, v in good.items() if k != "images"},
        {**good, "images": ["ok.png", "ok.png"]},
        {**good, "images": ["missing.png"]},
        {**good, "prompt": "<image> and <image>"},
        {**good, "chosen": [{"role": "assistant", "content": [{"type": "image"}]}],
         "prompt": [{"role": "user", "content": "What colour?"}],
         "rejected": [{"role": "assistant", "content": "It is blue."}]},
        {k: v for k, v in good.items() if k != "rejected"} | {"completion": "x"},
        {**good, "prompt": [{"role": "user", "content": [{"type": "video"}]}]},
        {**good, "images": "ok.png"},
    ]
    path = tmp / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_name_file_row_and_field(tok, tmp_path):
    path = _write_bad(tmp_path)
    with pytest.raises(DataError) as err:
        _read(tok, [path], format="pairs")
    msg = str(err.value)
    expected = [(2, "images", "is missing"), (3, "images", "one image per row"), (4, "images", "does not exist"),
                (5, "prompt", "2 image markers"), (6, "chosen", "image marker or image part"),
                (7, "rejected", "is missing"), (8, "prompt[0].content[0]", "'type': 'text'"),
                (9, "images", "must be a list holding one image")]
    for row, field, text in expected:
        line = next((ln for ln in msg.splitlines() if f"{path}:{row}: field {field!r}" in ln), None)
        assert line is not None and text in line, (row, field, msg)
    assert f"{path}:1:" not in msg and "skip_bad_rows" in msg
    (examples, stats, _), _ = _read(tok, [path], format="pairs", skip_bad_rows=True)
    assert len(examples) == 1 and stats["rows_skipped"] == 8
    assert stats["skipped/too_many_images"] == 2 and stats["skipped/missing_image"] == 1


def test_tokenizer_without_the_image_token_is_refused(tmp_path):
    from mmalign.models.tokenizer import train_bpe_tokenizer

    plain = train_bpe_tokenizer(["It is red."] * 4, vocab_size=270)
    with pytest.raises(ValueError, match="add_image_token"):
        read_vision_rows([ASSETS / "prefs.jsonl"], plain, image_token_id=IMG, num_image_tokens=N)
