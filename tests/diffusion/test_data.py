"""Image preference rows: formats, Pick-a-Pic label semantics and ties, bad images, preprocessing, collate."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmalign.data.image import ImageDataset, load_image_records, preprocess
from mmalign.data.noise import NoiseSampler
from mmalign.data.rows import DataError

from . import ASSETS


def _png(color=(200, 30, 30), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in rows[0]}), path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


RED, BLUE = _png((200, 30, 30)), _png((30, 30, 200))


def test_pickapic_labels_and_ties(tmp_path):
    """label_0 = 1 ⇒ jpg_0 is candidate 0 (chosen); 0 ⇒ jpg_1; ties (0.5) dropped by default."""
    path = _parquet(tmp_path / "p.parquet", [
        {"caption": "one", "jpg_0": RED, "jpg_1": BLUE, "label_0": 1.0},
        {"caption": "two", "jpg_0": RED, "jpg_1": BLUE, "label_0": 0.0},
        {"caption": "tie", "jpg_0": RED, "jpg_1": BLUE, "label_0": 0.5},
    ])
    recs, stats = load_image_records(path)
    assert stats["format"] == "pickapic" and stats["ties_dropped"] == 1 and [r.caption for r in recs] == ["one", "two"]
    assert recs[0].images[0].raw_bytes() == RED and recs[1].images[0].raw_bytes() == BLUE
    assert recs[0].origin == (str(path), 1) and recs[1].labels == [0.0, 1.0]
    kept, stats = load_image_records(path, drop_ties=False)
    assert len(kept) == 3 and kept[2].labels == [0.5, 0.5] and kept[2].images[0].raw_bytes() == RED


@pytest.mark.parametrize("row,field,value", [
    ({"label_0": 2}, "label_0", "2"),
    ({"label_0": "1"}, "label_0", "'1'"),
    ({"label_0": 1.0, "label_1": 1.0}, "label_1", "1.0"),
])
def test_pickapic_bad_labels_name_file_row_value(tmp_path, row, field, value):
    (tmp_path / "r.png").write_bytes(RED)
    good = {"caption": "ok", "jpg_0": "r.png", "jpg_1": "r.png", "label_0": 1.0, "label_1": 0.0}
    bad = {**good, "label_1": None, **row}
    path = _jsonl(tmp_path / "bad.jsonl", [good, bad])  # Pick-a-Pic columns with image paths
    with pytest.raises(DataError) as e:
        load_image_records(path)
    msg = str(e.value)
    assert f"{path}:2" in msg and f"field {field!r}" in msg and value in msg and "fix:" in msg
    recs, stats = load_image_records(path, skip_bad_rows=True)
    assert len(recs) == 1 and stats["skipped/bad_label"] == 1


def test_hf_dataset_directory(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"caption": ["a", "b"], "jpg_0": [RED, BLUE], "jpg_1": [BLUE, RED],
                                     "label_0": [0.0, 1.0]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    recs, stats = load_image_records(tmp_path / "hf")
    assert stats["examples"] == 2 and recs[0].images[0].raw_bytes() == BLUE
    assert recs[1].images[0].open().getpixel((0, 0)) == (30, 30, 200)


def test_jsonl_formats_from_assets():
    for name, fmt, k in [("pairs.jsonl", "pairs", 2), ("unpaired.jsonl", "unpaired", 1),
                         ("ranked.jsonl", "ranked", 3), ("sft.jsonl", "sft", 1), ("pickapic.parquet", "pickapic", 2)]:
        recs, stats = load_image_records(ASSETS / name)
        assert stats["format"] == fmt and all(len(r.images) == k for r in recs), name
    ranked, _ = load_image_records(ASSETS / "ranked.jsonl")
    assert ranked[0].labels == [2.0, 0.0, 1.0]


def test_missing_and_corrupt_images(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok2.png")  # a pair of one file twice would be dropped (identical)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = _jsonl(tmp_path / "d.jsonl", [
        {"caption": "fine", "chosen": "ok.png", "rejected": "ok2.png"},
        {"caption": "missing", "chosen": "ok.png", "rejected": "nope.png"},
        {"caption": "corrupt", "chosen": "broken.png", "rejected": "ok.png"},
    ])
    with pytest.raises(DataError) as e:
        load_image_records(path)
    msg = str(e.value)
    assert "2 bad rows" in msg and f"{path}:2: field 'rejected'" in msg and "nope.png" in msg
    assert f"{path}:3: field 'chosen'" in msg and "cannot be decoded" in msg
    recs, stats = load_image_records(path, skip_bad_rows=True)
    assert len(recs) == 1 and stats["skipped/missing_image"] == 1 and stats["skipped/bad_image"] == 1
    # verify_images=false: the corrupt image is found when loaded, with file, row, field and path
    recs, _ = load_image_records(path, verify_images=False, skip_bad_rows=True)
    ds = ImageDataset(recs, resolution=8)
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'chosen' image .*broken\.png"):
        ds.load_pixels(1)


def test_format_errors(tmp_path):
    with pytest.raises(DataError, match="cannot tell the image data format"):
        load_image_records(_jsonl(tmp_path / "x.jsonl", [{"caption": "a", "picture": "b.png"}]))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    bad_rank = _jsonl(tmp_path / "r.jsonl", [{"caption": "c", "images": ["a.png", "a.png"], "ranking": [0, 0]}])
    with pytest.raises(DataError, match="is not a permutation"):
        load_image_records(bad_rank)
    no_caption = _jsonl(tmp_path / "n.jsonl", [{"chosen": "a.png", "rejected": "a.png"}])
    with pytest.raises(DataError, match="'caption'"):
        load_image_records(no_caption)
    with pytest.raises(DataError, match="no such file"):
        load_image_records(tmp_path / "absent.parquet")


def test_preprocess_resize_crop_and_time_ids():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    x, ids = preprocess(img, 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1], -torch.ones(16, 16))
    assert ids.tolist() == [20.0, 40.0, 0.0, 8.0, 16.0, 16.0]  # resized to 32x16, centre crop left = 8


def test_flip_is_joint_and_off_by_default(tmp_path):
    """One flip decision per example for all its images; none unless random_flip."""
    img = Image.new("RGB", (16, 16), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 16))  # left half white: asymmetric
    img.save(tmp_path / "half.png")
    img.save(tmp_path / "half2.png")  # the same pixels in another file (one file twice is an identical pair)
    path = _jsonl(tmp_path / "d.jsonl", [{"caption": "c", "chosen": "half.png", "rejected": "half2.png"}])
    recs, _ = load_image_records(path)
    plain = ImageDataset(recs, resolution=16)
    assert all(plain[0].pixels[0, 0, 0, 0] == 1.0 for _ in range(4))
    flips = ImageDataset(recs, resolution=16, random_flip=True)
    seen = set()
    for _ in range(12):
        px = flips[0].pixels
        assert torch.equal(px[0], px[1])
        seen.add(float(px[0, 0, 0, 0]))
    assert seen == {1.0, -1.0}


def test_collate_noise_is_deterministic_and_epoch_dependent():
    recs, _ = load_image_records(ASSETS / "pairs.jsonl")
    sampler = NoiseSampler(latent_shape=(4, 8, 8), seed=0, vae_sample=True)
    ds = ImageDataset(recs, resolution=16, noise_sampler=sampler)
    ds.set_epoch(0)
    a = ds.collate([ds[i] for i in (0, 1)])
    b = ds.collate([ds[i] for i in (1, 0)])
    assert a.pixel_values.shape == (2, 2, 3, 16, 16) and a.extras["noise"].shape == (2, 4, 8, 8)
    assert torch.equal(a.extras["noise"][0], b.extras["noise"][1])  # per example, not per batch position
    ds.set_epoch(1)
    c = ds.collate([ds[i] for i in (0, 1)])
    assert not torch.equal(a.extras["noise"], c.extras["noise"])
    fresh = ImageDataset(recs, resolution=16, noise_sampler=sampler)  # no set_epoch: visit counts
    first, second = fresh.collate([fresh[0]]), fresh.collate([fresh[0]])
    assert torch.equal(first.extras["noise"][0], a.extras["noise"][0])
    assert torch.equal(second.extras["noise"][0], c.extras["noise"][0])


def test_eval_examples_keep_their_own_noise_sampler():
    """The loop collates eval examples with the train dataset's collate: the eval sampler (fixed) still applies."""
    recs, _ = load_image_records(ASSETS / "pairs.jsonl")
    train = ImageDataset(recs, resolution=16, noise_sampler=NoiseSampler(latent_shape=(4, 8, 8), seed=0))
    ev = ImageDataset(recs, resolution=16, noise_sampler=NoiseSampler(latent_shape=(4, 8, 8), seed=9, fixed=True))
    first, again = train.collate([ev[0]]), train.collate([ev[0]])
    assert torch.equal(first.extras["noise"], again.extras["noise"])
    assert torch.equal(first.extras["noise"][0], ev.noise_sampler.draw(0, 0, 2)["noise"])


