"""Text model builders: tiny Llamas, the real-checkpoint loading path, value heads and LoRA.

Real-checkpoint code is exercised by saving tiny models to ``tmp_path`` and loading them back through
:func:`load_causal_lm`, the same path users take for downloaded checkpoints.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mmalign.models.text import (
    ValueHeadModel,
    apply_lora,
    build_tiny_causal_lm,
    load_causal_lm,
    load_tokenizer,
    tiny_llama_config,
)

VOCAB = 300
TINY = dict(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64, initializer_range=0.1)


def _ids(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    return ids, mask


def _logits(model, ids, mask) -> torch.Tensor:
    """Logits at real tokens only: padded query rows are undefined and differ between attention kernels."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in-process (no download)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in "abcdefghijklmnopqrstuvwxyz ":
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_causal_lm(VOCAB, seed=7, **TINY)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_tiny_causal_lm(VOCAB, seed=7, **TINY)
    c = build_tiny_causal_lm(VOCAB, seed=8, **TINY)
    ids, mask = _ids()
    assert torch.equal(_logits(a, ids, mask), _logits(b, ids, mask))
    assert not torch.allclose(_logits(a, ids, mask), _logits(c, ids, mask))
    assert a.config.num_hidden_layers == 2 and a.config.num_key_value_heads == 2
    assert not a.training


def test_tiny_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="hidden_size=30 must be divisible by num_heads=4"):
        tiny_llama_config(VOCAB, hidden_size=30)


