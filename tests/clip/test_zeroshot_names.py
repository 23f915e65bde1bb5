"""Zero-shot class names are paired with their folders by name or an explicit map, never silently by an
ambiguous order (issue 18 item 10): ``classnames.txt`` listing ``zero, one, …, nine`` for folders that sort
``eight, five, four, …`` scores exactly as a sorted file does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmalign.data.image_text import load_zeroshot
from mmalign.data.rows import DataError
from mmalign.data.zeroshot_names import pair_classnames
from mmalign.eval.clip import evaluate_clip

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class Oracle(nn.Module):
    """A "CLIP" that is right by construction: an image's grey level and a caption's token both encode the digit,
    and both embed to that digit's one-hot vector, so a correct name pairing scores 100 % top-1."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def get_image_features(self, pixel_values):
        return F.one_hot(pixel_values.round().long().view(-1), 10).float() + 0 * self.w

    def get_text_features(self, input_ids, attention_mask=None):
        return F.one_hot(input_ids[:, 0], 10).float()


def tokenizer(texts):
    ids = torch.tensor([[next(i for i, w in enumerate(WORDS) if w in t.strip('.').split())] for t in texts])
    return ids, torch.ones_like(ids)


def transform(im):
    return torch.tensor([float(np.asarray(im)[0, 0, 0]) / 20.0])


def _digits(root, names: str | None):
    for i, w in enumerate(WORDS):
        (root / w).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (4, 4), (20 * i, 0, 0)).save(root / w / f"{k}.png")
    if names is not None:
        (root / "classnames.txt").write_text(names)
    return root


def _top1(zs) -> float:
    return evaluate_clip(Oracle(), tokenizer, transform, zeroshot=zs)["zeroshot/top1"]


def test_natural_order_scores_like_sorted_order(tmp_path):
    natural = load_zeroshot(_digits(tmp_path / "natural", "\n".join(WORDS) + "\n"))
    ordered = load_zeroshot(_digits(tmp_path / "sorted", "\n".join(sorted(WORDS)) + "\n"))
    plain = load_zeroshot(_digits(tmp_path / "plain", None))
    assert natural.folders[:3] == ["eight", "five", "four"] and natural.pairing == "by name"
    assert natural.classnames == ordered.classnames == plain.classnames
    assert _top1(natural) == _top1(ordered) == _top1(plain) == 1.0
    # the map format, in any order, with names that are not the folder names
    mapped = load_zeroshot(_digits(tmp_path / "mapped", "".join(f"{w}: digit {w}\n" for w in WORDS)))
    assert mapped.pairing == "map" and mapped.classnames[mapped.folders.index("zero")] == "digit zero"


def test_cli_eval_reports_the_same_accuracy_and_refuses_ambiguity(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mmalign.cli import app
    from mmalign.models import clip as clip_models

    class Bundle:
        model, tokenizer, transform = Oracle(), staticmethod(tokenizer), staticmethod(transform)

    monkeypatch.setattr(clip_models, "load_clip", lambda *a, **k: Bundle())
    scores = {}
    for name, text in (("natural", "\n".join(WORDS)), ("sorted", "\n".join(sorted(WORDS)))):
        out = tmp_path / f"{name}.json"
        res = CliRunner().invoke(app, ["eval", "clip", "--model", "oracle", "--zeroshot",
                                       str(_digits(tmp_path / name, text)), "--device", "cpu", "--out", str(out)])
        assert res.exit_code == 0, res.output
        scores[name] = json.loads(out.read_text())["oracle"]["zeroshot/top1"]
    assert scores["natural"] == scores["sorted"] == 1.0
    # names that are not the folder names and whose order contradicts them: refused, with the fix
    bad = _digits(tmp_path / "bad", "".join(f"the digit {w}\n" for w in WORDS))
    res = CliRunner().invoke(app, ["eval", "clip", "--model", "oracle", "--zeroshot", str(bad), "--device", "cpu"])
    assert res.exit_code == 2
    assert "classnames.txt: the class names are not the folder names" in res.output
    assert "folder 'eight' (sorted position 1) is named in line 9" in res.output
    assert "fix: write classnames.txt as one `folder: name` line per class folder" in res.output


def test_pairing_rules():
    assert pair_classnames("x", ["red_circle", "blue_square"], ["Blue square", "red circle"]) == (
        ["red circle", "Blue square"], "by name")
    # opaque ids (ImageNet wnids) have one order only: the sorted one
    assert pair_classnames("x", ["n01", "n02"], ["tench", "goldfish"]) == (["tench", "goldfish"], "sorted order")
    assert pair_classnames("x", ["cat", "dog"], ["a cat", "a dog"])[1] == "sorted order"
    assert pair_classnames("x", ["cat", "dog"], {"dog": "hound", "cat": "kitty"}) == (["kitty", "hound"], "map")
    with pytest.raises(DataError, match=r"names \['cat'\] are folder names but \['puppy'\] are not.*fix"):
        pair_classnames("x", ["cat", "dog"], ["cat", "puppy"])
    with pytest.raises(DataError, match="sort as text.*not as numbers"):
        pair_classnames("x", sorted(str(i) for i in range(1, 11)), [f"class {i}" for i in range(1, 11)])
    assert pair_classnames("x", ["01", "02"], ["a", "b"])[1] == "sorted order"
    with pytest.raises(DataError, match="2 class names for 3 class folders; fix"):
        pair_classnames("x", ["a", "b", "c"], ["x", "y"])
    with pytest.raises(DataError, match=r"misses folders \['dog'\]"):
        pair_classnames("x", ["cat", "dog"], {"cat": "kitty"})
    with pytest.raises(DataError, match="named twice"):
        pair_classnames("x", ["cat", "dog"], ["cat: a", "cat: b"])
