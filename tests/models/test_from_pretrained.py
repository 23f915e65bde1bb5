"""Training from a checkpoint directory, exactly as a user points mmalign at a downloaded Qwen or Llama model.

A tiny Llama and a tiny Qwen2 (``transformers.Qwen2Config``: attention biases, tied embeddings) are written
with ``save_pretrained`` next to a tokenizer that carries a chat template (Llama-style role tokens; ChatML for
Qwen, as Qwen2.5-Instruct ships). Then the shipped real-model configs run 2 DPO steps through
``mmalign.train`` with ``model.name_or_path=<that directory>`` and only data/size overrides, full fine-tune
and LoRA, and the final directory is reloaded with plain ``transformers`` / ``peft`` and compared with the
trained weights. Conversational rows (``assets/text/pairs_chat.jsonl``) must go through the checkpoint's
chat template.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mmalign.api import build_task, load_train_config, train
from mmalign.data.rows import load_rows
from mmalign.data.synthetic import corpus
from mmalign.models.text import tiny_llama_config
from mmalign.models.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[2]
CHAT_PAIRS = REPO / "assets" / "text" / "pairs_chat.jsonl"

# ChatML as Qwen2-Instruct renders it (default system turn, <|im_start|>role\n...<|im_end|>\n), minus tools.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _texts() -> list[str]:
    return corpus(row for _, _, row in load_rows([REPO / "assets" / "text" / "pairs.jsonl", CHAT_PAIRS]))


def _save_llama(path: Path) -> Path:
    tok = train_bpe_tokenizer(_texts(), vocab_size=320)  # <bos>/<eos>/<pad> and a role-token chat template
    config = tiny_llama_config(len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _save_qwen2(path: Path) -> Path:
    # Qwen2.5-Instruct's special tokens: pad <|endoftext|>, end of turn / EOS <|im_end|>, turns open with
    # <|im_start|>, and no BOS at all (nothing is prepended to plain text).
    tok = train_bpe_tokenizer(_texts(), vocab_size=320, chat_template=CHATML,
                              special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"))
    tok.backend_tokenizer.post_processor = None
    tok.bos_token = None
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {"llama": _save_llama(root / "tiny-llama"), "qwen2": _save_qwen2(root / "tiny-qwen2")}


def _overrides(ckpt: Path, out: Path) -> list[str]:
    """What a user changes on the command line: the checkpoint and data paths, plus test-size settings."""
    return [f"model.name_or_path={ckpt}", f"data.train=[{CHAT_PAIRS}]", "data.eval=[]", "data.max_length=128",
            f"run.output_dir={out}", "run.max_steps=2", "run.batch_size=4", "run.grad_accum=2",
            "run.progress=false", "run.resume=never", "run.report_to=[jsonl]", "run.eval_every=0",
            "run.save_every=0", "optim.lr=1e-3", "optim.warmup_ratio=0.0"]


# (arch, shipped config, extra overrides): every real DPO config, with the Llama one also run as a full fine-tune.
CASES = [
    ("qwen2", "qwen2.5-0.5b_dpo.yaml", []),
    ("qwen2", "qwen2.5-1.5b_dpo_lora.yaml", []),
    ("llama", "llama3-8b_dpo_lora.yaml", []),
    ("llama", "llama3-8b_dpo_lora.yaml", ["lora.enabled=false", "reference.strategy=copy", "model.dtype=float32"]),
]


@pytest.mark.parametrize("arch,config,extra", CASES, ids=["qwen2-full", "qwen2-lora", "llama-lora", "llama-full"])
def test_dpo_from_a_saved_checkpoint_reloads_with_plain_transformers(arch, config, extra, checkpoints, tmp_path):
    ckpt, out = checkpoints[arch], tmp_path / "run"
    cfg = load_train_config(REPO / "configs" / "text" / config, [*_overrides(ckpt, out), *extra])
    task = build_task(cfg)
    trained = task.model
    summary = train(cfg, task=task)
    assert summary["global_step"] == 2
    final = Path(summary["final_model"])
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32

    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template == AutoTokenizer.from_pretrained(ckpt).chat_template  # shipped with the model
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
    assert base.config.model_type == arch
    text = tok.apply_chat_template([{"role": "user", "content": "add: 2 3"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.float()
    if cfg.lora.enabled:
        from peft import PeftModel

        assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
        reloaded = PeftModel.from_pretrained(base, final)  # the user's base directory + the saved adapter
        assert Path(reloaded.peft_config["default"].base_model_name_or_path) == ckpt
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(final, dtype=dtype)
        assert reloaded.config.model_type == arch
    reloaded.eval()
    trained.eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits.float()
        want = trained(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the saved model is the trained one
    assert (got - base_logits).abs().max() > 1e-4  # and two steps at lr 1e-3 moved it off the checkpoint


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_conversational_rows_go_through_the_chat_template(arch, checkpoints, tmp_path):
    ckpt = checkpoints[arch]
    cfg = load_train_config(REPO / "configs" / "text" / "qwen2.5-0.5b_dpo.yaml", _overrides(ckpt, tmp_path))
    task = build_task(cfg)
    data = task.stage_data(cfg.stages[0] if cfg.stages else _main_stage())
    tok = AutoTokenizer.from_pretrained(ckpt)
    row = next(r for _, _, r in load_rows(CHAT_PAIRS))
    example = data.train.examples[0]
    prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(example.prompt_ids) == prompt
    chosen = tok.decode(example.completions[0])
    assert chosen.startswith(row["chosen"][0]["content"])
    end_of_turn = "<|im_end|>\n" if arch == "qwen2" else tok.eos_token
    assert chosen == row["chosen"][0]["content"] + end_of_turn  # the template's end of turn, scored as well
    if arch == "qwen2":
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert data.stats.get("encode/template_mismatches", 0) == 0
    assert data.stats.get("encode/prompts_truncated", 0) == 0


def _main_stage():
    from mmalign.schema import StageConfig

    return StageConfig(name="main")
