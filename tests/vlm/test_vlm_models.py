"""mmalign/models/vlm.py: tiny models of the four real classes with their real processors built offline, and the
save → ``load_vlm`` round trip a user takes with ``Qwen/Qwen2.5-VL-7B-Instruct`` (full weights and a LoRA
adapter directory), plus the errors for a missing directory, an offline hub id and an unsupported arch."""

from __future__ import annotations

import pytest
import torch

from mmalign.adapters.vlm import score_candidates
from mmalign.adapters.vlm_data import VLMDataset, encode_examples
from mmalign.models.vlm import load_vlm, save_vlm

from ._tiny_vlm import ARCHS, examples, tiny

CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "llava_onevision": "LlavaOnevisionForConditionalGeneration",
           "llava_next_video": "LlavaNextVideoForConditionalGeneration"}


def _scores(model, inputs):
    enc, _ = encode_examples(inputs, examples("both"), max_length=4096)
    ds = VLMDataset(enc, inputs, format="pairs")
    return score_candidates(model, ds.collate([ds[i] for i in range(len(ds))])).logps, enc


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_is_the_real_class_and_round_trips(arch, tmp_path):
    model, inputs = tiny(arch)
    assert type(model).__name__ == CLASSES[arch] and inputs.arch == arch
    tok = inputs.tokenizer
    for token in (["<|im_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>"] if arch.startswith("qwen")
                  else ["<image>", "<video>"]):
        assert token in tok.get_vocab() and token in tok.all_special_tokens, token
    assert inputs.processor.chat_template and type(inputs.processor).__name__.endswith("Processor")
    before, enc = _scores(model, inputs)
    save_vlm(model, inputs, tmp_path / "ckpt")
    loaded, io = load_vlm(tmp_path / "ckpt")  # arch from config.json, processor from the directory
    assert type(loaded).__name__ == CLASSES[arch] and io.arch == arch
    after, enc2 = _scores(loaded, io)
    assert [e.prompt_ids for e in enc] == [e.prompt_ids for e in enc2], "the saved processor tokenises the same"
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_lora_adapter_directory_loads_over_its_base(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, inputs = tiny("qwen2_5_vl")
    save_vlm(model, inputs, tmp_path / "base")
    base, io = load_vlm(tmp_path / "base")
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                           exclude_modules=r".*\.visual\..*"))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_vlm(peft, io, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "config.json").is_file(), "a base on disk: only the adapter is written"
    loaded, io2 = load_vlm(tmp_path / "adapter")
    assert hasattr(loaded, "peft_config") and any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(_scores(loaded.eval(), io2)[0], _scores(peft.eval(), io)[0], rtol=0, atol=1e-6)


def test_load_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_vlm(tmp_path / "missing")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE|local directory"):
        load_vlm("Qwen/Qwen2.5-VL-7B-Instruct")  # offline: the hub id cannot be fetched
    from mmalign.models.text import build_tiny_causal_lm

    build_tiny_causal_lm(300, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=32).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="'llama' is not a supported vision-language arch.*qwen2_5_vl"):
        load_vlm(tmp_path / "llama")
