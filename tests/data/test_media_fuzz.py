"""Bad media files, generated (issue 18): every defect class of images, videos and audio in every data path that
reads them outside the VLM family (which has its own fuzz in ``tests/vlm/test_vlm_rows_fuzz.py``):

* images: diffusion (``load_image_records`` + ``ImageDataset``), CLIP (``load_image_text`` + ``ImageTextDataset``),
  PRIOR captions (``read_caption_rows`` + ``load_image``); missing, zero-byte, truncated PNG / JPEG,
  not-an-image, huge dimensions (a decompression bomb); 16-bit, CMYK, palette, grey+alpha images must *load*, in
  the right colours (a 16-bit PNG used to saturate to white through PIL's ``convert("RGB")``);
* videos: av (``load_av_records`` + ``AVDataset``) and v2a (``load_v2a_records`` + ``V2ADataset``); missing,
  zero-byte, truncated mp4, not-a-video, an audio file as the video, a directory;
* audio: the same two paths; missing, zero-byte, truncated WAV, unknown WAV format code, wrong sample rate
  (refused by v2a, converted and counted by av), silent, NaN samples, zero-length, not-an-audio-file.

Each bad file sits in a rows file between good rows. Strict mode: one :class:`DataError` naming the file (and
the row) and a fix; ``skip_bad_rows``: exactly the good rows, the bad one counted; the read-time path (media not
checked at load) also raises a DataError naming the file; never any other exception type. Deterministic, a few
seconds (16-32 px images, 1-2 s clips).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmalign.data.rows import DataError

# ------------------------------------------------------------------------------------------------ media files

IMAGE_DEFECTS = ["missing", "zero_byte", "truncated_png", "truncated_jpg", "not_an_image", "huge"]
IMAGE_MODES = ["gray16", "cmyk", "palette", "gray_alpha", "rgba"]


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` (a decompression bomb: PIL refuses it on open)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def _make_images(d: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(d / f"good{i}.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / "big.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / "big.jpg", quality=90)
    png, jpg = (d / "big.png").read_bytes(), (d / "big.jpg").read_bytes()
    (d / "zero_byte.png").write_bytes(b"")
    (d / "truncated_png.png").write_bytes(png[: len(png) // 2])
    (d / "truncated_jpg.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "not_an_image.png").write_text("this is a caption, not a picture\n" * 4)
    (d / "huge.png").write_bytes(_png_with_size(40000, 40000))
    # Valid images in unusual modes: mid-grey (or the colour named) whatever the storage.
    Image.fromarray(np.full((16, 16), 128 * 257, np.uint16)).save(d / "gray16.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=95)  # red
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 255] * 256)  # blue
    pal.save(d / "palette.png")
    Image.new("LA", (16, 16), (128, 255)).save(d / "gray_alpha.png")
    Image.new("RGBA", (16, 16), (0, 255, 0, 255)).save(d / "rgba.png")  # green


def _image_name(defect: str) -> str:
    return {"missing": "nowhere.png", "truncated_jpg": "truncated_jpg.jpg", "cmyk": "cmyk.jpg"}.get(
        defect, f"{defect}.png")


EXPECTED_RGB = {"gray16": (128, 128, 128), "cmyk": (255, 0, 0), "palette": (0, 0, 255),
                "gray_alpha": (128, 128, 128), "rgba": (0, 255, 0)}

VIDEO_DEFECTS = ["missing", "zero_byte", "truncated", "not_a_video", "audio_as_video", "directory"]
AUDIO_DEFECTS = ["missing", "zero_byte", "truncated_wav", "unknown_format", "wrong_rate", "silent", "nan",
                 "zero_length", "not_audio"]
SR = 16000


def _tone(seconds: float, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _make_av(d: Path) -> None:
    import av

    from mmalign.data.synthetic_video import moving_shape_video, write_video

    frames = moving_shape_video(32, 32, seed=1).frames  # 2 s at 16 fps
    write_video(d / "good.mp4", frames, 16)
    with av.open(str(d / "faststart.mp4"), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("mpeg4", rate=16)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for f in frames.numpy():
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = (d / "faststart.mp4").read_bytes()
    mdat = data.find(b"mdat")
    (d / "truncated.mp4").write_bytes(data[: mdat + 8 + (len(data) - mdat) // 4])  # index promises 32 frames
    (d / "zero_byte.mp4").write_bytes(b"")
    (d / "not_a_video.mp4").write_text("not a video\n" * 50)
    (d / "directory.mp4").mkdir()
    for i in range(3):
        sf.write(d / f"good{i}.wav", _tone(2.0) * (0.5 + 0.2 * i), SR, subtype="PCM_16")
    wav = (d / "good0.wav").read_bytes()
    (d / "audio_as_video.mp4").write_bytes(wav)
    (d / "zero_byte.wav").write_bytes(b"")
    (d / "truncated_wav.wav").write_bytes(wav[: 44 + (len(wav) - 44) // 2])
    odd = bytearray(wav)
    odd[20:22] = struct.pack("<H", 0x1234)
    (d / "unknown_format.wav").write_bytes(bytes(odd))
    sf.write(d / "wrong_rate.wav", _tone(2.0, 8000), 8000, subtype="PCM_16")
    sf.write(d / "silent.wav", np.zeros(2 * SR, np.float32), SR, subtype="PCM_16")
    nan = _tone(2.0)
    nan[100:200] = np.nan
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(d / "zero_length.wav", np.zeros(0, np.float32), SR, subtype="PCM_16")
    (d / "not_audio.wav").write_text("RIFF? no.\n" * 30)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("media_fuzz")
    _make_images(d)
    _make_av(d)
    return d


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _assert_clean(err: DataError, *needles: str) -> None:
    text = str(err)
    assert "fix" in text, text
    assert "Traceback" not in text
    for n in needles:
        assert n in text, (n, text)


# ------------------------------------------------------------------------------------------------ images


def _diffusion(d: Path, tmp: Path, name: str, **kw):
    from mmalign.data.image import load_image_records

    rows = [{"caption": f"c{i}", "image": f"{d}/good{i}.png", "label": i % 2} for i in range(3)]
    rows.insert(1, {"caption": "bad", "image": f"{d}/{name}", "label": 1})
    return load_image_records(_write_rows(tmp / "rows.jsonl", rows), **kw)


def _clip(d: Path, tmp: Path, name: str, **kw):
    from mmalign.data.image_text import ImageTextOptions, load_image_text

    rows = [{"image": f"{d}/good{i}.png", "caption": f"c{i}"} for i in range(3)]
    rows.insert(1, {"image": f"{d}/{name}", "caption": "bad"})
    return load_image_text(_write_rows(tmp / "rows.jsonl", rows), ImageTextOptions(**kw))


@pytest.fixture(scope="module")
def tok():
    from mmalign.models.lvlm import add_image_token
    from mmalign.models.tokenizer import train_bpe_tokenizer

    t = train_bpe_tokenizer(["a picture of c0 c1 c2 bad ."] * 5, vocab_size=280)
    add_image_token(t)
    return t


def _prior(d: Path, tmp: Path, name: str, tok, **kw):
    from mmalign.data.captions import read_caption_rows

    rows = [{"image": f"{d}/good{i}.png", "caption": f"c{i}"} for i in range(3)]
    rows.insert(1, {"image": f"{d}/{name}", "caption": "bad"})
    return read_caption_rows(_write_rows(tmp / "rows.jsonl", rows), tok, **kw)


@pytest.mark.parametrize("defect", IMAGE_DEFECTS)
def test_image_defects_diffusion(defect, media, tmp_path):
    name = _image_name(defect)
    with pytest.raises(DataError) as err:
        _diffusion(media, tmp_path, name)
    _assert_clean(err.value, name, "rows.jsonl:2")
    records, stats = _diffusion(media, tmp_path, name, skip_bad_rows=True)
    assert [r.caption for r in records] == ["c0", "c1", "c2"]
    assert sum(v for k, v in stats.items() if k.startswith("skipped/")) == 1, stats
    # Not checked at load (verify_images=false): the read at training time names the file and the row.
    from mmalign.data.image import ImageDataset

    if defect != "missing":  # a missing path is refused at load even without verification
        records, _ = _diffusion(media, tmp_path, name, verify_images=False)
        ds = ImageDataset(records, resolution=16)
        with pytest.raises(DataError) as err:
            ds.load_pixels(1)
        _assert_clean(err.value, name, "rows.jsonl:2")


@pytest.mark.parametrize("defect", IMAGE_DEFECTS)
def test_image_defects_clip(defect, media, tmp_path):
    from mmalign.data.image_text import ImageTextDataset

    name = _image_name(defect)
    with pytest.raises(DataError) as err:
        _clip(media, tmp_path, name, check_images=True)
    _assert_clean(err.value, name, "rows.jsonl:2")
    records, _, stats = _clip(media, tmp_path, name, check_images=True, skip_bad_rows=True)
    assert [r.captions for r in records] == [["c0"], ["c1"], ["c2"]] and stats["rows_skipped"] == 1, stats
    if defect == "missing":
        return
    # Unchecked at load: decoding at training time raises naming file and row, or substitutes and counts.
    records, tables, _ = _clip(media, tmp_path, name)
    with pytest.raises(DataError) as err:
        ImageTextDataset(records, tables, lambda im: torch.zeros(1))[1]
    _assert_clean(err.value, name, "rows.jsonl:2")
    ds = ImageTextDataset(records, tables, lambda im: torch.zeros(1), skip_bad_rows=True)
    ex = ds[1]
    assert ex["substituted"] and ex["caption"] == "c1" and ds.bad == {1}


@pytest.mark.parametrize("defect", IMAGE_DEFECTS)
def test_image_defects_prior_captions(defect, media, tmp_path, tok):
    from mmalign.data.captions import load_image

    name = _image_name(defect)
    with pytest.raises(DataError) as err:
        _prior(media, tmp_path, name, tok)
    _assert_clean(err.value, name, "rows.jsonl:2")
    examples, stats = _prior(media, tmp_path, name, tok, skip_bad_rows=True)
    assert [e.caption for e in examples] == ["c0", "c1", "c2"] and stats["rows_skipped"] == 1, stats
    if defect == "missing":
        return
    examples, _ = _prior(media, tmp_path, name, tok, verify_images=False)
    with pytest.raises(DataError) as err:
        load_image(examples[1])
    _assert_clean(err.value, name, "rows.jsonl:2")


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_unusual_image_modes_load_in_their_colours(mode, media, tmp_path, tok):
    """16-bit, CMYK, palette and alpha images are valid: every path loads them as RGB of the right colour."""
    from mmalign.data.captions import load_image
    from mmalign.data.image import ImageDataset
    from mmalign.data.image_text import ImageTextDataset

    name, want = _image_name(mode), torch.tensor(EXPECTED_RGB[mode], dtype=torch.float32)
    records, stats = _diffusion(media, tmp_path, name)
    assert stats["examples"] == 4
    x, _ = ImageDataset(records, resolution=16).load_pixels(1)  # [-1, 1]
    got = ((x[0, :, 8, 8] + 1) * 127.5).round()
    assert torch.allclose(got, want, atol=3), (mode, got)

    recs, tables, _ = _clip(media, tmp_path, name, check_images=True)
    pixel = ImageTextDataset(recs, tables, lambda im: torch.tensor(im.getpixel((8, 8)), dtype=torch.float32))[1]
    assert torch.allclose(pixel["pixel_values"], want, atol=3), (mode, pixel["pixel_values"])

    examples, _ = _prior(media, tmp_path, name, tok)
    img = load_image(examples[1])
    assert img.mode == "RGB" and torch.allclose(torch.tensor(img.getpixel((8, 8)), dtype=torch.float32), want, atol=3)


# ------------------------------------------------------------------------------------------------ av / v2a


def _av(d: Path, tmp: Path, video: str, audio: str, **kw):
    from mmalign.data.av_clips import AVOptions, load_av_records
    from mmalign.data.av_media import AVMedia

    rows = [{"video": f"{d}/good.mp4", "audio": f"{d}/good{i}.wav"} for i in range(3)]
    rows.insert(1, {"video": f"{d}/{video}", "audio": f"{d}/{audio}"})
    return load_av_records([_write_rows(tmp / "rows.jsonl", rows)], AVMedia(),
                           AVOptions(clips_per_video=2, min_shift=0.25, **kw))


V2A = dict(sample_rate=SR, num_samples=SR, fps=8.0, num_frames=8, frame_size=16)


def _v2a(d: Path, tmp: Path, video: str, audio: str, check: bool = True, **kw):
    from mmalign.data.v2a import MediaOptions, load_v2a_records

    rows = [{"video": f"{d}/good.mp4", "audio": f"{d}/good{i}.wav"} for i in range(3)]
    rows.insert(1, {"video": f"{d}/{video}", "audio": f"{d}/{audio}"})
    return load_v2a_records(_write_rows(tmp / "rows.jsonl", rows), MediaOptions(**V2A) if check else None, **kw)


def _video_name(defect: str) -> str:
    return "nowhere.mp4" if defect == "missing" else f"{defect}.mp4"


def _audio_name(defect: str) -> str:
    return "nowhere.wav" if defect == "missing" else f"{defect}.wav"


@pytest.mark.parametrize("defect", VIDEO_DEFECTS)
def test_video_defects_av(defect, media, tmp_path):
    from mmalign.data.av_clips import AVDataset, AVOptions
    from mmalign.data.av_media import AVMedia

    name = _video_name(defect)
    with pytest.raises(DataError) as err:
        _av(media, tmp_path, name, "good1.wav")
    _assert_clean(err.value, name, "rows.jsonl:2")
    records, stats = _av(media, tmp_path, name, "good1.wav", skip_bad_rows=True)
    assert [Path(r.audio).name for r in records] == ["good0.wav", "good1.wav", "good2.wav"]
    assert sum(v for k, v in stats.items() if k.startswith("skipped/")) == 1, stats
    ds = AVDataset(records, AVMedia(), AVOptions(clips_per_video=2, min_shift=0.25))
    assert ds[1]["slow"].shape[0] == 2  # the good rows still read
    if defect == "truncated":  # its header passes at load; the frames it lacks fail at read time, named
        from mmalign.data.av_clips import AVRecord

        bad = AVRecord(str(media / name), str(media / "good1.wav"), 32, 16.0, 2.0, "rows.jsonl:2")
        with pytest.raises(DataError) as err:
            AVDataset([bad], AVMedia(), AVOptions(clips_per_video=2, min_shift=0.25))[0]
        _assert_clean(err.value, name, "rows.jsonl:2")


@pytest.mark.parametrize("defect", AUDIO_DEFECTS)
def test_audio_defects_av(defect, media, tmp_path):
    name = _audio_name(defect)
    if defect == "wrong_rate":  # av converts: resampled and counted; refused with convert_audio=false
        records, stats = _av(media, tmp_path, "good.mp4", name)
        assert len(records) == 4 and stats["resampled"] == 1
        with pytest.raises(DataError) as err:
            _av(media, tmp_path, "good.mp4", name, convert_audio=False)
        _assert_clean(err.value, name, "8000 Hz")
        return
    with pytest.raises(DataError) as err:
        _av(media, tmp_path, "good.mp4", name)
    _assert_clean(err.value, name, "rows.jsonl:2")
    records, stats = _av(media, tmp_path, "good.mp4", name, skip_bad_rows=True)
    assert [Path(r.audio).name for r in records] == ["good0.wav", "good1.wav", "good2.wav"]
    assert sum(v for k, v in stats.items() if k.startswith("skipped/")) == 1, stats


@pytest.mark.parametrize("defect", VIDEO_DEFECTS)
def test_video_defects_v2a(defect, media, tmp_path):
    _v2a_case(media, tmp_path, _video_name(defect), "good1.wav")


@pytest.mark.parametrize("defect", AUDIO_DEFECTS)
def test_audio_defects_v2a(defect, media, tmp_path):
    _v2a_case(media, tmp_path, "good.mp4", _audio_name(defect))


def _v2a_case(media: Path, tmp_path: Path, video: str, audio: str) -> None:
    from mmalign.data.v2a import MediaOptions, V2ADataset

    bad = video if video != "good.mp4" else audio
    with pytest.raises(DataError) as err:
        _v2a(media, tmp_path, video, audio)
    _assert_clean(err.value, bad, "rows.jsonl:2")
    records, stats = _v2a(media, tmp_path, video, audio, skip_bad_rows=True)
    assert [r.audios[0].name for r in records] == ["good0.wav", "good1.wav", "good2.wav"]
    assert sum(v for k, v in stats.items() if k.startswith("skipped/")) == 1, stats
    # v2a.check_media=false: rows load unchecked, the read at training time names row and file.
    records, _ = _v2a(media, tmp_path, video, audio, check=False)
    ds = V2ADataset(records, MediaOptions(**V2A), noise_sampler=None)  # __getitem__ draws no noise
    with pytest.raises(DataError) as err:
        ds[1]
    _assert_clean(err.value, bad, "rows.jsonl:2")
