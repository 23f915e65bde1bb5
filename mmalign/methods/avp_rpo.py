"""AVP-RPO: AVP-ranked preference optimisation of a video-to-audio generator, as a recipe of the v2a task.

**MultiSoundGen-style, not a reproduction** (Yang et al., arXiv 2509.19999): the paper publishes no code, reward
formula, K, margins or β (research/video_audio_clip_prior.md §2.1); this follows the note's §2.2 design [inferred].
One round per stage (``stages:``; a run without stages is one round):

1. **Generate** (:meth:`AVPRPOTask.generate_round`): for each training video, K audios from the current policy with
   K seeds (seeded per round), with the inference sampler — Euler flow steps and classifier-free guidance by the
   learned null condition (:func:`mmalign.sample.v2a.euler_sample`; ``options.guidance_scale``/``steps`` default to
   ``v2a.guidance_scale``/``v2a.steps``, i.e. the same CFG as at inference). All videos × K candidates are sampled
   in batches of ``generation_batch_size``, and each wave is cached on disk keyed by (hash of the policy weights and
   sampler settings, video content, seed) (:class:`~mmalign.data.avp_pairs.CandidateCache`): a resumed round
   reads what exists and generates only what is missing.
2. **Score** with the frozen SF-CAVP-style reward model (:func:`mmalign.adapters.av.cavp_scores`):
   r = w_s·cos(slow) + w_f·mean_t cos(fast_t) (+ w_q·quality, an optional audio-quality term: ``quality_fn``
   ``"module:function"`` ``f(waves [N, K, S], sample_rate) -> [N, K]``, default :func:`spectral_clarity`).
   The reward model must not be the evaluation model (§2.7): evaluate with an independently trained encoder.
3. **Pair** (:func:`mmalign.data.avp_pairs.round_examples`): best vs worst, every pair above a margin, or the full
   ranking; pairs never cross videos and chosen has the higher reward (§2.8).
4. **Train** with flow DPO on the v2a family's scores (``logps = −c·velocity MSE`` with noise and flow time shared by
   an example's candidates, :mod:`mmalign.adapters.v2a`): L = −log σ(−β/2·[Δ_θ(a_w) − Δ_θ(a_l)]) (§2.2), averaged
   over each video's pairs; ``pairing: ranking`` uses Plackett–Luce on the same log-ratios (K = 2 is the DPO loss).
5. **Iterate**: the next stage regenerates with the updated policy and re-ranks; set ``reanchor_reference: true``
   on stages after the first so the reference is the policy that generated the round (§2.2 step 4).

Deviations / choices: training examples never use the null condition (``null_condition_probability`` is for
pre-training; a preference for the video-matched audio means nothing without the video). Candidates are made on the
stage's first batch, not at setup, so a resume first restores the round's recorded model hash and then reads the
cache. With several processes, each generates the whole round (same seeds, so the same data; the cache files are
written atomically) [multi-process untested].
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import losses as L
from ..config import ConfigError, from_dict
from ..data.avp_pairs import PAIRINGS, CandidateCache, RoundDataset, round_examples, video_key
from ..hashing import model_hash
from ..schema import StageConfig, TrainConfig
from ..types import Scores
from .task import StageData
from .v2a import V2ATask

__all__ = ["AVPRPOOptions", "AVPRPOTask", "load_videos", "parse_options", "spectral_clarity"]

log = logging.getLogger(__name__)


@dataclass
class AVPRPOOptions:
    """``options:`` of an ``avp_rpo`` run (``modality: v2a``)."""

    reward_model: str | None = None  # an SF-CAVP directory (a modality=av run's final/)
    num_candidates: int = 4  # K audios per video and round
    pairing: str = "best_worst"  # best_worst | margin | ranking
    margin: float = 0.0  # a pair needs a reward gap > margin
    max_pairs_per_video: int | None = None  # pairing=margin: keep the largest gaps only
    slow_weight: float = 1.0
    fast_weight: float = 1.0
    quality_weight: float = 0.0
    quality_fn: str = "mmalign.methods.avp_rpo:spectral_clarity"
    guidance_scale: float | None = None  # None: v2a.guidance_scale (the inference CFG)
    steps: int | None = None  # None: v2a.steps
    generation_batch_size: int = 32  # candidates per sampler batch
    cache: bool = True
    cache_dir: str | None = None  # None: <run.output_dir>/avp_cache


def parse_options(cfg: TrainConfig) -> AVPRPOOptions:
    opts = from_dict(AVPRPOOptions, dict(cfg.options), source="options")
    errors = []
    if not opts.reward_model:
        errors.append("options.reward_model is required: the directory of a trained SF-CAVP model (the final/ of a "
                      "modality=av run, or mmalign.models.cavp.save_sf_cavp)")
    elif not (Path(opts.reward_model) / "sf_cavp_config.json").is_file():
        errors.append(f"options.reward_model={opts.reward_model!r} has no sf_cavp_config.json; fix: point to the "
                      "final/ folder of a modality=av run")
    if opts.num_candidates < 2:
        errors.append(f"options.num_candidates={opts.num_candidates} must be >= 2 (a ranking needs two audios)")
    if opts.pairing not in PAIRINGS:
        errors.append(f"options.pairing={opts.pairing!r} must be one of {list(PAIRINGS)}")
    if not (math.isfinite(opts.margin) and opts.margin >= 0):
        errors.append(f"options.margin={opts.margin} must be a finite number >= 0")
    if opts.max_pairs_per_video is not None and opts.max_pairs_per_video < 1:
        errors.append(f"options.max_pairs_per_video={opts.max_pairs_per_video} must be >= 1 or null")
    for name in ("slow_weight", "fast_weight", "quality_weight"):
        v = getattr(opts, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            errors.append(f"options.{name}={v!r} must be a finite number >= 0")
    if opts.slow_weight + opts.fast_weight == 0:
        errors.append("options.slow_weight and fast_weight are both 0: the reward would ignore the video")
    if opts.steps is not None and opts.steps < 1:
        errors.append(f"options.steps={opts.steps} must be >= 1")
    if opts.generation_batch_size < 1:
        errors.append(f"options.generation_batch_size={opts.generation_batch_size} must be >= 1")
    if errors:
        raise ConfigError(errors)
    return opts


def spectral_clarity(waves: Tensor, sample_rate: int) -> Tensor:
    """A cheap audio-quality proxy ``[N, K]`` in [0, 1]: 1 − the spectral flatness (geometric / arithmetic mean of
    the power spectrum) averaged over the frames with energy — tonal, clean audio → ~1, noise → ~0. A stand-in for
    the learned quality scores the paper alludes to (PANNs/PaSST/Audiobox-aesthetics, §2.2) [inferred]."""
    n, k, s = waves.shape
    x = waves.reshape(n * k, s).float()
    n_fft = min(512, 1 << (max(16, s // 4).bit_length() - 1))
    spec = torch.stft(x, n_fft, hop_length=n_fft // 2, window=torch.hann_window(n_fft), return_complex=True)
    power = spec.abs().pow(2) + 1e-10  # [NK, F, T]
    flat = power.log().mean(1).exp() / power.mean(1)  # [NK, T]
    energy = power.mean(1)
    active = energy > energy.amax(1, keepdim=True) * 1e-3
    clarity = ((1 - flat) * active).sum(1) / active.sum(1).clamp_min(1)
    return clarity.reshape(n, k)


def load_videos(sources, *, limit: int | None = None) -> tuple[list[Path], list[dict]]:
    """The ``video`` of every row (any v2a row format, or rows with a ``video`` only); paths relative to the working
    directory or to the data file's folder. Missing videos are one DataError listing them."""
    from ..data.row_files import RowProblem, load_rows
    from ..data.rows import DataError

    paths, meta, problems = [], [], []
    for file, number, row in load_rows(sources, limit=limit):
        value = row.get("video")
        p = Path(str(value)).expanduser() if isinstance(value, str) and value else None
        if p is not None and not p.is_absolute() and not p.exists() and (Path(file).parent / p).exists():
            p = Path(file).parent / p
        if p is None or not p.is_file():
            problems.append(RowProblem(file, number, "missing_file", "video", value, "is not a video file",
                                       "give every row a 'video' path that exists"))
            continue
        paths.append(p)
        meta.append({"file": file, "row": number, "video": str(p)})
    if problems:
        raise DataError.from_problems(problems)
    if not paths:
        raise DataError(f"{sources}: no rows with a 'video'; fix: AVP-RPO reads the 'video' of each row")
    return paths, meta


