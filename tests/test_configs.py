"""Every YAML under ``configs/`` is valid, documented and (for the tiny text configs) actually trains.

- Run configs (a top-level ``modality`` key, or only keys of the run schema) load through
  :func:`mmalign.api.load_train_config` with no errors; accelerate configs load through accelerate's own
  ``load_config_from_file`` and ``accelerate launch``'s argument resolution, with every nested key a real
  launcher option. New subdirectories (diffusion, clip, prior, ...) are picked up automatically.
- Every file opens with a comment block holding a launch command for that very file, and every repository
  path named in the block exists.
- Every ``configs/text/tiny_*.yaml`` runs 2 optimizer steps end to end through ``mmalign.train`` from the
  repository root, with its data files resolved relative to it (the shipped ``assets/text`` files, which must
  match ``scripts/make_text_assets.py``).
- Real-model text configs name a documented checkpoint id and valid loss options.
- ``scripts/train_text.sh`` picks the right accelerate config and prints the command it runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmalign.api import load_train_config, train
from mmalign.schema import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ALL_YAML = sorted([*CONFIGS.rglob("*.yaml"), *CONFIGS.rglob("*.yml")])
TEXT = sorted((CONFIGS / "text").glob("*.yaml"))
TINY_TEXT = [p for p in TEXT if p.name.startswith("tiny_")]
REAL_TEXT = [p for p in TEXT if not p.name.startswith("tiny_")]

# The checkpoints real text configs may name: hub id -> transformers model_type. A new id belongs here (and in
# the config's header, with its model card URL) once someone has checked it loads with AutoModelForCausalLM.
DOCUMENTED_MODELS = {
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2",
    "Qwen/Qwen2.5-1.5B-Instruct": "qwen2",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama",
}
LAUNCH = re.compile(r"(mmalign train|accelerate launch|scripts/train_\w+\.sh|python -m mmalign)")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:configs|scripts|assets)/[\w./-]*[\w])")
RUN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def _kind(data: dict) -> str:
    if "distributed_type" in data or "compute_environment" in data:
        return "accelerate"
    if "modality" in data or (data and set(data) <= RUN_KEYS):
        return "run"
    return "unknown"


# ------------------------------------------------------------------------------------------ every YAML


def test_config_tree_is_populated():
    assert TINY_TEXT and REAL_TEXT, "configs/text/ has no tiny_*.yaml or real-model configs"
    assert (CONFIGS / "accelerate" / "ddp.yaml").is_file()


@pytest.mark.parametrize("path", ALL_YAML, ids=_rel)
def test_yaml_validates(path: Path):
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    kind = _kind(data)
    if kind == "run":
        cfg = load_train_config(path)  # raises ConfigError listing every problem
        assert cfg.modality == data.get("modality", "text")
    elif kind == "accelerate":
        _check_accelerate_config(path)
    else:
        pytest.fail(f"{_rel(path)}: neither a run config (top-level 'modality' or only {sorted(RUN_KEYS)}) nor an "
                    "accelerate config ('distributed_type'); give it 'modality:' or teach tests/test_configs.py "
                    "its kind")


@pytest.mark.parametrize("path", ALL_YAML, ids=_rel)
def test_header_documents_a_launch_command(path: Path):
    header = _header(path)
    assert len(header) >= 3, f"{_rel(path)}: must open with a comment block (purpose, hardware, launch command)"
    text = "\n".join(header)
    assert LAUNCH.search(text), f"{_rel(path)}: the header has no launch command (mmalign train / accelerate launch)"
    assert _rel(path) in text, f"{_rel(path)}: the header's launch command must name this file ({_rel(path)})"
    missing = sorted({m for m in REPO_PATH.findall(text) if not (REPO / m).exists()})
    assert not missing, f"{_rel(path)}: the header names repository paths that do not exist: {missing}"


def _header_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(config, overrides) of every `mmalign train` / `train_*.sh` command in the header (``\\`` lines joined)."""
    text = "\n".join(_header(path)).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        try:
            tokens = shlex.split(line)
        except ValueError:  # prose with an apostrophe, not a command
            continue
        for i, tok in enumerate(tokens):
            is_launch = tok == "train" and i > 0 and tokens[i - 1] == "mmalign" or re.search(r"train_\w+\.sh$", tok)
            if is_launch and i + 1 < len(tokens) and tokens[i + 1].endswith((".yaml", ".yml")):
                rest = tokens[i + 2:]
                if rest and rest[0] in ("cpu",) or (rest and rest[0].isdigit()):
                    rest = rest[1:]  # train_text.sh's NUM_GPUS|cpu
                out.append((tokens[i + 1], [t for t in rest if OVERRIDE.match(t)]))
    return out


