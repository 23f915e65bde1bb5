"""Bad configs never end in a traceback (issue 18, item 3): every defect class below goes through the real
``mmalign train CONFIG key=value ...`` entry point (typer's CliRunner, in process) and must give exit status 2,
``error:`` lines naming the key or path and the value, and a fix — never a ``Traceback``.

Defect classes: a missing / empty / non-model / file ``model.name_or_path``; a run's ``final/`` that a kill left
incomplete; random, truncated, zero-byte and NaN/inf weights; a corrupt ``config.json``; a checkpoint without a
tokenizer; a hub id offline; bad ``loss.kwargs``; non-finite or absurd learning rates; a ``run.resume`` that is no
checkpoint; binary, UTF-16, NUL-bearing, truncated and duplicate-key YAML; negative, zero, misspelt and
non-integer ``model.tiny`` sizes; out-of-range counts (``save_every``, ``warmup_steps``, ``epochs``, ...); LoRA
targets that match nothing; 4/8-bit loading of a tiny model or without bitsandbytes. The same loading defects
run for the diffusion, CLIP and PRIOR (LVLM) families. A seeded schema walk adds every typed field of the run
schema with NaN / inf / non-numbers / unknown choices, alone and several at once (one error lists them all).
Deterministic: fixed seeds, tiny models built once per module; the whole file runs in well under a minute.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmalign.api import load_train_config
from mmalign.cli import app
from mmalign.config import ConfigError, describe
from mmalign.schema import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TEXT, DIFFUSION = "configs/text/tiny_dpo.yaml", "configs/diffusion/tiny_dpo.yaml"
CLIP, PRIOR = "configs/clip/tiny_clip_refine.yaml", "configs/prior/tiny_lvlm_dpo.yaml"
FAST = ["run.max_steps=2", "run.progress=false", "run.eval_every=0", "data.eval=[]", "run.report_to=[jsonl]"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs' data paths are relative to the repository root


def _train(config: str | Path, *overrides: str, out: Path) -> str:
    """Run ``mmalign train``; assert the clean-error contract; return the output."""
    res = CliRunner().invoke(app, ["train", str(config), *FAST, *overrides, f"run.output_dir={out}"])
    detail = res.output
    if res.exc_info and not isinstance(res.exception, SystemExit):
        import traceback

        detail += "".join(traceback.format_exception(*res.exc_info))
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), detail
    assert "Traceback" not in res.output and "error: " in res.output, res.output
    return res.output


def _check(output: str, needles: list[str]) -> None:
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"


def _corrupt(file: Path, how: str) -> None:
    """Damage a safetensors file the way disks, downloads and kills do."""
    if how == "zero":
        file.write_bytes(b"")
    elif how == "random":
        file.write_bytes(random.Random(0).randbytes(4096))
    elif how == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:  # "nan" / "inf": a valid file holding a non-finite weight
        from safetensors.torch import load_file, save_file

        state = load_file(str(file))
        key = sorted(k for k, v in state.items() if v.is_floating_point())[0]
        state[key].view(-1)[0] = float(how)
        save_file(state, str(file), metadata={"format": "pt"})


def _variant(src: Path, root: Path, name: str, fn) -> Path:
    dst = root / name
    shutil.copytree(src, dst)
    fn(dst)
    return dst


# ------------------------------------------------------------------------------------------------ text family


@pytest.fixture(scope="module")
def text_ckpts(tmp_path_factory) -> dict[str, Path]:
    from mmalign.models.text import build_tiny_causal_lm
    from mmalign.models.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("text_ckpts")
    tok = train_bpe_tokenizer(["add: 1 2 = 3", "add: 4 4 = 8"] * 20, vocab_size=300)
    good = root / "good"
    build_tiny_causal_lm(len(tok), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=32).save_pretrained(good)
    tok.save_pretrained(good)
    c = {"good": good, "empty": root / "empty", "nonmodel": root / "nonmodel"}
    c["empty"].mkdir()
    c["nonmodel"].mkdir()
    (c["nonmodel"] / "notes.txt").write_text("not a model")
    for how in ("zero", "random", "truncated", "nan", "inf"):
        c[how] = _variant(good, root, how, lambda d, h=how: _corrupt(d / "model.safetensors", h))
    c["bad_config_json"] = _variant(good, root, "bad_config_json", lambda d: (d / "config.json").write_text("{oops"))
    c["no_tokenizer"] = _variant(good, root, "no_tokenizer", lambda d: [
        (d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json") if (d / f).exists()])
    # A run killed while exporting: checkpoints written, final.tmp half-written, no final/.
    run = root / "killed_run"
    (run / "checkpoint-0000002").mkdir(parents=True)
    shutil.copytree(good, run / "final.tmp")
    (run / "final.tmp" / "model.safetensors").unlink()
    c["killed_final"], c["killed_tmp"] = run / "final", run / "final.tmp"
    return c


# (id, overrides (a function of the checkpoints), text the error must contain)
TEXT_CASES = [
    ("model_missing", lambda c: [f"model.name_or_path={c['empty'].parent / 'nope'}"],
     ["model.name_or_path=", "nope", "does not exist", "fix"]),
    ("model_empty_dir", lambda c: [f"model.name_or_path={c['empty']}"],
     ["model.name_or_path=", "empty directory", "fix"]),
    ("model_not_a_model", lambda c: [f"model.name_or_path={c['nonmodel']}"],
     ["nonmodel", "config.json", "notes.txt"]),
    ("model_is_a_file", lambda c: [f"model.name_or_path={c['good'] / 'config.json'}"], ["config.json", "is a file"]),
    ("final_killed_missing", lambda c: [f"model.name_or_path={c['killed_final']}"],
     ["model.name_or_path=", "does not exist", "resume that run from its newest checkpoint"]),
    ("final_killed_incomplete", lambda c: [f"model.name_or_path={c['killed_tmp']}"],
     ["final.tmp", "missing model weights", "resume that run from its newest checkpoint"]),
    ("weights_zero_bytes", lambda c: [f"model.name_or_path={c['zero']}"],
     ["model.name_or_path=", "model.safetensors is empty (0 bytes)", "fix"]),
    ("weights_random", lambda c: [f"model.name_or_path={c['random']}"],
     ["model.safetensors is corrupt or truncated", "fix"]),
    ("weights_truncated", lambda c: [f"model.name_or_path={c['truncated']}"],
     ["model.safetensors is corrupt or truncated", "fix"]),
    ("weights_nan", lambda c: [f"model.name_or_path={c['nan']}"], ["NaN or inf weights", "fix"]),
    ("weights_inf", lambda c: [f"model.name_or_path={c['inf']}"], ["NaN or inf weights", "fix"]),
    ("config_json_garbage", lambda c: [f"model.name_or_path={c['bad_config_json']}"],
     ["bad_config_json", "could not be loaded", "fix"]),
    ("checkpoint_without_tokenizer", lambda c: [f"model.name_or_path={c['no_tokenizer']}"],
     ["holds no tokenizer", "model.tokenizer"]),
    ("tokenizer_missing", lambda c: [f"model.tokenizer={c['empty'].parent / 'nope'}"],
     ["model.tokenizer=", "does not exist"]),
    ("hub_id_offline", lambda c: ["model.name_or_path=mmalign-test/not-a-model"],
     ["'mmalign-test/not-a-model' as a hub id", "local directory"]),
    ("beta_nan", lambda c: ["loss.kwargs.beta=nan"], ["loss.kwargs.beta=", "nan", "fix"]),
    ("beta_text", lambda c: ["loss.kwargs.beta=abc"], ["loss.kwargs.beta=", "abc", "fix"]),
    ("lr_inf", lambda c: ["optim.lr=inf"], ["optim.lr=inf", "(0, 10]"]),
    ("lr_huge", lambda c: ["optim.lr=1e30"], ["optim.lr=1e+30", "out of range", "(0, 10]"]),
    ("lr_nan", lambda c: ["optim.lr=nan"], ["optim.lr=nan", "(0, 10]"]),
    ("lr_zero", lambda c: ["optim.lr=0"], ["optim.lr=0", "(0, 10]"]),
    ("resume_missing", lambda c: [f"run.resume={c['empty'].parent / 'no_ckpt'}"],
     ["run.resume=", "no_ckpt", "does not exist", "run.resume=auto"]),
    ("resume_not_a_checkpoint", lambda c: [f"run.resume={c['empty']}"],
     ["run.resume=", "not a complete checkpoint"]),
    ("save_every_negative", lambda c: ["run.save_every=-1"], ["run.save_every=-1", ">= 0"]),
    ("warmup_negative", lambda c: ["optim.warmup_steps=-10"], ["optim.warmup_steps=-10", ">= 0"]),
    ("epochs_negative", lambda c: ["run.max_steps=null", "run.epochs=-1"], ["run.epochs=-1", "(0, inf)"]),
    ("epochs_nan", lambda c: ["run.max_steps=null", "run.epochs=nan"], ["run.epochs=nan", "finite"]),
    ("eval_every_negative", lambda c: ["run.eval_every=-3"], ["run.eval_every=-3", ">= 0"]),
    ("seed_negative", lambda c: ["run.seed=-1"], ["run.seed=-1", ">= 0"]),
    ("batch_size_zero", lambda c: ["run.batch_size=0"], ["run.batch_size=0", ">= 1"]),
    ("betas_out_of_range", lambda c: ["optim.betas=[0.9, 1.5]"], ["optim.betas.1=1.5", "[0, 1)"]),
    ("grad_norm_negative", lambda c: ["optim.max_grad_norm=-1"], ["optim.max_grad_norm=-1", "or null"]),
    ("lora_dropout_one", lambda c: ["lora.enabled=true", "lora.dropout=1.0"], ["lora.dropout=1.0", "[0, 1)"]),
    ("tiny_negative", lambda c: ["model.tiny.hidden_size=-4"], ["model.tiny.hidden_size=-4", ">= 1"]),
    ("tiny_zero_layers", lambda c: ["model.tiny.num_layers=0"], ["model.tiny.num_layers=0", ">= 1"]),
    ("tiny_not_a_number", lambda c: ["model.tiny.hidden_size=big"], ["model.tiny.hidden_size='big'", ">= 1"]),
    ("tiny_typo", lambda c: ["model.tiny.hiden_size=16"], ["model.tiny.hiden_size", "did you mean 'hidden_size'"]),
    ("tiny_heads_mismatch", lambda c: ["model.tiny.hidden_size=30", "model.tiny.num_heads=4"],
     ["hidden_size=30 must be divisible by num_heads=4"]),
    ("lora_targets_nothing", lambda c: ["lora.enabled=true", "lora.target_modules=[nope_proj]"],
     ["lora.target_modules=['nope_proj']", "q_proj", "all-linear"]),
    ("4bit_tiny", lambda c: ["model.load_in_4bit=true"], ["model.load_in_4bit=true", "tiny", "fix"]),
    ("8bit_tiny", lambda c: ["model.load_in_8bit=true"], ["model.load_in_8bit=true", "tiny"]),
    ("unknown_key", lambda c: ["optim.lrr=1e-5"], ["optim.lrr", "did you mean 'optim.lr'"]),
]


@pytest.mark.parametrize("overrides,needles", [c[1:] for c in TEXT_CASES], ids=[c[0] for c in TEXT_CASES])
def test_text_defects_are_clean_errors(overrides, needles, text_ckpts, tmp_path):
    _check(_train(TEXT, *overrides(text_ckpts), out=tmp_path / "out"), needles)


@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is not None and torch.cuda.is_available(),
                    reason="4-bit loading works on this machine")
def test_4bit_without_bitsandbytes_or_cuda(text_ckpts, tmp_path):
    out = _train(TEXT, f"model.name_or_path={text_ckpts['good']}", "model.load_in_4bit=true", out=tmp_path / "o")
    _check(out, ["model.load_in_4bit=true", "bitsandbytes" if "bitsandbytes' package" in out else "CUDA", "fix"])


# --------------------------------------------------------------------------------------------------- YAML files


def _yaml_cases() -> list[tuple[str, bytes, list[str]]]:
    good = (REPO / TEXT).read_bytes()
    return [
        ("random_bytes", random.Random(1).randbytes(300), ["not a UTF-8 text file", "fix"]),
        ("utf16", good.decode().encode("utf-16"), ["not a UTF-8 text file"]),
        ("nul_byte", good.replace(b"modality: text", b"modality: te\x00xt"), ["YAML syntax error"]),
        ("truncated_flow", good[: good.index(b"tiny: {") + 12], ["YAML syntax error"]),
        ("top_level_list", b"- modality\n- text\n", ["top level must be a mapping"]),
        ("duplicate_top_level", good + b"run:\n  batch_size: 2\n",
         ["key 'run' is given again (first at line", "merge"]),
        ("duplicate_nested", good.replace(b"  name_or_path: tiny\n", b"  name_or_path: tiny\n  name_or_path: x\n"),
         ["key 'model.name_or_path' is given again"]),
        ("duplicate_in_list", good + b"stages:\n  - {name: a, lr: 1.0e-3, name: b}\n",
         ["key 'stages.0.name' is given again"]),
    ]


@pytest.mark.parametrize("content,needles", [c[1:] for c in _yaml_cases()], ids=[c[0] for c in _yaml_cases()])
def test_bad_yaml_files_are_clean_errors(content, needles, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    out = _train(path, out=tmp_path / "out")
    _check(out, [str(path), *needles])


def test_yaml_directory_and_missing_file(tmp_path):
    _check(_train(tmp_path, out=tmp_path / "o"), ["is a directory, not a YAML file"])
    _check(_train(tmp_path / "none.yaml", out=tmp_path / "o"), ["does not exist"])


# ---------------------------------------------------------------------------------- diffusion, CLIP, PRIOR


@pytest.fixture(scope="module")
def family_ckpts(tmp_path_factory) -> dict[str, Path]:
    from mmalign.models.clip import load_clip, save_clip
    from mmalign.models.diffusion_tiny import build_tiny_pipeline_dir
    from mmalign.models.lvlm import build_tiny_lvlm, save_lvlm
    from mmalign.models.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("family_ckpts")
    c: dict[str, Path] = {"nonmodel": root / "nonmodel"}
    c["nonmodel"].mkdir()
    (c["nonmodel"] / "notes.txt").write_text("x")
    pipe = build_tiny_pipeline_dir(root / "pipe", "unet", seed=0)
    for how in ("zero", "truncated", "nan"):
        c[f"pipe_{how}"] = _variant(pipe, root, f"pipe_{how}",
                                    lambda d, h=how: _corrupt(next((d / "unet").glob("*.safetensors")), h))
    c["pipe_no_unet"] = _variant(pipe, root, "pipe_no_unet", lambda d: shutil.rmtree(d / "unet"))
    c["pipe_vae_random"] = _variant(pipe, root, "pipe_vae_random",
                                    lambda d: _corrupt(next((d / "vae").glob("*.safetensors")), "random"))
    oc = save_clip(load_clip("tiny"), root / "open_clip")
    hf = save_clip(load_clip("tiny-hf"), root / "hf_clip")
    for how in ("zero", "nan"):
        c[f"open_clip_{how}"] = _variant(oc, root, f"open_clip_{how}",
                                         lambda d, h=how: _corrupt(d / "open_clip_model.safetensors", h))
        c[f"hf_clip_{how}"] = _variant(hf, root, f"hf_clip_{how}",
                                       lambda d, h=how: _corrupt(d / "model.safetensors", h))
    tok = train_bpe_tokenizer(["a red square on a blue mat"] * 20, vocab_size=300)
    small = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
                 vision_hidden_size=16, vision_intermediate_size=32)
    for kind in ("patch", "llava"):
        path = save_lvlm(*build_tiny_lvlm(kind, tok, **small), root / kind)
        for how in ("truncated", "nan"):
            c[f"{kind}_{how}"] = _variant(path, root, f"{kind}_{how}",
                                          lambda d, h=how: _corrupt(d / "model.safetensors", h))
    c["patch_no_embed"] = _variant(root / "patch", root, "patch_no_embed",
                                   lambda d: (d / "patch_embed.safetensors").unlink())
    return c


FAMILY_CASES = [
    ("diffusion_not_a_pipeline", DIFFUSION, lambda c: [f"model.name_or_path={c['nonmodel']}"],
     ["model_index.json", "notes.txt"]),
    ("diffusion_unet_zero", DIFFUSION, lambda c: [f"model.name_or_path={c['pipe_zero']}"], ["unet", "is empty"]),
    ("diffusion_unet_truncated", DIFFUSION, lambda c: [f"model.name_or_path={c['pipe_truncated']}"],
     ["unet", "corrupt or truncated", "fix"]),
    ("diffusion_unet_nan", DIFFUSION, lambda c: [f"model.name_or_path={c['pipe_nan']}"], ["NaN or inf", "unet"]),
    ("diffusion_vae_random", DIFFUSION, lambda c: [f"model.name_or_path={c['pipe_vae_random']}"],
     ["vae", "corrupt or truncated"]),
    ("diffusion_no_unet", DIFFUSION, lambda c: [f"model.name_or_path={c['pipe_no_unet']}"],
     ["lacks the subfolders ['unet']"]),
    ("diffusion_tiny_negative", DIFFUSION, lambda c: ["model.tiny.channels=[-16, 32]"],
     ["model.tiny.channels=[-16, 32]", "integers >= 2"]),
    ("diffusion_tiny_groups", DIFFUSION, lambda c: ["model.tiny.channels=[6, 12]"],
     ["model.tiny.channels=[6, 12]", "e.g. [16, 32]"]),
    ("diffusion_tiny_zero", DIFFUSION, lambda c: ["model.tiny.text_hidden=0"], ["model.tiny.text_hidden=0"]),
    ("diffusion_tiny_typo", DIFFUSION, lambda c: ["model.tiny.chanels=[16, 32]"], ["model.tiny.chanels", "channels"]),
    ("diffusion_lora_targets", DIFFUSION, lambda c: ["lora.target_modules=[nope]"],
     ["lora.target_modules=['nope']", "to_q"]),
    ("diffusion_4bit_tiny", DIFFUSION, lambda c: ["model.load_in_4bit=true"], ["model.load_in_4bit=true"]),
    ("clip_not_a_model", CLIP, lambda c: [f"model.name_or_path={c['nonmodel']}"],
     ["model.name_or_path", "config.json"]),
    ("clip_open_clip_zero", CLIP, lambda c: [f"model.name_or_path={c['open_clip_zero']}"],
     ["open_clip_model.safetensors is empty"]),
    ("clip_open_clip_nan", CLIP, lambda c: [f"model.name_or_path={c['open_clip_nan']}"], ["NaN or inf"]),
    ("clip_hf_zero", CLIP, lambda c: [f"model.name_or_path={c['hf_clip_zero']}"], ["model.safetensors is empty"]),
    ("clip_hf_nan", CLIP, lambda c: [f"model.name_or_path={c['hf_clip_nan']}"], ["NaN or inf"]),
    ("clip_hub_offline", CLIP, lambda c: ["model.name_or_path=mmalign-test/no-clip"], ["as a hub id"]),
    ("clip_tiny_zero", CLIP, lambda c: ["model.tiny.vision_layers=0"], ["model.tiny.vision_layers=0", ">= 1"]),
    ("clip_tiny_negative", CLIP, lambda c: ["model.tiny.embed_dim=-4"], ["model.tiny.embed_dim=-4"]),
    ("clip_tiny_patch", CLIP, lambda c: ["model.tiny.image_size=30"], ["model.tiny.image_size=30", "patch_size"]),
    ("clip_tiny_typo", CLIP, lambda c: ["model.tiny.embed_dm=16"], ["embed_dm", "embed_dim"]),
    ("clip_lora_targets", CLIP, lambda c: ["lora.enabled=true", "lora.target_modules=[nope]"],
     ["lora.target_modules", "nope"]),
    ("prior_patch_truncated", PRIOR, lambda c: [f"model.name_or_path={c['patch_truncated']}"],
     ["corrupt or truncated"]),
    ("prior_patch_nan", PRIOR, lambda c: [f"model.name_or_path={c['patch_nan']}"], ["NaN or inf"]),
    ("prior_patch_no_embed", PRIOR, lambda c: [f"model.name_or_path={c['patch_no_embed']}"],
     ["patch_embed.safetensors is missing"]),
    ("prior_llava_truncated", PRIOR, lambda c: [f"model.name_or_path={c['llava_truncated']}", "prior.lvlm=llava"],
     ["corrupt or truncated"]),
    ("prior_llava_nan", PRIOR, lambda c: [f"model.name_or_path={c['llava_nan']}", "prior.lvlm=llava"], ["NaN or inf"]),
    ("prior_not_a_model", PRIOR, lambda c: [f"model.name_or_path={c['nonmodel']}"], ["config.json", "notes.txt"]),
    ("prior_hub_offline", PRIOR, lambda c: ["model.name_or_path=mmalign-test/no-lvlm"], ["as a hub id"]),
    ("prior_tiny_vision_zero", PRIOR, lambda c: ["prior.lvlm=llava", "model.tiny.vision_layers=0"],
     ["model.tiny.vision_layers=0", ">= 1"]),
    ("prior_tiny_patch", PRIOR, lambda c: ["model.tiny.image_size=18"], ["model.tiny.image_size=18", "patch_size"]),
    ("prior_tiny_typo", PRIOR, lambda c: ["model.tiny.vision_layer=2"], ["model.tiny.vision_layer", "vision_layers"]),
    ("prior_tiny_negative", PRIOR, lambda c: ["model.tiny.hidden_size=-8"], ["model.tiny.hidden_size=-8"]),
    ("prior_lora_targets", PRIOR, lambda c: ["lora.enabled=true", "lora.target_modules=[nope]"],
     ["lora.target_modules=['nope']", "q_proj"]),
]


@pytest.mark.parametrize("config,overrides,needles", [c[1:] for c in FAMILY_CASES], ids=[c[0] for c in FAMILY_CASES])
def test_family_defects_are_clean_errors(config, overrides, needles, family_ckpts, tmp_path):
    _check(_train(config, *overrides(family_ckpts), out=tmp_path / "out"), needles)


def test_diffusion_tiny_keys_match_the_builder():
    """schema_diffusion.TINY_SIZES (checked at config load) names exactly the builder's size arguments."""
    import inspect

    from mmalign.adapters.diffusion_build import TINY_KEYS
    from mmalign.models.diffusion_tiny import build_tiny_components
    from mmalign.schema_diffusion import TINY_SIZES

    assert set(TINY_SIZES) == set(TINY_KEYS) <= set(inspect.signature(build_tiny_components).parameters)


