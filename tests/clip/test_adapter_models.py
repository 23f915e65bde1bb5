"""The contrastive adapter and CLIP builders: open_clip loss parity through the adapter, transformers CLIPModel,
normalisation flag, saving and loading checkpoints the way users do, and the distributed-loss arithmetic."""

from __future__ import annotations

import pytest
import torch
from open_clip.loss import ClipLoss, SigLipLoss

from mmalign.adapters.contrastive import (
    encode_images,
    gather_features,
    score_contrastive,
)
from mmalign.config import ConfigError
from mmalign.data.batches import ImageTextBatch
from mmalign.losses import clip_contrastive, siglip
from mmalign.methods.clip_losses import local_clip_loss, siglip_term
from mmalign.models.clip import load_clip, save_clip
from mmalign.types import Scores


def _batch(bundle, n=8, seed=0) -> ImageTextBatch:
    from mmalign.data.synthetic_images import make_samples, render

    samples = make_samples(n, seed=seed)
    ids, mask = bundle.tokenizer([s.captions()[0] for s in samples])
    return ImageTextBatch(torch.stack([bundle.transform(render(s)) for s in samples]), ids, mask)


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_clip_loss_parity_with_open_clip_through_adapter(tiny_bundle):
    """Adapter + clip_contrastive == the model's own forward + open_clip ClipLoss: loss and every parameter grad."""
    model, batch = tiny_bundle.model, _batch(tiny_bundle)
    s = score_contrastive(model, batch)
    ours = clip_contrastive(s.embeddings["image"], s.embeddings["text"], s.extras["logit_scale"])
    ours.loss.backward()
    g_ours = _grads(model)
    model.output_dict = True
    out = model(batch.pixel_values, batch.input_ids)
    ref = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    ref.backward()
    g_ref = _grads(model)
    assert torch.allclose(ours.loss, ref, atol=1e-6)
    assert g_ours.keys() == g_ref.keys() and "logit_scale" in g_ours
    for name in g_ref:
        assert torch.allclose(g_ours[name], g_ref[name], atol=1e-6, rtol=1e-4), name
    assert s.logps.shape == (8, 1) and not s.logps.requires_grad


def test_siglip_parity_with_open_clip_through_adapter():
    bundle = load_clip("tiny", init_logit_bias=-10.0)
    batch = _batch(bundle, 6)
    s = score_contrastive(bundle.model, batch)
    assert s.extras["logit_bias"].item() == -10.0
    ours = siglip(s.embeddings["image"], s.embeddings["text"], s.extras["logit_scale"], s.extras["logit_bias"])
    bundle.model.output_dict = True
    out = bundle.model(batch.pixel_values, batch.input_ids)
    ref = SigLipLoss()(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    assert torch.allclose(ours.loss, ref, atol=1e-5)


def test_normalisation_flag(tiny_bundle):
    batch = _batch(tiny_bundle, 4)
    raw = score_contrastive(tiny_bundle.model, batch, normalize=False).embeddings["image"]
    unit = score_contrastive(tiny_bundle.model, batch).embeddings["image"]
    assert torch.allclose(raw, tiny_bundle.model.encode_image(batch.pixel_values))
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(4)) and torch.allclose(unit.norm(dim=-1), torch.ones(4))


def test_transformers_clipmodel_adapter():
    bundle = load_clip("tiny-hf")
    model, batch = bundle.model, _batch(bundle, 4)
    s = score_contrastive(model, batch)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    logits = s.extras["logit_scale"] * s.embeddings["image"] @ s.embeddings["text"].T
    assert torch.allclose(logits, out.logits_per_image, atol=1e-5)
    assert "logit_bias" not in s.extras