OVERRIDE = re.compile(r"^[a-z_][\w.]*=")


@pytest.mark.parametrize("path", ALL_YAML, ids=_rel)
def test_header_launch_commands_are_valid_invocations(path: Path):
    """The commands users copy from a header load: the config exists and every key=value override is valid."""
    for config, overrides in _header_commands(path):
        target = REPO / config
        if not target.is_file() or _kind(yaml.safe_load(target.read_text()) or {}) != "run":
            continue  # a placeholder such as CONFIG, or another modality's command file
        cfg = load_train_config(target, overrides)  # raises ConfigError naming the bad key or value
        # Loss names and options are checked when the task is built; check them here already against the one
        # METHODS table (recipes included; their own options are checked when built, by the tiny-config tests).
        if cfg.modality == "text":
            from mmalign.adapters.causal_lm_family import CausalLMFamily
            from mmalign.methods.table import check_loss_kwargs, get_method

            method = get_method(cfg.loss.name, CausalLMFamily)
            problems = check_loss_kwargs(method, cfg.loss.kwargs, family=CausalLMFamily)
            assert not problems, f"{_rel(path)}: `{config} {' '.join(overrides)}`: {problems}"


# ----------------------------------------------------------------------------------- accelerate configs


def _check_accelerate_config(path: Path) -> None:
    """What `accelerate launch --config_file PATH` does before it starts any process, plus value checks."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import constants as C

    cfg = load_config_from_file(str(path))  # unknown top-level keys and bad distributed_type raise here
    assert isinstance(cfg, ClusterConfig), f"{_rel(path)}: expected a local-machine (cluster) config"
    parser = launch_command_parser()
    options = {a.dest for a in parser._actions}
    prefixes = {"fsdp_config": "fsdp_", "fp8_config": "fp8_", "dynamo_config": "dynamo_"}
    for section in ("fsdp_config", "deepspeed_config", "dynamo_config", "fp8_config", "mpirun_config"):
        for key in getattr(cfg, section) or {}:
            prefix = prefixes.get(section, "")
            dest = key if key.startswith(prefix) else prefix + key
            # accelerate copies these onto its argparse namespace without checking: a typo would be ignored.
            assert dest in options, f"{_rel(path)}: {section}.{key} is not an `accelerate launch` option"
    assert str(cfg.mixed_precision) in {"no", "fp16", "bf16", "fp8"}, f"{_rel(path)}: mixed_precision"
    fsdp = cfg.fsdp_config or {}
    for key, allowed in [("fsdp_sharding_strategy", C.FSDP_SHARDING_STRATEGY),
                         ("fsdp_state_dict_type", C.FSDP_STATE_DICT_TYPE),
                         ("fsdp_auto_wrap_policy", C.FSDP_AUTO_WRAP_POLICY),
                         ("fsdp_backward_prefetch", C.FSDP_BACKWARD_PREFETCH)]:
        if key in fsdp:
            assert fsdp[key] in allowed, f"{_rel(path)}: {key}={fsdp[key]!r}; allowed {allowed}"
    ds = cfg.deepspeed_config or {}
    if ds:
        assert ds.get("zero_stage") in (0, 1, 2, 3), f"{_rel(path)}: deepspeed zero_stage={ds.get('zero_stage')}"
        for key in ("offload_optimizer_device", "offload_param_device"):
            assert ds.get(key, "none") in ("none", "cpu", "nvme"), f"{_rel(path)}: {key}={ds[key]!r}"
        # Left to "auto" so that accelerate fills it from run.grad_accum (see the comment in the file).
        assert "gradient_accumulation_steps" not in ds, f"{_rel(path)}: would override run.grad_accum"
    validate = getattr(importlib.import_module("accelerate.commands.launch"), "_validate_launch_command", None)
    if validate is not None:  # private in accelerate 1.x: resolve the file exactly as `accelerate launch` does
        args = parser.parse_args(["--config_file", str(path), "-m", "mmalign", "train", "x.yaml"])
        args, defaults, _ = validate(args)
        assert args.num_processes >= 1 and defaults.distributed_type == cfg.distributed_type


def test_fsdp_config_is_full_shard_with_sharded_checkpoints():
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(CONFIGS / "accelerate" / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_use_orig_params"] is True  # LoRA: frozen and trainable parameters in one unit
    header = "\n".join(_header(CONFIGS / "accelerate" / "fsdp.yaml"))
    assert "NOT to work" in header and "save_pretrained" in header


# ------------------------------------------------------------------------------------- tiny text configs


def test_text_assets_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_text_assets", REPO / "scripts" / "make_text_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.stale_files(REPO / "assets" / "text") == []
    total = sum(p.stat().st_size for p in (REPO / "assets" / "text").iterdir() if p.is_file())
    assert total < 200_000, f"assets/text holds {total} bytes; keep shipped data small"


def _data_paths(cfg: TrainConfig) -> list[str]:
    paths = [*cfg.data.train, *cfg.data.eval, *(cfg.retain.train if cfg.retain else [])]
    for stage in cfg.stages:
        paths += list(stage.train or [])
    return paths


@pytest.mark.parametrize("path", TINY_TEXT, ids=lambda p: p.stem)
def test_tiny_text_config_trains_two_steps(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)  # the launch commands run from the repository root
    cfg = load_train_config(path)
    assert cfg.model.name_or_path == "tiny"
    for p in _data_paths(cfg):
        assert not Path(p).is_absolute() and (REPO / p).is_file(), f"{_rel(path)}: data file {p} is not in the repo"
    # Two optimizer steps in all: one per stage for staged runs.
    if cfg.stages:
        assert len(cfg.stages) <= 2
        steps = [f"stages.{i}.max_steps={2 // len(cfg.stages)}" for i in range(len(cfg.stages))]
    else:
        steps = ["run.max_steps=2"]
    summary = train(path, [*steps, f"run.output_dir={tmp_path / 'run'}", "run.progress=false", "run.resume=never",
                           "run.report_to=[jsonl]", "run.eval_every=0", "run.save_every=0"])
    assert summary["global_step"] == 2
    assert [s["name"] for s in summary["stages"]] == ([s.name for s in cfg.stages] or ["main"])
    for stage in summary["stages"]:
        assert stage["final"] and all(math.isfinite(v) for v in stage["final"].values()), stage
    assert (tmp_path / "run" / "final" / "config.json").is_file()


# ------------------------------------------------------------------------------------- real text configs


@pytest.mark.parametrize("path", REAL_TEXT, ids=lambda p: p.stem)
def test_real_text_config_names_a_documented_checkpoint(path: Path):
    from mmalign.adapters.causal_lm_family import CausalLMFamily
    from mmalign.methods.table import check_loss_kwargs, get_method

    cfg = load_train_config(path)
    model_id = cfg.model.name_or_path
    assert model_id in DOCUMENTED_MODELS, f"{_rel(path)}: {model_id!r} is not in DOCUMENTED_MODELS"
    header = "\n".join(_header(path))
    assert f"https://huggingface.co/{model_id}" in header, f"{_rel(path)}: the header must link {model_id}'s card"
    assert "model.name_or_path=" in header, f"{_rel(path)}: show how to point at a downloaded checkpoint"
    method = get_method(cfg.loss.name, CausalLMFamily)
    assert check_loss_kwargs(method, cfg.loss.kwargs) == []
    if cfg.lora.enabled:
        assert cfg.reference.strategy in ("auto", "adapter", "precomputed")  # no second copy of the weights
    elif method.needs_reference:
        assert cfg.model.dtype == "float32", "full fine-tunes keep fp32 weights under bf16 autocast"
    assert cfg.run.mixed_precision == "bf16" and cfg.model.gradient_checkpointing


# ---------------------------------------------------------------------------------------- the launcher


def _launcher(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(REPO / "scripts" / "train_text.sh"), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=60)


def test_train_text_sh_chooses_the_accelerate_config():
    cpu = _launcher("configs/text/tiny_dpo.yaml", "cpu", "run.max_steps=3")
    assert cpu.returncode == 0, cpu.stderr
    assert "ACCELERATE_USE_CPU=1" in cpu.stdout and "configs/accelerate/cpu_2proc.yaml" in cpu.stdout
    assert cpu.stdout.rstrip().endswith("-m mmalign train configs/text/tiny_dpo.yaml run.max_steps=3")
    multi = _launcher("configs/text/qwen2.5-0.5b_dpo.yaml", "8", "model.name_or_path=/m")
    assert "configs/accelerate/ddp.yaml --num_processes 8" in multi.stdout
    one = _launcher("configs/text/qwen2.5-0.5b_dpo.yaml")
    assert "-m mmalign train configs/text/qwen2.5-0.5b_dpo.yaml" in one.stdout and "accelerate" not in one.stdout
    zero3 = _launcher("configs/text/llama3-8b_dpo_lora.yaml", "8", MMALIGN_DIST="zero3")
    assert "configs/accelerate/deepspeed_zero3.yaml" in zero3.stdout
    fsdp = _launcher("configs/text/qwen2.5-0.5b_dpo.yaml", "2", MMALIGN_DIST="fsdp",
                     ACCELERATE_ARGS="--fsdp_transformer_layer_cls_to_wrap Qwen2DecoderLayer")
    assert "fsdp.yaml --num_processes 2 --fsdp_transformer_layer_cls_to_wrap Qwen2DecoderLayer" in fsdp.stdout


@pytest.mark.parametrize("args,env,message", [
    ((), {}, "config [num_gpus|cpu] [key=value ...]"),
    (("configs/text/missing.yaml",), {}, "does not exist"),
    (("configs/text/tiny_dpo.yaml", "2", "bogus"), {}, "not a key=value override"),
    (("configs/text/tiny_dpo.yaml", "0"), {}, "number of gpus"),
    (("configs/text/tiny_dpo.yaml", "2"), {"MMALIGN_DIST": "zero4"}, "not one of"),
])
def test_train_text_sh_rejects_bad_arguments(args, env, message):
    out = _launcher(*args, **env)
    assert out.returncode == 2
    assert message in (out.stdout + out.stderr).lower()


def test_python_dash_m_mmalign_is_the_launch_entry_point():
    out = subprocess.run([sys.executable, "-m", "mmalign", "train", "--help-config"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "model.name_or_path" in out.stdout


@pytest.mark.slow
def test_train_text_sh_cpu_runs_two_processes(tmp_path: Path):
    """The laptop path for real: 2 CPU processes over gloo via configs/accelerate/cpu_2proc.yaml (~30 s)."""
    env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}
    out = subprocess.run(["bash", "scripts/train_text.sh", "configs/text/tiny_dpo.yaml", "cpu", "run.max_steps=2",
                          f"run.output_dir={tmp_path}", "run.progress=false", "run.eval_every=0"],
                         cwd=REPO, env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count('"global_step": 2') == 2, out.stdout[-3000:]  # each rank prints its summary
    assert (tmp_path / "final" / "config.json").is_file()