class AVPRPOTask(V2ATask):
    """The ``avp_rpo`` row (module docstring): the v2a task + per-round generation, ranking and pair data."""

    @classmethod
    def check(cls, cfg: TrainConfig, uses) -> list[str]:
        errors = []
        try:
            parse_options(cfg)
        except ConfigError as e:
            errors += e.errors
        if cfg.reference.strategy in ("precomputed", "none"):
            errors.append(f"reference.strategy={cfg.reference.strategy}: avp_rpo scores freshly generated audio "
                          "every round; use auto, copy or adapter (LoRA)")
        if cfg.data.eval:
            errors.append("data.eval: avp_rpo has no fixed eval pairs (each round makes its own); leave data.eval "
                          "empty and evaluate samples with an independent encoder (mmalign demo v2a shows how)")
        if cfg.loss.sft_weight:
            errors.append(f"loss.sft_weight={cfg.loss.sft_weight}: not supported by avp_rpo; set it to 0")
        return errors

    def __init__(self, cfg: TrainConfig, *, components=None):
        super().__init__(cfg, components=components)
        from ..models.cavp import load_sf_cavp

        self.options = parse_options(cfg)
        self.reward_model = load_sf_cavp(self.options.reward_model).eval().requires_grad_(False)
        if self.options.quality_weight:
            from ..registry import resolve

            self._quality = resolve(self.options.quality_fn)
        root = None
        if self.options.cache:
            root = self.options.cache_dir or str(Path(cfg.run.output_dir) / "avp_cache")
        self.cache = CandidateCache(root)
        self.generated = 0  # candidates sampled by this task (cache misses); tests count them
        self.round_stats: dict[int, dict] = {}
        self._round_models: dict[int, str] = {}  # round -> the generation key its candidates were made with
        self._round = 0
        self._datasets: dict[int, RoundDataset] = {}
        self._videos: tuple | None = None
        media = self.reward_model.media
        if abs(media.clip_seconds - self.components.spec.duration) > 1e-6:
            log.warning("the reward model scores %.3g s clips, the generator makes %.3g s: cavp_scores crops or "
                        "pads the audio to the reward's clip", media.clip_seconds, self.components.spec.duration)

    # -- rounds ----------------------------------------------------------------------------------------------------
    def configure_stage(self, stage: StageConfig) -> None:
        super().configure_stage(stage)
        stages = self.cfg.stages
        self._round = next((i for i, s in enumerate(stages) if s is stage), None)
        if self._round is None:
            names = [s.name for s in stages]
            self._round = names.index(stage.name) if stage.name in names else 0

    def round_seeds(self, round_idx: int) -> list[int]:
        """The K sampling seeds of a round (the same for every video: candidate k of each video from seed k)."""
        digest = hashlib.sha256(f"avp_rpo:{self.cfg.run.seed}:{round_idx}".encode()).digest()
        base = int.from_bytes(digest[:6], "little")
        return [base + k for k in range(self.options.num_candidates)]

    def sampler_settings(self) -> tuple[int, float]:
        o, vc = self.options, self.cfg.v2a
        return (o.steps or vc.steps, vc.guidance_scale if o.guidance_scale is None else o.guidance_scale)

    def generation_key(self, model: nn.Module) -> str:
        """Hash of the policy weights + sampler settings + the generator's spec (the cache's model key)."""
        steps, scale = self.sampler_settings()
        extra = json.dumps({"steps": steps, "cfg": scale, "spec": asdict(self.components.spec)}, sort_keys=True)
        return hashlib.sha256(f"{model_hash(model)}:{extra}".encode()).hexdigest()

    def _load_frames(self, stage: StageConfig):
        from ..data.v2a import MediaOptions, load_clip_frames

        if self._videos is None:
            paths, meta = load_videos(stage.train or self.cfg.data.train, limit=self.cfg.data.limit)
            gen_opts = self.family.media_options()
            m = self.reward_model.media
            reward_opts = MediaOptions(sample_rate=m.sample_rate, num_samples=m.num_samples, fps=m.fast_fps,
                                       num_frames=m.num_fast, frame_size=max(m.image_size, m.fast_image_size),
                                       backend=self.cfg.v2a.video_backend)
            frames = [load_clip_frames(p, gen_opts) for p in paths]
            reward_frames = [load_clip_frames(p, reward_opts) for p in paths]
            self._videos = (frames, reward_frames, meta, [video_key(f) for f in reward_frames])
        return self._videos

    def stage_data(self, stage: StageConfig) -> StageData:
        from ..data.noise import NoiseSampler

        frames, reward_frames, meta, keys = self._load_frames(stage)
        vc, s, r = self.cfg.v2a, self.components.spec, self._round
        sigmas = torch.linspace(1.0, 1.0 / 1000, 1000)  # the v2a family's training σ grid (t = 1 − σ)
        sampler = NoiseSampler(latent_shape=s.latent_shape, seed=self.cfg.run.seed + 7 * r, flow=True,
                               flow_sigmas=sigmas, flow_timesteps=sigmas * 1000, weighting_scheme=vc.weighting_scheme,
                               logit_mean=vc.logit_mean, logit_std=vc.logit_std,
                               vae_sample=vc.vae_sample and s.latent == "vae", fixed=vc.noise == "fixed")
        ds = RoundDataset(frames, meta, sampler, lambda: self.materialize(r))
        self._datasets[r] = ds
        stats = {"videos": len(frames), "candidates_per_video": self.options.num_candidates, "round": r}
        return StageData(train=ds, collate=ds.collate, stats=stats, key=f"avp_rpo:{r}")

    def materialize(self, round_idx: int):
        """Generate (or read from the cache), score and pair the round's candidates with the current policy."""
        frames, reward_frames, _, keys = self._videos
        current = self.generation_key(self.model)
        gen_key = self._round_models.get(round_idx, current)
        waves = self.generate_round(self.model, torch.stack(frames), keys, self.round_seeds(round_idx), gen_key,
                                    allow=gen_key == current)
        self._round_models[round_idx] = gen_key
        rewards = self.reward(torch.stack(reward_frames), waves)
        o = self.options
        examples = round_examples(rewards, pairing=o.pairing, margin=o.margin,
                                  max_pairs_per_video=o.max_pairs_per_video)
        n_pairs = sum(len(e.pairs) for e in examples)
        self.round_stats[round_idx] = {"reward_mean": float(rewards.mean()),
                                       "reward_best": float(rewards.amax(1).mean()), "pairs": n_pairs,
                                       "videos_without_pair": sum(not e.pairs for e in examples)}
        log.info("avp_rpo round %d: %s", round_idx, self.round_stats[round_idx])
        return waves, examples

    @torch.no_grad()
    def generate_round(self, model: nn.Module, frames: Tensor, keys: list[str], seeds: list[int], gen_key: str, *,
                       allow: bool = True) -> Tensor:
        """Waves ``[V, K, S]``: cached entries read, the missing ones sampled in batches across videos × seeds.
        ``allow=False``: the round's recorded model is not the current one (a resume), so a missing entry is sampled
        with the current weights after a warning."""
        from ..sample.v2a import euler_sample

        v, k = len(keys), len(seeds)
        out: list[list[Tensor | None]] = [[self.cache.get(gen_key, keys[i], s) for s in seeds] for i in range(v)]
        todo = [(i, j) for i in range(v) for j in range(k) if out[i][j] is None]
        if todo and not allow:
            log.warning("avp_rpo: %d cached candidates of this round are missing; sampling them with the restored "
                        "weights (not bit-identical to the interrupted round)", len(todo))
        if todo:
            net = getattr(model, "module", model)
            device = next(net.parameters()).device
            was = net.training
            net.eval()
            steps, scale = self.sampler_settings()
            shape = self.components.spec.latent_shape
            features = self.components.encode_frames(frames.to(device))
            bs = self.options.generation_batch_size
            for start in range(0, len(todo), bs):
                chunk = todo[start:start + bs]
                noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(seeds[j])))
                                     for _, j in chunk]).to(device)
                feats = features[torch.tensor([i for i, _ in chunk], device=device)]
                latents = euler_sample(net, feats, noise, steps=steps, guidance_scale=scale)
                for (i, j), wave in zip(chunk, self.components.decode(latents).cpu(), strict=True):
                    out[i][j] = wave
                    self.cache.put(gen_key, keys[i], seeds[j], wave)
                self.generated += len(chunk)
            net.train(was)
        return torch.stack([torch.stack(row) for row in out])

    @torch.no_grad()
    def reward(self, reward_frames: Tensor, waves: Tensor) -> Tensor:
        """``[V, K]`` rewards: SF-CAVP slow/fast cosines (+ the quality term)."""
        from ..adapters.av import cavp_scores

        o = self.options
        dev = next(self.model.parameters()).device
        self.reward_model.to(dev)
        r = cavp_scores(self.reward_model, reward_frames, waves, sample_rate=self.components.spec.sample_rate,
                        weights=(o.slow_weight, o.fast_weight))
        if o.quality_weight:
            r = r + o.quality_weight * torch.as_tensor(self._quality(waves, self.components.spec.sample_rate)).float()
        return r

    # -- loss ------------------------------------------------------------------------------------------------------
    def loss(self, policy: Scores, reference: Scores | None, batch, aux: Scores | None = None):
        policy = self.family.finish_scores(policy, reference, self.method)
        ex = batch.extras
        pairs, pmask = ex["pairs"].long(), ex["pair_mask"].float()
        has = (pmask.sum(1) > 0).float()
        kw = dict(self.loss_kwargs)
        if self.options.pairing == "ranking":
            from .table import ranking_order

            order = ranking_order(batch.labels, batch.candidate_mask)
            out = L.plackett_luce(policy.logps - reference.logps, order, candidate_mask=batch.candidate_mask,
                                  beta=float(kw["beta"]), sample_weight=has)
        else:
            def side(scores: Tensor, col: int) -> Tensor:
                return scores.gather(1, pairs[..., col]).flatten()

            lw, ll = side(policy.logps, 0), side(policy.logps, 1)
            rw, rl = side(reference.logps, 0), side(reference.logps, 1)
            ones = torch.ones_like(lw)
            out = L.dpo(lw, ll, rw, rl, chosen_lengths=ones, rejected_lengths=ones, sample_weight=pmask.flatten(),
                        **kw)
        rewards = ex["rewards"]
        chosen = rewards.gather(1, pairs[..., 0])
        rejected = rewards.gather(1, pairs[..., 1])
        denom = pmask.sum().clamp_min(1)
        out.metrics.update({"avp/reward_chosen": (chosen * pmask).sum() / denom,
                            "avp/reward_rejected": (rejected * pmask).sum() / denom,
                            "avp/pairs": pmask.sum(), "avp/round": torch.tensor(float(self._round))})
        stats = self.round_stats.get(self._round, {})
        out.metrics.update({f"avp/round_{k}": torch.tensor(float(v)) for k, v in stats.items()})
        out.metrics = {k: torch.as_tensor(v).detach().float() for k, v in out.metrics.items()}
        self.family.add_metrics(out, policy, reference, batch, self.method, self.loss_kwargs)
        return out

    # -- recipe state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"round_models": dict(self._round_models)}

    def load_state_dict(self, state: dict) -> None:
        """A resumed round reads its candidates from the cache under the model they were generated with."""
        self._round_models = {int(k): v for k, v in state.get("round_models", {}).items()}
        for r, ds in self._datasets.items():
            if r in self._round_models:
                ds.reset()

    def save_pretrained(self, model: nn.Module, path, state_dict: dict | None = None) -> None:
        self.family.save(model, path, state_dict=state_dict,
                         info={"method": "avp_rpo", "avp_rpo": asdict(self.options),
                               "beta_convention": self.family.convention, "rounds": self.round_stats})