def test_collate_ragged_ranked_lists(tmp_path):
    for name in ("a", "b", "c"):  # distinct files: a list of one file repeated is dropped (identical)
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    path = _jsonl(tmp_path / "r.jsonl", [
        {"caption": "three", "images": ["a.png", "b.png", "c.png"], "ranking": [1, 0, 2]},
        {"caption": "two", "images": ["a.png", "b.png"], "scores": [0.1, 0.9]},
    ])
    recs, _ = load_image_records(path)
    ds = ImageDataset(recs, resolution=8, noise_sampler=NoiseSampler(latent_shape=(4, 4, 4)))
    batch = ds.collate([ds[0], ds[1]])
    assert batch.candidate_mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.labels[1, :2].tolist() == [1.0, 0.0] and torch.isnan(batch.labels[1, 2])
    assert batch.pixel_values.shape == (2, 3, 3, 8, 8) and batch.pixel_values[1, 2].abs().sum() == 0


def test_prompt_dropout_is_deterministic():
    recs, _ = load_image_records(ASSETS / "sft.jsonl")
    sampler = NoiseSampler(latent_shape=(4, 8, 8), seed=0, proportion_empty_prompts=0.5)
    ds = ImageDataset(recs, resolution=16, noise_sampler=sampler)
    ds.set_epoch(0)
    caps = ds.collate([ds[i] for i in range(len(ds))]).captions
    assert 0 < caps.count("") < len(caps)
    assert caps == ds.collate([ds[i] for i in range(len(ds))]).captions