def test_save_and_load_roundtrip_same_logits(tmp_path):
    model = build_tiny_causal_lm(VOCAB, **TINY)
    model.save_pretrained(tmp_path)
    _char_tokenizer().save_pretrained(tmp_path)
    loaded = load_causal_lm(tmp_path)
    ids, mask = _ids()
    # The tiny model is built with eager attention and from_pretrained picks sdpa: same weights, other kernel,
    # so logits agree to float32 rounding (1.01e-6 seen under the pinned lock), not bit for bit.
    torch.testing.assert_close(_logits(loaded, ids, mask), _logits(model, ids, mask), atol=1e-5, rtol=0)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "</s>"  # EOS stands in for a pad token
    batch = tokenizer(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_load_bfloat16_and_gradient_checkpointing(tmp_path):
    build_tiny_causal_lm(VOCAB, **TINY).save_pretrained(tmp_path)
    model = load_causal_lm(tmp_path, dtype="bfloat16", gradient_checkpointing=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.use_cache is False
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "no_such_ckpt"
    with pytest.raises(FileNotFoundError, match=f"no checkpoint directory at '{missing}'"):
        load_causal_lm(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="is missing config.json and model weights") as err:
        load_causal_lm(empty)
    assert str(empty) in str(err.value) and "notes.txt" in str(err.value)
    config_only = tmp_path / "config_only"
    tiny_llama_config(VOCAB, **TINY).save_pretrained(config_only)
    with pytest.raises(FileNotFoundError, match="is missing model weights"):
        load_causal_lm(config_only)
    with pytest.raises(NotADirectoryError, match="notes.txt"):
        load_causal_lm(empty / "notes.txt")
    with pytest.raises(ValueError, match=r"dtype='fp8' is not supported; use one of \['bfloat16'"):
        load_causal_lm(config_only, dtype="fp8")


def test_hub_id_offline_error_points_to_local_dirs():
    # conftest sets HF_HUB_OFFLINE=1, so a hub id cannot resolve; the message must say what to do.
    with pytest.raises(OSError, match="pass a local directory"):
        load_causal_lm("mmalign-test/not-a-real-model")


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available(),
    reason="quantised loading is possible on this machine",
)
def test_quantised_loading_without_bitsandbytes_or_cuda_is_a_clear_error(tmp_path):
    build_tiny_causal_lm(VOCAB, **TINY).save_pretrained(tmp_path)
    with pytest.raises((ImportError, RuntimeError), match="bitsandbytes"):
        load_causal_lm(tmp_path, load_in_4bit=True)
    with pytest.raises(ValueError, match="exclusive"):
        load_causal_lm(tmp_path, load_in_4bit=True, load_in_8bit=True)


def _perturb_lora(model, seed: int = 0) -> None:
    """LoRA's B starts at zero (adapter = identity); give it weights so that on/off differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_apply_lora_trainable_set_and_disable_adapter_gives_base_logits():
    base = build_tiny_causal_lm(VOCAB, **TINY)
    ids, mask = _ids()
    base_logits = _logits(base, ids, mask)
    peft_model = apply_lora(base, r=4, alpha=8)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    _perturb_lora(peft_model)
    assert not torch.allclose(_logits(peft_model, ids, mask), base_logits)
    with peft_model.disable_adapter():
        torch.testing.assert_close(_logits(peft_model, ids, mask), base_logits, atol=1e-6, rtol=0)

    only_q = apply_lora(
        build_tiny_causal_lm(VOCAB, **TINY), target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    names = [n for n, p in only_q.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n in names) and not any("k_proj" in n for n in names)
    with pytest.raises(ValueError, match="r=0"):
        apply_lora(build_tiny_causal_lm(VOCAB, **TINY), r=0)


def test_lora_adapter_directory_loads_base_and_adapter(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    build_tiny_causal_lm(VOCAB, **TINY).save_pretrained(base_dir)
    peft_model = apply_lora(load_causal_lm(base_dir), r=4)
    _perturb_lora(peft_model)
    peft_model.save_pretrained(adapter_dir)
    loaded = load_causal_lm(adapter_dir)
    ids, mask = _ids()
    torch.testing.assert_close(_logits(loaded, ids, mask), _logits(peft_model, ids, mask), atol=1e-6, rtol=0)


def test_value_head_roundtrip_and_lora(tmp_path):
    model = load_causal_lm_from_tiny(tmp_path / "base")
    ids, mask = _ids()
    out = model(ids, attention_mask=mask)
    assert out.values.shape == ids.shape and out.logits.shape == (*ids.shape, VOCAB)
    with torch.no_grad():
        model.v_head.weight.add_(1.0)  # make sure the saved head, not a fresh init, is what comes back
    model.save_pretrained(tmp_path / "rm")
    loaded = ValueHeadModel.from_pretrained(tmp_path / "rm")
    real = mask.bool()
    torch.testing.assert_close(
        loaded(ids, attention_mask=mask).values[real], model(ids, attention_mask=mask).values[real]
    )

    lora_rm = apply_lora(loaded, r=4)
    assert isinstance(lora_rm, ValueHeadModel)
    trainable = {n for n, p in lora_rm.named_parameters() if p.requires_grad}
    assert {"v_head.weight", "v_head.bias"} <= trainable
    assert all("lora_" in n or n.startswith("v_head") for n in trainable)


def load_causal_lm_from_tiny(path) -> ValueHeadModel:
    build_tiny_causal_lm(VOCAB, **TINY).save_pretrained(path)
    model = load_causal_lm(path, value_head=True)
    assert isinstance(model, ValueHeadModel)
    return model


def test_bpe_training_cuts_only_overlong_runs(monkeypatch):
    """Runs of more than 256 non-space characters are cut before BPE training (its cost is quadratic in a
    pre-token's length: three 1 MB strings took ~17 minutes; one takes 0.7 s now); ordinary text passes untouched, so a
    corpus without such runs gives exactly the tokenizer it gave before."""
    from mmalign.models.tokenizer import _bounded_runs, train_bpe_tokenizer

    corpus = ["red amber coral gold", "list colors: teal navy", "  spaced   words\tand\nlines "] * 5
    assert _bounded_runs(corpus) == corpus
    pieces = _bounded_runs(["ab " + "z" * 600 + " cd"])
    assert pieces == ["ab ", "z" * 256, "z" * 256, "z" * 88, " cd"]
    plain = train_bpe_tokenizer(corpus, vocab_size=300)
    with_long = train_bpe_tokenizer([*corpus, "q" * 5000], vocab_size=300)
    assert max(len(t) for t in with_long.get_vocab()) <= 256 * 2  # byte-level symbols, at most 2 chars per byte
    import mmalign.models.tokenizer as T

    monkeypatch.setattr(T, "_bounded_runs", list)  # the trainer as it was before the cut
    assert plain.get_vocab() == train_bpe_tokenizer(corpus, vocab_size=300).get_vocab()
