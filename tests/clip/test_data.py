"""mmalign.data.image_text: every source format, caption choice per epoch, bad rows and images, zero-shot sets."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from mmalign.data.image_text import (
    ImageTextCollator,
    ImageTextDataset,
    ImageTextOptions,
    load_image_text,
    load_texts,
    load_zeroshot,
)
from mmalign.data.rows import DataError

from .conftest import ASSETS


def _rows(pairs_dir):
    return [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]


def test_shipped_assets_in_every_format():
    jsonl, _, stats = load_image_text(ASSETS / "train.jsonl")
    coco, _, _ = load_image_text(ASSETS / "train_coco.json")
    csv_recs, _, _ = load_image_text(ASSETS / "train.csv")
    assert stats == {"rows_read": 128, "rows_used": 128, "rows_skipped": 0}
    assert len(coco) == len(csv_recs) == 32
    # COCO groups annotations per image, CSV rows per file path: both equal the jsonl's caption lists
    assert [r.captions for r in coco] == [r.captions for r in csv_recs] == [r.captions for r in jsonl[:32]]
    assert [r.image for r in coco] == [r.image for r in jsonl[:32]]
    refs, _, _ = load_image_text(ASSETS / "ref_images", need_captions=False)
    assert len(refs) == 32 and all(r.captions == [] for r in refs)


def test_tsv_with_custom_keys_and_separator(pairs_dir, tmp_path):
    rows = _rows(pairs_dir)
    path = tmp_path / "pairs.tsv"
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["img", "title"])
        w.writerows([r["image"], r["caption"][0]] for r in rows)
    opts = ImageTextOptions(image_root=str(pairs_dir), image_key="img", caption_key="title")
    recs, _, _ = load_image_text(path, opts)
    assert len(recs) == len(rows) and recs[0].captions == [rows[0]["caption"][0]]
    with pytest.raises(DataError, match="no caption column 'caption'.*img"):
        load_image_text(path, ImageTextOptions(image_root=str(pairs_dir), image_key="img", caption_key="caption"))


def test_hf_datasets_directory_with_image_feature(pairs_dir, tmp_path):
    import datasets

    rows = _rows(pairs_dir)[:6]
    ds = datasets.Dataset.from_dict({"image": [str(pairs_dir / r["image"]) for r in rows],
                                     "caption": [r["caption"] for r in rows]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    recs, tables, stats = load_image_text(tmp_path / "hf")
    assert stats["rows_used"] == 6 and recs[2].image == (0, 2) and recs[2].captions == rows[2]["caption"]
    from mmalign.data.image_text import open_image

    assert open_image(recs[0], tables).size == (32, 32)


def test_bad_rows_raise_with_file_row_and_fix_or_are_skipped(pairs_dir, tmp_path):
    rows = _rows(pairs_dir)[:4]
    rows[1]["image"] = "images/missing.png"
    rows[2]["caption"] = ""
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    opts = ImageTextOptions(image_root=str(pairs_dir))
    with pytest.raises(DataError) as err:
        load_image_text(path, opts)
    msg = str(err.value)
    assert f"{path}:2: field 'image' names {pairs_dir}/images/missing.png, which does not exist" in msg
    assert f"{path}:3: field 'caption'" in msg and "skip_bad_rows" in msg
    recs, _, stats = load_image_text(path, ImageTextOptions(image_root=str(pairs_dir), skip_bad_rows=True))
    assert len(recs) == 2
    assert stats["rows_skipped"] == 2 and stats["skipped/missing_image"] == 1 and stats["skipped/bad_caption"] == 1


def test_corrupt_image_checked_at_load(pairs_dir, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(pairs_dir, root)
    (root / "images" / "pairs_00001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'image'.*cannot be decoded"):
        load_image_text(root / "pairs.jsonl", ImageTextOptions(check_images=True))
    recs, _, stats = load_image_text(root / "pairs.jsonl", ImageTextOptions(check_images=True, skip_bad_rows=True))
    assert stats["skipped/bad_image"] == 1 and len(recs) == 23


def test_corrupt_image_found_at_read_time(tiny_bundle, pairs_dir, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(pairs_dir, root)
    (root / "images" / "pairs_00001.png").write_bytes(b"\x89PNG broken")
    recs, tables, _ = load_image_text(root / "pairs.jsonl")
    ds = ImageTextDataset(recs, tables, tiny_bundle.transform, tiny_bundle.tokenizer)
    with pytest.raises(DataError, match=r"pairs.jsonl:2: image .*pairs_00001.png.* cannot be decoded"):
        ds[1]
    ds = ImageTextDataset(recs, tables, tiny_bundle.transform, tiny_bundle.tokenizer, skip_bad_rows=True)
    ex = ds[1]
    assert ex["image_index"] == 2 and ex["substituted"] and ds.bad == {1}
    batch = ds.collate([ds[0], ds[1]])
    assert batch.extras["substituted"].tolist() == [0.0, 1.0]


def test_one_caption_per_image_per_epoch_seeded_and_resumable(tiny_bundle, pairs_dir):
    recs, tables, _ = load_image_text(pairs_dir / "pairs.jsonl")
    ds = ImageTextDataset(recs, tables, tiny_bundle.transform, tiny_bundle.tokenizer, seed=3)
    epoch0 = [ds.caption_index(i) for i in range(len(ds))]
    ds.set_epoch(1)
    epoch1 = [ds[i]["caption_index"] for i in range(len(ds))]
    assert epoch0 != epoch1 and set(epoch0) | set(epoch1) <= {0, 1, 2, 3}
    fresh = ImageTextDataset(recs, tables, tiny_bundle.transform, tiny_bundle.tokenizer, seed=3)
    fresh.set_epoch(1)  # a resumed run: same seed and epoch, same captions
    assert [fresh[i]["caption_index"] for i in range(len(ds))] == epoch1
    assert ds[0]["caption"] == recs[0].captions[epoch1[0]]


def test_collator_pairs_and_images_only(tiny_bundle, pairs_dir):
    recs, tables, _ = load_image_text(pairs_dir / "pairs.jsonl")
    pairs = ImageTextDataset(recs, tables, tiny_bundle.transform, tiny_bundle.tokenizer)
    images = ImageTextDataset(recs, tables, tiny_bundle.transform, with_text=False)
    collate = ImageTextCollator(tiny_bundle.tokenizer)
    b = collate([pairs[i] for i in range(4)])
    assert b.pixel_values.shape == (4, 3, 32, 32) and b.input_ids.shape == (4, 16)
    assert b.attention_mask.sum(1).min() >= 3  # SOT, words, EOT
    b = collate([images[i] for i in range(4)])
    assert b.input_ids is None and b.batch_size == 4
    with pytest.raises(ValueError, match="mixes"):
        collate([pairs[0], images[1]])
    assert torch.equal(b.to("cpu").pixel_values, b.pixel_values)


def test_zeroshot_folder_and_texts(tmp_path):
    zs = load_zeroshot(ASSETS / "zeroshot")
    assert len(zs.classnames) == 16 and len(zs.paths) == 48 and zs.templates == ["a photo of a {}."]
    assert zs.classnames[zs.labels[0]] == "blue circle"  # sorted folders, names from classnames.txt
    bad = tmp_path / "zs"
    shutil.copytree(ASSETS / "zeroshot", bad)
    (bad / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="2 class names for 16 class folders"):
        load_zeroshot(bad)
    with pytest.raises(DataError, match="no '\\{\\}'"):
        load_zeroshot(ASSETS / "zeroshot", templates=["a photo"])
    texts = load_texts(ASSETS / "ref_texts.txt")
    assert len(texts) > 10 and all(texts)
    assert len(load_texts(ASSETS / "eval.jsonl")) == 32 * 4


def test_missing_sources_and_folders_without_captions(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_image_text(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="a folder of images has no captions"):
        load_image_text(ASSETS / "ref_images")
