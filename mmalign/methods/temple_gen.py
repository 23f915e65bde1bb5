"""TEMPLE's self-generated responses, caption mode (Li et al., arXiv 2503.16929; research note
``video_audio_clip_prior.md`` §1.2 ``generate_dpo_data.py`` and §1.5).

The released configuration does not feed perturbed pixels to a video LLM: every video is a list of per-clip
captions, and a *text* model is asked to write one chronological caption for the whole video from that list —
once from the clean list (the chosen response) and once per (perturbation, magnitude) from a perturbed list (the
rejected ones). :func:`generate_temple_responses` does exactly that with any causal LM mmalign can load, batched
through :func:`mmalign.sample.text.generate`; :func:`mmalign.data.temple.build_temple_pairs` then filters the
pairs and :func:`mmalign.data.temple.magnitude_stages` turns them into the easy → hard curriculum.

Follows the reference code in: the perturbation operator and its chunk semantics (:mod:`mmalign.data.perturb`),
the clean response as chosen for every perturbed one, sampling (not greedy) decoding. Deviates in: the prompt
wording (paraphrased, one fixed template; :data:`PROMPT` can be replaced), a per-(video, kind, magnitude) seed for
the perturbation (the reference draws from global RNG state), and clips are numbered in the prompt order (after
the perturbation), so numbering reveals nothing about the original order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from ..config import ConfigError
from ..data.perturb import PERTURBATIONS, apply_perturbation
from ..data.rows import DataError
from ..data.temple import TEMPLE_MAGNITUDES, VideoResponses

PROMPT = ("Here are captions of the consecutive clips of a video, in order:\n{clips}\n"
          "Write one paragraph that describes the whole video, its events in chronological order.")


def caption_prompt(captions: Sequence[str], template: str = PROMPT) -> str:
    """The text prompt for one (possibly perturbed) caption list: numbered lines in the given order."""
    return template.format(clips="\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions)))


def _seed(seed: int, video_id: str, kind: str, magnitude: int) -> int:
    # Stable across processes and Python versions (hash() is salted), independent of the video's position.
    digest = hashlib.sha256(f"{seed}|{video_id}|{kind}|{magnitude}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _videos(rows: Sequence[Mapping]) -> list[tuple[str, str, list[str]]]:
    out = []
    for i, row in enumerate(rows):
        caps = row.get("clip_captions")
        if not isinstance(row.get("video"), str):
            raise DataError(f"row {i + 1}: field 'video' is {row.get('video')!r}; give the video file path")
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise DataError(f"row {i + 1} ({row['video']}): field 'clip_captions' must be a non-empty list of "
                            f"non-empty strings (one caption per clip, in order); got {caps!r}")
        out.append((row["video"], str(row.get("video_id") or row["video"]), caps))
    return out


def generate_temple_responses(model, tokenizer, rows: Sequence[Mapping], *,
                              kinds: Sequence[str] = ("drop", "shuffle", "reverse"),
                              magnitudes: Sequence[int] = TEMPLE_MAGNITUDES, seed: int = 0,
                              max_new_tokens: int = 128, temperature: float = 0.7, batch_size: int = 32,
                              chat: bool = False, template: str = PROMPT) -> list[VideoResponses]:
    """One clean and ``len(kinds) × len(magnitudes)`` perturbed responses per video.

    ``rows``: ``{"video": path, "clip_captions": [str, ...], "video_id"?: str}``. Returns
    :class:`~mmalign.data.temple.VideoResponses` ready for :func:`~mmalign.data.temple.build_temple_pairs`.
    Perturbations that leave the caption list unchanged (a shuffle that drew the identity, or one clip) give no
    rejected response: the pair would differ only by sampling noise.
    """
    from ..sample.text import generate

    bad = [k for k in kinds if k not in PERTURBATIONS or k == "none"]
    if bad or any(int(m) < 1 for m in magnitudes):
        raise ConfigError(f"kinds must be among {[k for k in PERTURBATIONS if k != 'none']} and magnitudes >= 1; "
                          f"got kinds={list(kinds)}, magnitudes={list(magnitudes)}")
    videos = _videos(rows)
    prompts, slots = [], []  # slots[i] = (video index, (kind, magnitude) | None for the clean prompt)
    for v, (_, vid, caps) in enumerate(videos):
        prompts.append(caption_prompt(caps, template))
        slots.append((v, None))
        for kind in kinds:
            for m in magnitudes:
                perturbed, idx = apply_perturbation(caps, kind, int(m), seed=_seed(seed, vid, kind, int(m)))
                if list(idx) == list(range(len(caps))):
                    continue
                prompts.append(caption_prompt(perturbed, template))
                slots.append((v, (kind, int(m))))
    samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed, batch_size=batch_size, chat=chat)
    out = [VideoResponses(video=path, chosen="", video_id=vid) for path, vid, _ in videos]
    for (v, key), text in zip(slots, samples.completions, strict=True):
        if key is None:
            out[v].chosen = text
        else:
            out[v].rejected[key] = text
    return out