def test_open_clip_checkpoint_round_trip(tiny_bundle, tmp_path):
    """save_clip writes open_clip's local-dir layout; open_clip itself and load_clip read it back."""
    import open_clip

    save_clip(tiny_bundle, tmp_path / "ckpt")
    batch = _batch(tiny_bundle, 4)
    want = encode_images(tiny_bundle.model, batch.pixel_values)
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'ckpt'}")
    ours = load_clip(str(tmp_path / "ckpt"))
    assert torch.allclose(encode_images(theirs, batch.pixel_values), want, atol=1e-6)
    assert torch.allclose(encode_images(ours.model, batch.pixel_values), want, atol=1e-6)
    tok = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'ckpt'}")
    assert torch.equal(tok(["a red circle"]), ours.tokenizer(["a red circle"])[0])
    assert ours.model_cfg == tiny_bundle.model_cfg and ours.family == "open_clip"


def test_transformers_checkpoint_round_trip(tmp_path):
    from transformers import CLIPImageProcessor, CLIPModel

    bundle = load_clip("tiny-hf", seed=1)
    save_clip(bundle, tmp_path / "hf")
    batch = _batch(bundle, 3)
    want = encode_images(bundle.model, batch.pixel_values)
    assert torch.allclose(encode_images(CLIPModel.from_pretrained(tmp_path / "hf"), batch.pixel_values), want,
                          atol=1e-6)
    again = load_clip(str(tmp_path / "hf"))
    assert torch.allclose(encode_images(again.model, batch.pixel_values), want, atol=1e-6)
    assert again.tokenizer.kind == "open_clip" and again.preprocess_cfg["size"] == 32
    assert CLIPImageProcessor.from_pretrained(tmp_path / "hf").crop_size["height"] == 32


def test_open_clip_config_file_with_checkpoint(tiny_bundle, tmp_path):
    """A custom model config .json + a weights file: the `open_clip.create_model(name, pretrained=file)` path."""
    import json

    save_clip(tiny_bundle, tmp_path / "ckpt")
    (tmp_path / "my-tiny-vit.json").write_text(json.dumps(tiny_bundle.model_cfg))
    b = load_clip(str(tmp_path / "my-tiny-vit.json"), pretrained=str(tmp_path / "ckpt" / "open_clip_model.safetensors"))
    batch = _batch(tiny_bundle, 2)
    assert torch.allclose(encode_images(b.model, batch.pixel_values),
                          encode_images(tiny_bundle.model, batch.pixel_values), atol=1e-6)


def test_bad_model_sources(tmp_path):
    with pytest.raises(ConfigError, match="neither open_clip_config.json"):
        load_clip(str(tmp_path))
    with pytest.raises(ConfigError, match="not 'tiny'/'tiny-hf'"):
        load_clip("no-such-model")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_clip("tiny", tiny={"widht": 3})


def test_gather_is_identity_in_one_process():
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_features(x) is x


def test_local_loss_ranks_average_to_the_global_loss():
    """open_clip local_loss: each rank's B×(world·B) InfoNCE; the mean over ranks equals the global loss."""
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    scale = torch.tensor(7.0)
    glob = clip_contrastive(img, txt, scale, normalize=True).loss
    parts = [local_clip_loss(img[r * 4:(r + 1) * 4], txt[r * 4:(r + 1) * 4], img, txt, scale, r, normalize=True).loss
             for r in range(2)]
    assert torch.allclose(sum(parts) / 2, glob, atol=1e-6)
    one = local_clip_loss(img, txt, img, txt, scale, 0, normalize=True)  # world size 1 == plain loss
    assert torch.allclose(one.loss, glob, atol=1e-6)


def test_distributed_siglip_blocks_average_to_the_global_loss():
    """Rank r: its images against its own texts (positives) + every other rank's texts (negatives only); the mean
    over ranks equals SigLIP over the whole gathered batch (what open_clip's neighbour exchange sums)."""
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    per_rank = []
    for r in range(3):
        sl = slice(2 * r, 2 * r + 2)
        s = Scores(logps=torch.zeros(2, 1), embeddings={"image": img[sl], "text": txt[sl], "text_all": txt},
                   extras={"logit_scale": scale, "logit_bias": bias, "rank": torch.tensor(r)})
        per_rank.append(siglip_term(s, normalize=False).loss)
    assert torch.allclose(sum(per_rank) / 3, siglip(img, txt, scale, bias).loss, atol=1e-6)
