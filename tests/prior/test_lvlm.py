"""The two LVLM settings of PRIOR: tiny LLaVA (with a vision encoder) and PatchLVLM (without one).

Checks: the caption scorer equals the model's own HF loss (left-padded batch, α = 0 / no weights), save →
load round trips through the user path (``load_lvlm``), LoRA on a tiny base saves merged, placeholder errors.
"""

from __future__ import annotations

import pytest
import torch

from mmalign.adapters.lvlm import score_captions
from mmalign.data.captions import CaptionDataset, read_caption_rows
from mmalign.methods.table import prior_nll
from mmalign.models.lvlm import PatchLVLM, build_tiny_lvlm, load_lvlm, save_lvlm
from mmalign.models.text import apply_lora
from mmalign.models.tokenizer import train_bpe_tokenizer

from ._tiny import TINY, hf_loss, write_rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("lvlm"), n=6)


def _tokenizer():
    from mmalign.demos.prior import CLOSERS, COLOURS, OPENERS, SHAPES

    texts = [f"{o} a {c} {s} {e}" for o in OPENERS for c in COLOURS for s in SHAPES for e in CLOSERS[:1]]
    return train_bpe_tokenizer(texts + ["describe:"], vocab_size=400)


def _batch(data, inputs):
    tok = inputs.tokenizer
    examples, _ = read_caption_rows([data], tok)
    ds = CaptionDataset(examples, pad_token_id=tok.pad_token_id, image_token_id=inputs.image_token_id,
                        num_image_tokens=inputs.num_image_tokens, bos_token_id=tok.bos_token_id,
                        pixel_values=inputs.pixel_values)
    return ds.collate([ds[i] for i in range(len(ds))])


@pytest.mark.parametrize("kind", ["llava", "patch"])
def test_unweighted_loss_equals_hf_loss_and_alpha0_weights_too(kind, data):
    model, inputs = build_tiny_lvlm(kind, _tokenizer(), seed=0, **TINY)
    batch = _batch(data, inputs)
    assert bool((batch.prompt_mask == 0).any()), "the batch must be left-padded to test positions"
    scores = score_captions(model, batch)
    ntp = prior_nll(scores, None, batch, {}).loss
    batch.extras["prior_weights"] = torch.ones_like(batch.completion_ids, dtype=torch.float32) * 0.37
    scaled = prior_nll(scores, None, batch, {"normalize": "batch"}).loss  # constant weights renormalise to 1: NTP again
    hf = hf_loss(model, batch)
    assert abs(ntp.item() - hf.item()) < 1e-6
    assert abs(scaled.item() - hf.item()) < 1e-6


@pytest.mark.parametrize("kind", ["llava", "patch"])
def test_save_and_load_round_trip(kind, data, tmp_path):
    model, inputs = build_tiny_lvlm(kind, _tokenizer(), seed=1, **TINY)
    batch = _batch(data, inputs)
    before = score_captions(model, batch).token_logps
    save_lvlm(model, inputs, tmp_path / "ckpt")
    loaded, io = load_lvlm(tmp_path / "ckpt")
    assert (io.kind, io.num_image_tokens, io.image_token_id) == (kind, inputs.num_image_tokens,
                                                                inputs.image_token_id)
    assert torch.equal(io.pixel_values([_img()]), inputs.pixel_values([_img()]))
    after = score_captions(loaded.eval(), batch).token_logps
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def _img():
    import random

    from mmalign.demos.prior import shape_image

    return shape_image("red", "circle", random.Random(0))


@pytest.mark.parametrize("kind", ["llava", "patch"])
def test_lora_on_a_tiny_base_saves_merged(kind, data, tmp_path):
    model, inputs = build_tiny_lvlm(kind, _tokenizer(), seed=2, **TINY)
    if kind == "patch":
        model.lm = apply_lora(model.lm, r=4, alpha=8)
        lora_params = [p for n, p in model.lm.named_parameters() if "lora_B" in n]
    else:
        model = apply_lora(model, r=4, alpha=8, modules_to_save=["multi_modal_projector"])
        lora_params = [p for n, p in model.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora_params:
            p.normal_(0, 0.05)  # a trained-looking adapter (B starts at 0)
    batch = _batch(data, inputs)
    before = score_captions(model, batch).token_logps
    save_lvlm(model, inputs, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "adapter_config.json").exists()  # merged: the tiny base exists nowhere
    loaded, _ = load_lvlm(tmp_path / "ckpt")
    torch.testing.assert_close(score_captions(loaded, batch).token_logps, before, rtol=1e-4, atol=1e-4)


def test_patch_lvlm_placeholder_count_is_checked():
    model, inputs = build_tiny_lvlm("patch", _tokenizer(), seed=0, **TINY)
    ids = torch.tensor([[inputs.tokenizer.bos_token_id] + [inputs.image_token_id] * 3 + [5, 6]])
    with pytest.raises(ValueError, match="16 <image> placeholders"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"pixel_values .* must be"):
        model.patchify(torch.zeros(1, 3, 8, 8))
    assert isinstance(model, PatchLVLM) and model.num_image_tokens == 16


def test_load_lvlm_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_lvlm(tmp_path / "missing")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "patch_lvlm.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="patch_embed.safetensors"):
        load_lvlm(tmp_path / "p")
    with pytest.raises(OSError, match="as a hub id"):
        load_lvlm("no-such-org/no-such-llava")  # tests run with HF_HUB_OFFLINE=1


def test_extracted_language_model_is_the_lvlms_text_path(tmp_path):
    """``reference_init: lvlm`` starts the reference from the LVLM's own LM: same weights, text-only forward."""
    from mmalign.models.lvlm import extract_language_model
    from mmalign.models.text import load_causal_lm

    model, inputs = build_tiny_lvlm("llava", _tokenizer(), seed=4, **TINY)
    extract_language_model(model).save_pretrained(str(tmp_path / "lm"))
    lm = load_causal_lm(tmp_path / "lm")
    ids = torch.tensor([[inputs.tokenizer.bos_token_id, 40, 41, 42, 43]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits  # no image: LLaVA runs its language model alone
        torch.testing.assert_close(lm(input_ids=ids).logits, expected)