# -------------------------------------------------------------------------------------------- seeded schema walk


def _schema_fields() -> dict[str, str]:
    """Every scalar key of the run schema with its type as ``--help-config`` prints it (list sections skipped)."""
    out = {}
    for line in describe(TrainConfig).splitlines():
        m = re.match(r"^([\w.]+): (.+?)(?: = .*| \(required\))?$", line)
        if m and ".N." not in m.group(1):
            out[m.group(1)] = m.group(2)
    return out


def _bad_values(tp: str) -> list[str]:
    if tp in ("float", "float | null"):
        return ["nan", "inf", "-inf", "abc"]
    if tp in ("int", "int | null"):
        return ["abc", "1.5"]
    if tp.startswith("'"):
        return ["bogus_choice"]
    return []


CASES = [(k, v) for k, tp in sorted(_schema_fields().items()) for v in _bad_values(tp)]


def _refused(overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load_train_config(TEXT, overrides)
    return err.value


def test_schema_walk_covers_the_sections():
    keys = {k for k, _ in CASES}
    assert {"optim.lr", "run.epochs", "run.save_every", "diffusion.snr_gamma", "clip.wise_alpha", "prior.alpha",
            "reference.strategy", "optim.betas"} - keys == {"optim.betas"}  # lists of floats: tested below
    assert len(CASES) > 100


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_every_typed_field_refuses_a_bad_value(key, value):
    err = _refused([f"{key}={value}"])
    named = [e for e in err.errors if e.startswith((f"{key}=", f"{key}:", f"{key} "))]
    assert named and value.lstrip("-") in named[0], err.errors


@pytest.mark.parametrize("seed", range(8))
def test_several_defects_at_once_are_all_listed(seed):
    """One error lists every bad key of a config (validation collects, it does not stop at the first)."""
    rng = random.Random(seed)
    picked = rng.sample([c for c in CASES if c[1] != "bogus_choice" or c[0] != "modality"], 4)
    by_key = dict(picked)  # one value per key
    err = _refused([f"{k}={v}" for k, v in by_key.items()])
    for key in by_key:
        assert any(e.startswith((f"{key}=", f"{key}:", f"{key} ")) for e in err.errors), (key, err.errors)


def test_non_finite_list_items_and_yaml_nan(tmp_path):
    err = _refused(["optim.betas=[0.9, nan]", "stages=[{name: a, lr: inf}]"])
    assert any(e.startswith("optim.betas.1=nan") for e in err.errors), err.errors
    assert any(e.startswith("stages.0.lr=inf") for e in err.errors), err.errors
    path = tmp_path / "nan.yaml"
    path.write_text((REPO / TEXT).read_text().replace("lr: 3.0e-3", "lr: .nan"))
    with pytest.raises(ConfigError, match=r"optim\.lr=nan must be a finite number"):
        load_train_config(path)


# ------------------------------------------------------------------------------- free space (issue 18, item 4)


def test_free_space_estimate_from_the_parameter_count():
    from mmalign.models.text import build_tiny_causal_lm
    from mmalign.train.output_guard import estimate_output_bytes

    model = build_tiny_causal_lm(100, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    n = sum(p.numel() for p in model.parameters())
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    cfg = load_train_config(TEXT, ["run.save_every=5", "run.keep_last=2"])
    # keep_last + 1 checkpoints while a new one is written, one of the final state, then the final model
    assert estimate_output_bytes(cfg, model) == {"checkpoints": 4 * (weights + 8 * n), "final model": weights}
    cfg = load_train_config(TEXT, ["run.save_every=0", "run.save_final=false", "optim.name=sgd"])
    assert estimate_output_bytes(cfg, model) == {"checkpoints": weights + 4 * n}


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("mmalign.train.output_guard.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = _train(TEXT, "run.save_every=1", out=tmp_path / "o")
    _check(out, [f"run.output_dir='{tmp_path / 'o'}'", "has 1000 B free", "MiB", "run.keep_last",
                 "run.check_disk_space=false"])
    assert not list((tmp_path / "o").glob("checkpoint-*")) and not (tmp_path / "o" / "final").exists()


def test_environment_is_offline():
    """The hub-id cases above rely on it: no test may reach the network."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
