"""TEMPLE preference pairs from clean / perturbed responses, and the magnitude curriculum as run stages.

Li et al., arXiv 2503.16929 (TEMPLE), §3 (pair construction, progressive curriculum); research note
``video_audio_clip_prior.md`` §1.2 (``convert_to_swift.py``) and §1.3-1.4 (training schedule). Reference code:
``lscpku/TEMPLE`` ``convert_to_swift.py``.

Pairs. Per video, the chosen response was generated from the clean input (``none``, magnitude 1) and one rejected
response per (perturbation kind, magnitude) from the perturbed input (:mod:`mmalign.data.perturb`). Both are
trained on the *clean* video (note §1.5 item 4), so a row holds one ``videos`` entry shared by both responses.
The reference's heuristic filters, each counted under its own reason (checked in this order):

==================  ==================================================================================
reason              skip the pair when
==================  ==================================================================================
empty               either response is empty or blank (the row format refuses empty completions; ours)
identical           chosen == rejected
drop_not_shorter    kind ``drop`` and len(chosen) <= len(rejected) (fewer clips should give a shorter text)
substring           chosen is a substring of rejected
length_ratio        kind ``shuffle``/``reverse`` and one length is > ``max_length_ratio`` (1.5) x the other
missing_video       the video file does not exist (only with ``skip_missing_videos=True``, counted per pair)
==================  ==================================================================================

The reference tests its three conditions in one ``or``; the reasons here split them for the logs, so a pair
failing several is counted once, under the first. Lengths are in characters, as in the reference.

Rows use mmalign's TRL-style pair format: ``{"prompt", "chosen", "rejected", "videos": [path], "perturbation",
"magnitude", "video_id"}``; the prompt is a caption instruction drawn (seeded, per row) from
:data:`CAPTION_INSTRUCTIONS`, six paraphrases in the spirit of the reference's list, not its wording. The reference
prefixes ``<video>`` (ms-swift's placeholder); here ``video_token`` is empty by default and the video adapter places
the video. The reference's MiMo-VL post-processing is :func:`clean_response`.

Curriculum (:func:`magnitude_stages`): one DPO stage per magnitude, easy -> hard (16, 8, 4, 2: larger m damages
the input more, so the pair is easier to tell apart; the ordering's meaning is inferred in the note, the order
itself is the reference's scripts). Each stage trains only on its own magnitude's pairs (all kinds mixed), and
from the second stage on the LoRA adapter is merged and the reference re-anchored to the current policy, which
is what the reference's merge-then-new-LoRA chain amounts to (note §1.3, inferred from ms-swift behaviour).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pairs import write_jsonl
from .perturb import PERTURBATIONS
from .rows import DataError, load_rows

CAPTION_INSTRUCTIONS = (
    "Give a detailed description of this video.",
    "Describe what happens in the video, in the order it happens.",
    "List the events of the video one after another, from first to last.",
    "Summarise the main actions shown in the video, from beginning to end.",
    "Explain how the scene changes over the course of the video.",
    "Walk through the video's events from its first moment to its last.",
)
SKIP_REASONS = ("empty", "identical", "drop_not_shorter", "substring", "length_ratio", "missing_video")
REJECTED_KINDS = tuple(k for k in PERTURBATIONS if k != "none")
TEMPLE_MAGNITUDES = (16, 8, 4, 2)
_SPLIT = re.compile(r"(?:^|_)(" + "|".join(PERTURBATIONS) + r")_(\d+)(?:_|$)")
_OPENINGS = ("the video opens", "the video starts", "the video begins")


@dataclass
class VideoResponses:
    """One video's responses: ``chosen`` from the clean input, ``rejected[(kind, magnitude)]`` from perturbed ones.

    ``rejected`` keys may also be strings ``"drop_16"`` or the reference's split names
    (``"caption_caption_drop_16_False_False"``); they are normalised to ``(kind, magnitude)``."""

    video: str
    chosen: str
    rejected: dict[tuple[str, int], str] = field(default_factory=dict)
    video_id: str | None = None

    def __post_init__(self) -> None:
        self.video = str(self.video)
        self.rejected = {parse_split(k): v for k, v in self.rejected.items()}
        if self.video_id is None:
            self.video_id = Path(self.video).stem


def parse_split(key: str | tuple[str, int]) -> tuple[str, int]:
    """``(kind, magnitude)`` from ``("drop", 16)``, ``"drop_16"`` or ``"caption_caption_drop_16_False_False"``."""
    if isinstance(key, tuple) and len(key) == 2:
        kind, mag = key
    else:
        m = _SPLIT.search(str(key))
        if m is None:
            raise ValueError(f"rejected key {key!r} names no perturbation; fix: use (kind, magnitude) or "
                             f"'<kind>_<magnitude>' with kind in {list(REJECTED_KINDS)}, e.g. 'drop_16'")
        kind, mag = m.group(1), int(m.group(2))
    if kind not in REJECTED_KINDS:
        raise ValueError(f"rejected key {key!r}: kind {kind!r} is not one of {list(REJECTED_KINDS)} (the clean "
                         "'none' response is the chosen one, not a rejected one)")
    if isinstance(mag, bool) or not isinstance(mag, int) or mag < 1:
        raise ValueError(f"rejected key {key!r}: magnitude {mag!r} must be an int >= 1")
    return kind, mag


def clean_response(text: str, *, keep_from_opening: bool = False) -> str | None:
    """The reference's response post-processing: drop everything up to the last ``</think>``; with
    ``keep_from_opening`` (its MiMo-VL branch) keep the text from the last "The video opens/starts/begins" and
    remove parentheticals mentioning "caption". ``None`` when no such opening is found (the reference's "N/A")."""
    text = text.split("</think>")[-1].strip()
    if not keep_from_opening:
        return text
    start = max(text.lower().rfind(s) for s in _OPENINGS)
    if start == -1:
        return None
    return re.sub(r"\([^()]*aption[^()]*\)", "", text[start:]).strip()


def _skip_reason(chosen: str, rejected: str, kind: str, max_ratio: float) -> str | None:
    if not chosen.strip() or not rejected.strip():
        return "empty"
    if chosen == rejected:
        return "identical"
    if kind == "drop" and len(chosen) <= len(rejected):
        return "drop_not_shorter"
    if chosen in rejected:
        return "substring"
    if kind in ("shuffle", "reverse") and (len(chosen) > max_ratio * len(rejected)
                                          or len(rejected) > max_ratio * len(chosen)):
        return "length_ratio"
    return None


def _as_responses(item: VideoResponses | Mapping, i: int) -> VideoResponses:
    if isinstance(item, VideoResponses):
        return item
    if not isinstance(item, Mapping):
        raise DataError(f"video {i}: expected VideoResponses or a mapping, got {type(item).__name__}")
    missing = [k for k in ("video", "chosen", "rejected") if k not in item]
    if missing:
        raise DataError(f"video {i}: missing field(s) {missing} (has {sorted(item)}); fix: give 'video' (path), "
                        "'chosen' (clean response) and 'rejected' ({'drop_16': text, ...})")
    if not isinstance(item["chosen"], str) or not isinstance(item["rejected"], Mapping):
        raise DataError(f"video {i} ({item['video']}): 'chosen' must be a string and 'rejected' a mapping "
                        f"(kind_magnitude -> text), got {type(item['chosen']).__name__} and "
                        f"{type(item['rejected']).__name__}")
    return VideoResponses(item["video"], item["chosen"], dict(item["rejected"]), item.get("video_id"))


def build_temple_pairs(videos: Iterable[VideoResponses | Mapping], *, seed: int = 0,
                       instructions: Sequence[str] = CAPTION_INSTRUCTIONS, video_token: str = "",
                       max_length_ratio: float = 1.5, check_videos: bool = True, skip_missing_videos: bool = False,
                       base_dir: str | Path | None = None) -> tuple[list[dict], dict[str, int]]:
    """TEMPLE preference rows, one per kept (video, kind, magnitude), and counts.

    Args:
        videos: :class:`VideoResponses` or mappings ``{video, chosen, rejected, video_id?}``.
        seed: the instruction of a row is drawn from ``random.Random(f"{seed}|{video_id}|{kind}|{m}")``, so it
            does not depend on the order or number of other rows.
        video_token: text put before the instruction (ms-swift: ``"<video>"``).
        check_videos: check that each video file exists (relative paths: against ``base_dir`` or the cwd).
        skip_missing_videos: skip and count videos whose file is missing instead of raising (the reference skips).

    Returns:
        ``(rows, stats)``: rows in input order (kinds and magnitudes sorted within a video); stats ``videos``,
        ``pairs``, ``skip_<reason>`` for every reason in :data:`SKIP_REASONS`, ``pairs_<kind>_<m>``.

    Raises:
        DataError: a malformed entry, or a missing video file (unless ``skip_missing_videos``).
    """
    if not instructions:
        raise ValueError("instructions is empty; give at least one caption instruction")
    if not max_length_ratio >= 1:
        raise ValueError(f"max_length_ratio={max_length_ratio!r} must be >= 1 (the reference uses 1.5)")
    stats: Counter = Counter({f"skip_{r}": 0 for r in SKIP_REASONS})
    rows: list[dict] = []
    base = Path(base_dir) if base_dir is not None else None
    for i, item in enumerate(videos):
        vr = _as_responses(item, i)
        stats["videos"] += 1
        if check_videos:
            p = Path(vr.video)
            p = base / p if base is not None and not p.is_absolute() else p
            if not p.is_file():
                if skip_missing_videos:
                    stats["skip_missing_video"] += len(vr.rejected)
                    continue
                raise DataError(f"video {i} ({vr.video_id}): video file {p} does not exist; fix: correct the path, "
                                "pass base_dir=<folder the paths are relative to>, or skip_missing_videos=True")
        for (kind, mag), rejected in sorted(vr.rejected.items()):
            if not isinstance(rejected, str):
                raise DataError(f"video {i} ({vr.video_id}): rejected response for {kind}_{mag} is a "
                                f"{type(rejected).__name__}, not a string; fix: give the generated text")
            reason = _skip_reason(vr.chosen, rejected, kind, max_length_ratio)
            if reason is not None:
                stats[f"skip_{reason}"] += 1
                continue
            instr = random.Random(f"{seed}|{vr.video_id}|{kind}|{mag}").choice(list(instructions))
            rows.append({"prompt": video_token + instr, "chosen": vr.chosen, "rejected": rejected,
                         "videos": [vr.video], "perturbation": kind, "magnitude": mag, "video_id": vr.video_id})
            stats[f"pairs_{kind}_{mag}"] += 1
    stats["pairs"] = len(rows)
    return rows, dict(stats)


def collect_responses(rows: Iterable[Mapping]) -> list[VideoResponses]:
    """Group generation rows ``{video, perturbation, magnitude, response, video_id?}`` into
    :class:`VideoResponses` (the clean ``none`` row is the chosen one), in order of first appearance.

    Raises:
        DataError: a video without its ``none`` response, two responses for one (video, kind, magnitude), or a
        row missing a field.
    """
    by_video: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(rows, start=1):
        missing = [k for k in ("video", "perturbation", "magnitude", "response") if k not in row]
        if missing:
            raise DataError(f"response row {n}: missing field(s) {missing}; fix: write each generated response as "
                            "{video, perturbation, magnitude, response}")
        vid = str(row.get("video_id") or Path(str(row["video"])).stem)
        entry = by_video.setdefault(vid, {"video": str(row["video"]), "chosen": None, "rejected": {}})
        if row["perturbation"] == "none":
            key: Any = "none"
        else:
            try:
                key = parse_split((row["perturbation"], row["magnitude"]))
            except ValueError as e:
                raise DataError(f"response row {n} (video {vid}): {e}") from e
        if (key == "none" and entry["chosen"] is not None) or key in entry["rejected"]:
            raise DataError(f"response row {n}: a second {key} response for video {vid}; fix: keep one response "
                            "per (video, perturbation, magnitude)")
        if key == "none":
            entry["chosen"] = row["response"]
        else:
            entry["rejected"][key] = row["response"]
    out = []
    for vid, e in by_video.items():
        if e["chosen"] is None:
            raise DataError(f"video {vid} ({e['video']}): no clean ('none') response to use as chosen; fix: "
                            "generate it from the unperturbed input")
        out.append(VideoResponses(e["video"], e["chosen"], e["rejected"], vid))
    return out


def _rows_by_magnitude(source: Mapping[int, Sequence[Mapping]] | str | Path) -> dict[int, list[dict]]:
    if isinstance(source, Mapping):
        return {int(m): [dict(r) for r in rows] for m, rows in source.items()}
    grouped: dict[int, list[dict]] = {}
    for file, n, row in load_rows(Path(source)):
        m = row.get("magnitude")
        if isinstance(m, bool) or not isinstance(m, int):
            raise DataError(f"{file} row {n}: field 'magnitude' is {m!r}; a TEMPLE stage split needs an int "
                            "magnitude per pair (write the pairs with build_temple_pairs)")
        grouped.setdefault(m, []).append(row)
    return grouped


def magnitude_stages(source: Mapping[int, Sequence[Mapping]] | str | Path, out_dir: str | Path,
                     magnitudes: Sequence[int] = TEMPLE_MAGNITUDES, *, prefix: str = "temple",
                     epochs: float | None = 1.0, max_steps: int | None = None) -> list[dict]:
    """Write one pairs file per magnitude into ``out_dir`` and return the run's ``stages:`` list.

    Args:
        source: ``{magnitude: rows}`` or a pairs file whose rows carry ``magnitude``.
        magnitudes: the stage order (TEMPLE: 16, 8, 4, 2 = easy -> hard); rows of other magnitudes are left out.
        epochs / max_steps: per stage (TEMPLE: one epoch per stage); ``None`` leaves the key out (run default).

    Returns:
        :class:`~mmalign.schema.StageConfig` mappings ``{name: <prefix>_r<m>, train: [<out_dir>/<prefix>_r<m>.jsonl],
        reanchor_reference, merge_lora, epochs?, max_steps?}``; the two flags are false for the first stage and
        true from the second on.

    Raises:
        DataError: a magnitude with no pairs. ValueError: bad ``magnitudes``.
    """
    mags = list(magnitudes)
    if not mags or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mags):
        raise ValueError(f"magnitudes={magnitudes!r} must be a non-empty list of ints >= 1, e.g. (16, 8, 4, 2)")
    if len(set(mags)) != len(mags):
        raise ValueError(f"magnitudes={magnitudes!r} repeats a value; each magnitude is one stage")
    grouped = _rows_by_magnitude(source)
    empty = [m for m in mags if not grouped.get(m)]
    if empty:
        have = {m: len(r) for m, r in sorted(grouped.items())}
        raise DataError(f"no pairs for magnitude(s) {empty} (pairs per magnitude: {have}); "
                        "fix: generate rejected responses at those magnitudes, or drop them from magnitudes=")
    out = Path(out_dir)
    stages = []
    for s, m in enumerate(mags):
        file = write_jsonl(grouped[m], out / f"{prefix}_r{m}.jsonl")
        entry: dict[str, Any] = {"name": f"{prefix}_r{m}", "train": [str(file)],
                                 "reanchor_reference": s > 0, "merge_lora": s > 0}
        if epochs is not None:
            entry["epochs"] = float(epochs)
        if max_steps is not None:
            entry["max_steps"] = int(max_steps)
        stages.append(entry)
    return stages
