"""Image-caption rows: bad rows raise DataError naming file/row/field (or are skipped and counted), LLaVA's
``conversations`` format, image paths, tokenisation shared with the text recipe, collation layout."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.data.captions import CaptionDataset, read_caption_rows
from mmalign.data.rows import DataError, SFTRow
from mmalign.data.text import TextEncoder
from mmalign.models.lvlm import add_image_token
from mmalign.models.tokenizer import train_bpe_tokenizer

from ._tiny import write_rows


@pytest.fixture(scope="module")
def tok():
    t = train_bpe_tokenizer(["a red circle on a dark background .", "describe the picture:"] * 5, vocab_size=300)
    add_image_token(t)
    return t


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_name_file_row_field_and_fix(tmp_path, tok):
    good = write_rows(tmp_path, n=2)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    rows = [json.loads(line) for line in good.read_text().splitlines()]
    bad = _write(tmp_path / "bad.jsonl", [
        rows[0],
        {"image": "images/nope.png", "caption": "a red circle"},
        {"image": rows[0]["image"], "caption": "   "},
        {"caption": "no image here"},
        {"image": "images/broken.png", "caption": "a red circle"},
        {"image": rows[1]["image"], "caption": 7},
    ])
    with pytest.raises(DataError) as err:
        read_caption_rows([bad], tok)
    msg = str(err.value)
    assert "5 bad rows" in msg
    for row, fld, words in [(2, "image", "does not exist"), (3, "caption", "non-empty caption"),
                            (4, "image", "is missing"), (5, "image", "not a readable image"),
                            (6, "caption", "non-empty caption")]:
        assert f"{bad}:{row}: field '{fld}'" in msg and words in msg
    assert "fix:" in msg
    examples, stats = read_caption_rows([bad], tok, skip_bad_rows=True)
    assert len(examples) == 1 and stats["rows_skipped"] == 5
    assert stats["skipped/missing_image"] == 1 and stats["skipped/bad_image"] == 1
    assert stats["skipped/missing_field"] == 1 and stats["skipped/bad_caption"] == 2


def test_undecodable_image_at_collate_time_names_file_and_row(tmp_path, tok):
    data = write_rows(tmp_path, n=1)
    examples, _ = read_caption_rows([data], tok)
    (tmp_path / json.loads(data.read_text())["image"]).write_bytes(b"\x89PNG broken later")
    ds = CaptionDataset(examples, pad_token_id=0, image_token_id=5, num_image_tokens=2, bos_token_id=1,
                        pixel_values=lambda ims: torch.zeros(len(ims), 3, 16, 16))
    with pytest.raises(DataError, match=rf"{data}:1: field 'image'"):
        ds.collate([ds[0]])


def test_llava_conversations_and_image_root(tmp_path, tok):
    data = write_rows(tmp_path / "imgs_here", n=1)
    image = json.loads(data.read_text())["image"]
    conv = tmp_path / "llava.json"
    conv.write_text(json.dumps([{"id": "1", "image": image, "conversations": [
        {"from": "human", "value": "describe the picture:\n<image>"},
        {"from": "gpt", "value": "a red circle on a dark background ."}]}]))
    with pytest.raises(DataError, match="does not exist"):
        read_caption_rows([conv], tok)  # relative to the data file's folder by default
    (ex,), stats = read_caption_rows([conv], tok, image_root=str(tmp_path / "imgs_here"), default_prompt="x")
    assert ex.caption == "a red circle on a dark background ." and ex.prompt == "x"  # human turn dropped
    assert stats["rows_used"] == 1


def test_tokenisation_matches_the_text_recipe_and_collate_layout(tmp_path, tok):
    data = write_rows(tmp_path, n=3)
    examples, _ = read_caption_rows([data], tok, default_prompt="describe the picture:")
    enc = TextEncoder(tok, max_length=512).encode(SFTRow(examples[0].prompt, examples[0].caption))
    assert enc.prompt_ids == examples[0].text_prompt_ids and enc.completions[0] == examples[0].completion_ids
    assert examples[0].completion_ids[-1] == tok.eos_token_id
    img = tok.convert_tokens_to_ids("<image>")
    ds = CaptionDataset(examples, pad_token_id=tok.pad_token_id, image_token_id=img, num_image_tokens=4,
                        bos_token_id=tok.bos_token_id, pixel_values=lambda ims: torch.zeros(len(ims), 3, 16, 16))
    ds.attach_weights([torch.full((len(e.completion_ids),), float(i + 1)) for i, e in enumerate(examples)])
    batch = ds.collate([ds[0], ds[2]])
    n = int(batch.prompt_mask[0].sum())
    row = batch.prompt_ids[0, -n:].tolist()
    assert row[0] == tok.bos_token_id and row[1:5] == [img] * 4 and row[5:] == examples[0].text_prompt_ids[1:]
    assert batch.extras["pixel_values"].shape == (2, 3, 16, 16)
    w = batch.extras["prior_weights"]
    assert w.shape == batch.completion_ids.shape
    assert torch.equal(w[1, 0][batch.completion_mask[1, 0].bool()], torch.full((len(examples[2].completion_ids),), 3.))
    assert float(w[batch.completion_mask == 0].abs().sum()) == 0.0
    (idx, text), = list(ds.text_batches(8, [1]))
    assert idx == [1] and img not in text.prompt_ids.tolist()[0]
