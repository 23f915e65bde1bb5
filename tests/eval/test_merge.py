"""LoRA merged into full weights (``run.merge_lora_at_end`` → ``final_merged/``, ``mmalign merge``): the merged
model's outputs equal the adapter model's to 1e-5, its files carry no LoRA tensor and it loads with the plain
class (transformers / diffusers), for causal LMs (reward models too), LVLMs (LLaVA, PatchLVLM) and diffusion."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from mmalign.api import load_train_config, train
from mmalign.cli import app
from mmalign.config import ConfigError
from mmalign.models.merge import lora_keys
from mmalign.models.text import load_causal_lm
from mmalign.train.final_save import export_merged
from tests.train.conftest import config

IDS = torch.tensor([[1, 5, 9, 17, 33, 4, 2], [1, 8, 8, 21, 40, 6, 3]])


def _lora_run(out, data_dir, tokenizer_dir, **extra):
    run = {"max_steps": 2, "save_final": True, "merge_lora_at_end": True}
    cfg = config(out, [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir,
                 lora={"enabled": True, "r": 4, "alpha": 8}, optim={"lr": 5e-2, "scheduler": "constant"},
                 **{**extra, "run": {**run, **extra.get("run", {})}})
    return train(cfg)


@pytest.fixture(scope="module")
def lm_run(data_dir, tokenizer_dir, tmp_path_factory):
    """A tiny LoRA DPO run with run.merge_lora_at_end=true: its output directory."""
    out = tmp_path_factory.mktemp("lm") / "run"
    _lora_run(out, data_dir, tokenizer_dir)
    return out


@pytest.mark.parametrize("variant", ["lm", "rm"])
def test_text_run_writes_final_merged_equal_to_the_adapter_model(variant, lm_run, data_dir, tokenizer_dir,
                                                                 tmp_path):
    from transformers import AutoModelForCausalLM

    out = lm_run
    if variant == "rm":
        out = tmp_path / "run"
        _lora_run(out, data_dir, tokenizer_dir, loss={"name": "rm"}, reference={"strategy": "none"})
    final, merged = out / "final", out / "final_merged"
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 4
    assert not (merged / "adapter_config.json").exists() and not (merged / "base").exists()
    assert lora_keys(merged) == [] and lora_keys(final)  # the adapter's files do hold LoRA tensors
    adapter = load_causal_lm(final, value_head=variant == "rm").eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()  # the plain transformers class, no peft wrapper
    assert not hasattr(plain, "peft_config")
    with torch.no_grad():
        if variant == "rm":
            merged_rm = load_causal_lm(merged, value_head=True).eval()
            want = adapter(IDS).values
            torch.testing.assert_close(merged_rm(IDS).values, want, atol=1e-5, rtol=0)
            adapter = adapter.base
        want = adapter(input_ids=IDS).logits
        torch.testing.assert_close(plain(input_ids=IDS).logits, want, atol=1e-5, rtol=0)
        with adapter.disable_adapter():  # the trained adapter moved the model: the merge carries it
            assert (adapter(input_ids=IDS).logits - want).abs().max() > 1e-4
    assert (merged / "tokenizer.json").is_file() or (merged / "tokenizer_config.json").is_file()


def test_final_merged_loads_with_peft_not_installed(lm_run):
    """In a fresh interpreter where ``import peft`` fails (and transformers sees no peft), the merged model
    loads with AutoModelForCausalLM and gives the adapter model's logits."""
    code = ("import json, sys\nsys.modules['peft'] = None  # import peft -> ImportError; find_spec -> None\n"
            "import torch\nfrom transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
            "try:\n    import peft  # noqa\n    sys.exit(3)\nexcept ImportError:\n    pass\n"
            f"ids = torch.tensor({IDS.tolist()})\n"
            "with torch.no_grad():\n    print(json.dumps(m(input_ids=ids).logits.tolist()))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code, str(lm_run / "final_merged")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    got = torch.tensor(json.loads(run.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        want = load_causal_lm(lm_run / "final").eval()(input_ids=IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_merge_at_end_is_refused_before_training_without_lora(data_dir, tokenizer_dir, tmp_path):
    cfg = config(tmp_path / "run", [data_dir / "pairs.jsonl"], tokenizer=tokenizer_dir,
                 run={"max_steps": 1, "save_final": True, "merge_lora_at_end": True})
    with pytest.raises(ConfigError, match="lora.enabled=false"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing was trained


def test_merge_cli_merges_refuses_full_weights_and_keeps_an_existing_out(lm_run, tmp_path):
    final, out = lm_run / "final", tmp_path / "merged"
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(final), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "merged" in res.output and lora_keys(out) == [] and (out / "config.json").is_file()
    res = runner.invoke(app, ["merge", str(final), "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = runner.invoke(app, ["merge", str(out), "--out", str(tmp_path / "again")])
    assert res.exit_code == 2 and "needs no merge" in res.output and not (tmp_path / "again").exists()
    res = runner.invoke(app, ["merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no directory" in res.output


def test_lvlm_run_over_a_tiny_base_copies_its_already_merged_final(tmp_path):
    """A tiny LVLM's LoRA is saved merged (its in-process base cannot be found again): final_merged/ is a copy."""
    from mmalign.models.lvlm import load_lvlm
    from tests.prior._tiny import config as prior_config
    from tests.prior._tiny import write_rows

    cfg = prior_config(tmp_path, write_rows(tmp_path), "prior.enabled=false", "lora.enabled=true", "lora.r=4",
                       "run.merge_lora_at_end=true", "run.max_steps=1", lvlm="patch")
    summary = train(cfg)
    merged = tmp_path / "run" / "final_merged"
    assert summary["final_merged_model"] == str(merged) and lora_keys(merged) == []
    model = load_lvlm(merged)[0]
    assert not hasattr(model.lm, "peft_config")


@pytest.mark.parametrize("kind", ["patch", "llava"])
def test_lvlm_adapter_over_a_base_on_disk_merges_to_equal_outputs(kind, tmp_path):
    from peft import PeftModel

    from mmalign.adapters.lvlm_family import apply_lvlm_lora
    from mmalign.models.lvlm import PatchLVLM, build_tiny_lvlm, load_lvlm, save_lvlm
    from mmalign.schema import LoraConfig
    from tests.prior._tiny import TINY
    from tests.prior.test_lvlm import _tokenizer

    model, inputs = build_tiny_lvlm(kind, _tokenizer(), seed=3, **TINY)
    save_lvlm(model, inputs, tmp_path / "base")
    base, inputs = load_lvlm(tmp_path / "base")
    lora = apply_lvlm_lora(base, LoraConfig(enabled=True, r=4, alpha=8), freeze_encoder=True, modules_to_save=[])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    save_lvlm(lora, inputs, tmp_path / "adapter")  # the base is on disk: only the adapter is written
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    path, info = export_merged(tmp_path / "adapter", tmp_path / "merged")
    assert info["kind"] == "lvlm" and lora_keys(path) == []
    ids = torch.tensor([[inputs.tokenizer.bos_token_id] + [inputs.image_token_id] * inputs.num_image_tokens
                        + [40, 41, 42]])
    pixels = torch.rand(1, 3, TINY["image_size"], TINY["image_size"], generator=g)
    if kind == "patch":
        plain = PatchLVLM.from_pretrained(path)
        assert not hasattr(plain.lm, "peft_config")
    else:
        from transformers import LlavaForConditionalGeneration

        plain = LlavaForConditionalGeneration.from_pretrained(path)
        assert not isinstance(plain, PeftModel)
    adapter = load_lvlm(tmp_path / "adapter")[0].eval()
    with torch.no_grad():
        want = adapter(input_ids=ids, pixel_values=pixels).logits
        got = plain.eval()(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        base_out = load_lvlm(tmp_path / "base")[0].eval()(input_ids=ids, pixel_values=pixels).logits
        assert (base_out - want).abs().max() > 1e-4


def test_diffusion_run_writes_a_fused_denoiser_equal_to_the_lora_model(tmp_path):
    from diffusers import UNet2DConditionModel

    from mmalign.sample import diffusion as SD
    from tests.diffusion import tiny_config

    cfg = tiny_config(tmp_path / "run", run={"save_final": True, "merge_lora_at_end": True},
                      optim={"lr": 5e-2})
    summary = train(load_train_config(cfg))
    final, merged = tmp_path / "run" / "final", tmp_path / "run" / "final_merged"
    assert summary["final_merged_model"] == str(merged)
    info = json.loads((merged / "mmalign_diffusion.json").read_text())
    assert info["format"] == "full" and info["merged_from"] == str(final)
    assert lora_keys(merged) == [] and lora_keys(final)
    comps = SD.load_components(final)
    lora_net = SD.load_denoiser(final, comps).eval()
    plain = UNet2DConditionModel.from_pretrained(merged, subfolder="unet").eval()  # plain diffusers
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *comps.latent_shape(16), generator=g)
    emb = torch.randn(2, 8, comps.text_encoders[0].config.hidden_size, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        want = lora_net(x, t, emb).sample
        torch.testing.assert_close(plain(x, t, emb).sample, want, atol=1e-5, rtol=0)
        assert (comps.denoiser(x, t, emb).sample - want).abs().max() > 1e-4  # the base alone differs
    # mmalign's own loaders read it like a full fine-tuning run's final/ (sample diffusion --model final_merged)
    again = SD.load_denoiser(merged, SD.load_components(merged))
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, emb).sample, want, atol=1e-5, rtol=0)
