"""The typed-config engine: schema ← YAML ← dot-list overrides, every error reported at once."""

from __future__ import annotations

import enum
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from mmalign.config import (
    ConfigError,
    apply_overrides,
    describe,
    dump_yaml,
    from_dict,
    load_config,
    read_yaml,
    to_dict,
)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Stage:
    name: str
    lr: float = 1e-5
    beta: float = 0.1

    def validate(self) -> list[str]:
        return [f"lr must be > 0, got {self.lr}"] if self.lr <= 0 else []


@dataclass
class Optim:
    """Optimiser settings."""

    lr: float = field(default=1e-5, metadata={"help": "Peak learning rate."})
    steps: int = 100
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"

    def validate(self) -> list[str]:
        if self.warmup_steps > self.steps:
            return [f"warmup_steps ({self.warmup_steps}) must be <= steps ({self.steps})"]
        return []


@dataclass
class Model:
    path: str = "tiny"
    dtype: Literal["float32", "bfloat16"] = "float32"
    lora_rank: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    seed: int = 0
    name: str = "run"
    debug: bool = False
    tags: list[str] = field(default_factory=list)
    sizes: tuple[int, ...] = (1, 2)
    weights: dict[str, float] = field(default_factory=dict)
    color: Color = Color.RED
    out_dir: Path = Path("runs")
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    stages: list[Stage] = field(default_factory=lambda: [Stage("easy"), Stage("hard", lr=5e-6)])
    ema: Optim | None = None

    def validate(self) -> list[str]:
        names = [s.name for s in self.stages]
        return [f"stage names must be unique, got {names}"] if len(set(names)) < len(names) else []


@dataclass
class NeedsPath:
    model: Model
    data_path: str


def _errors(excinfo) -> list[str]:
    return excinfo.value.errors


def test_defaults_load_without_a_file():
    assert load_config(Run) == Run()


def test_every_supported_type_from_dict():
    cfg = from_dict(Run, {
        "seed": 3, "name": "x", "debug": True, "tags": ["a", "b"], "sizes": [4, 5, 6], "weights": {"a": 1},
        "color": "blue", "out_dir": "/tmp/o",
        "model": {"path": "p", "dtype": "bfloat16", "lora_rank": 8, "kwargs": {"n_layer": 2}},
        "optim": {"lr": 3, "betas": [0.5, 0.6], "schedule": "linear"},
        "stages": [{"name": "only"}], "ema": {"lr": 0.1},
    })
    assert cfg.sizes == (4, 5, 6) and cfg.weights == {"a": 1.0} and isinstance(cfg.weights["a"], float)
    assert cfg.color is Color.BLUE and cfg.out_dir == Path("/tmp/o")
    assert cfg.model == Model("p", "bfloat16", 8, {"n_layer": 2})
    assert cfg.optim.lr == 3.0 and cfg.optim.betas == (0.5, 0.6) and cfg.optim.schedule == "linear"
    assert cfg.stages == [Stage("only")] and cfg.ema == Optim(lr=0.1)


def test_all_errors_reported_at_once_with_paths_and_allowed_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: ten\noptim:\n  lrr: 1e-5\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(Run, path, overrides=["model.dtype=fp16"])
    errors = _errors(excinfo)  # one line per problem, in schema order, from the file and the command line
    assert len(errors) == 3, errors
    assert errors[0] == "seed: expected int, got 'ten'"
    assert errors[1] == "model.dtype: 'fp16' is not allowed; allowed values: 'float32', 'bfloat16'"
    assert errors[2].startswith("unknown key 'optim.lrr' (did you mean 'optim.lr'?); valid keys of 'optim':")
    text = str(excinfo.value)
    assert f"({path} + command line): 3 errors" in text
    assert all(f"  - {e}" in text.splitlines() for e in errors)


def test_unknown_key_suggests_and_lists_the_section_keys():
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Run, {"optim": {"lrr": 1}, "sed": 1, "zzz": 2})
    top = "seed, name, debug, tags, sizes, weights, color, out_dir, model, optim, stages, ema"
    assert _errors(excinfo) == [
        f"unknown key 'sed' (did you mean 'seed'?); valid keys of the top level: {top}",
        f"unknown key 'zzz'; valid keys of the top level: {top}",
        "unknown key 'optim.lrr' (did you mean 'optim.lr'?); valid keys of 'optim': lr, steps, warmup_steps, "
        "betas, schedule",
    ]


def test_literal_and_enum_errors_list_allowed_values():
    with pytest.raises(ConfigError) as excinfo:
        from_dict(Run, {"optim": {"schedule": "cosin"}, "color": "green"})
    assert _errors(excinfo) == [
        "color: 'green' is not allowed; allowed values: 'red', 'blue'",
        "optim.schedule: 'cosin' is not allowed; allowed values: 'cosine', 'linear', 'constant' "
        "(did you mean 'cosine'?)",
    ]


def test_command_line_strings_are_read_by_field_type():
    cfg = load_config(Run, overrides=[
        "debug=yes", "seed=7", "optim.lr=1e-6", "optim.steps=1e3", "model.lora_rank=null", "tags=[a, b]",
        "sizes=[3,4]", "name=1.10", "weights={a: 1, b: 0.5}", "model.kwargs.n_layer=2", "color=BLUE",
        "out_dir=/tmp/x", "optim.betas=[0.8, 0.9]",
    ])
    assert cfg.debug is True and cfg.seed == 7 and cfg.optim.lr == 1e-6 and cfg.optim.steps == 1000
    assert cfg.model.lora_rank is None and cfg.tags == ["a", "b"] and cfg.sizes == (3, 4)
    assert cfg.name == "1.10"  # a str field keeps the text verbatim, not float 1.1
    assert cfg.weights == {"a": 1.0, "b": 0.5} and cfg.model.kwargs == {"n_layer": 2}  # Any: parsed as YAML
    assert cfg.color is Color.BLUE and cfg.out_dir == Path("/tmp/x") and cfg.optim.betas == (0.8, 0.9)
    assert type(cfg.name) is str and type(cfg.tags[0]) is str  # no command-line marker leaks out
    cfg = load_config(Run, overrides=["debug=0", "model.lora_rank=4", "ema.lr=0.5"])
    assert cfg.debug is False and cfg.model.lora_rank == 4
    assert cfg.ema == Optim(lr=0.5)  # a section left at None is created by its first override
    # "null" means None only where None is allowed; a str field keeps the word.
    assert load_config(Run, overrides=["name=null"]).name == "null"


def test_apply_overrides_keeps_text_and_copies():
    data = {"a": {"b": 1}, "l": [{"x": 1}]}
    assert apply_overrides(data, ["a.c=2", "l.0.x=3"]) == {"a": {"b": 1, "c": "2"}, "l": [{"x": "3"}]}
    assert data == {"a": {"b": 1}, "l": [{"x": 1}]}
    with pytest.raises(ConfigError) as excinfo:  # malformed tokens are all reported before any value is read
        apply_overrides(data, ["seed", "=3", "a..b=1", "ok=1"])
    assert _errors(excinfo) == [
        "override 'seed' is not of the form key=value (for example optim.lr=1e-5)",
        "override '=3' is not of the form key=value (for example optim.lr=1e-5)",
        "override 'a..b=1': key 'a..b' has an empty component",
    ]


def test_bad_command_line_values():
    with pytest.raises(ConfigError) as excinfo:
        load_config(Run, overrides=["debug=maybe", "optim.steps=0.5", "optim.betas=[1]", "tags=a"])
    assert _errors(excinfo) == [
        "debug: expected bool (true/false/yes/no/1/0), got 'maybe'",
        "tags: expected a list, got 'a'",
        "optim.steps: expected int, got '0.5'",
        "optim.betas: expected 2 items (float, float), got 1: [1] (list)",
    ]


def test_list_of_sections_override_by_index():
    cfg = load_config(Run, overrides=["stages.1.lr=1e-6", "stages.0.name=warm"])
    assert cfg.stages == [Stage("warm"), Stage("hard", lr=1e-6)]
    with pytest.raises(ConfigError) as excinfo:
        load_config(Run, overrides=["stages.5.lr=1", "stages.x.lr=1", "seed.x=1"])
    assert _errors(excinfo) == [
        "override 'stages.5.lr=1': index 5 is out of range: 'stages' has 2 entries",
        "override 'stages.x.lr=1': 'stages' is a list; index it with a number 0..1, not 'x'",
        "override 'seed.x=1': 'seed' holds 0 (int), which has no key 'x'",
    ]


def test_yaml_then_overrides_then_extra_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("# a comment\nseed: 1\nname: from_yaml\noptim:\n  lr: 1e-6\n  steps: 50\nstages:\n"
                    "  - {name: a}\n  - {name: b}\n  - {name: c, beta: 0.3}\n")
    assert read_yaml(path)["optim"]["lr"] == "1e-6"  # PyYAML's YAML 1.1 quirk; the float field still reads it
    cfg = load_config(Run, path, overrides=["seed=2", "optim.steps=60", "stages.2.lr=2e-5"],
                      extra={"seed": 3, "model.path": "/ckpt"})
    assert (cfg.seed, cfg.name, cfg.optim.lr, cfg.optim.steps) == (3, "from_yaml", 1e-6, 60)
    assert cfg.optim.warmup_steps == 0 and cfg.model == Model(path="/ckpt")  # untouched keys keep defaults
    assert cfg.stages == [Stage("a"), Stage("b"), Stage("c", lr=2e-5, beta=0.3)]  # a YAML list replaces
    assert load_config(Run, {"optim": {"steps": 5}}).optim == Optim(steps=5)


def test_validate_errors_from_every_level_collected_with_prefixes():
    with pytest.raises(ConfigError) as excinfo:
        load_config(Run, overrides=["optim.warmup_steps=200", "stages.0.lr=-1", "stages.1.name=easy",
                                    "model.dtype=int8"])
    # A section's own check runs once its fields are typed; the top-level check waits for a bad dtype to go.
    assert _errors(excinfo) == [
        "model.dtype: 'int8' is not allowed; allowed values: 'float32', 'bfloat16'",
        "optim.warmup_steps (200) must be <= steps (100)",
        "stages.0.lr must be > 0, got -1.0",
    ]


def test_top_level_validate_runs_when_sections_are_typed():
    with pytest.raises(ConfigError) as excinfo:
        load_config(Run, overrides=["optim.warmup_steps=200", "stages.0.lr=-1", "stages.1.name=easy"])
    assert _errors(excinfo) == [
        "optim.warmup_steps (200) must be <= steps (100)",
        "stages.0.lr must be > 0, got -1.0",
        "stage names must be unique, got ['easy', 'easy']",
    ]


def test_missing_required_keys_and_null():
    with pytest.raises(ConfigError) as excinfo:
        load_config(NeedsPath, {"model": {"path": None}})
    assert _errors(excinfo) == ["model.path: must not be null; expected str",
                                "data_path: required key is missing (str)"]
    assert load_config(NeedsPath, overrides=["data_path=d"]).model == Model()


def test_round_trip_and_dump(tmp_path):
    cfg = load_config(Run, overrides=["color=BLUE", "sizes=[7]", "model.kwargs={a: [1, 2]}", "ema.steps=3",
                                      "out_dir=/tmp/r", "optim.lr=2e-6"])
    plain = to_dict(cfg)
    assert plain["color"] == "blue" and plain["sizes"] == [7] and plain["out_dir"] == "/tmp/r"
    assert from_dict(Run, plain) == cfg
    out = dump_yaml(cfg, tmp_path / "sub" / "cfg.yaml", header="Saved run config.\nmmalign train --config X")
    assert out.read_text().startswith("# Saved run config.\n# mmalign train --config X\nseed: 0\n")
    assert load_config(Run, out) == cfg


def test_missing_file_and_yaml_syntax_error_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(Run, missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: 1\noptim:\n  lr: [1, 2\nname: x\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(Run, broken)
    assert str(broken) in str(excinfo.value)
    assert _errors(excinfo)[0].startswith(f"{broken}:4:")
    assert "YAML syntax error" in _errors(excinfo)[0]
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(Run, listing)


def test_error_pickles_and_describe_lists_keys():
    err = pickle.loads(pickle.dumps(ConfigError(["a: bad", "b: worse"], "x.yaml")))
    assert err.errors == ["a: bad", "b: worse"] and err.source == "x.yaml" and "  - b: worse" in str(err)
    text = describe(Run)
    assert "optim.lr: float = 1e-05\n    Peak learning rate." in text
    assert "optim: Optim\n    Optimiser settings." in text
    assert "optim.schedule: 'cosine' | 'linear' | 'constant' = \"cosine\"" in text
    assert "stages.N.name: str (required)" in text and "ema.lr: float = 1e-05" in text
    assert "model.lora_rank: int | null = null" in text


def test_python_side_values_are_used_as_given():
    extra = {"optim.steps": 7, "name": "1.10", "stages": [Stage("s", lr=1.0)], "model.kwargs": {"k": "3"}}
    cfg = load_config(Run, {"optim": Optim(lr=0.5), "color": Color.BLUE}, extra=extra)
    assert cfg.optim == Optim(lr=0.5, steps=7) and cfg.color is Color.BLUE and cfg.name == "1.10"
    assert cfg.stages == [Stage("s", lr=1.0)]
    assert cfg.model.kwargs == {"k": "3"}  # python text stays text; only command-line text is read as YAML
    with pytest.raises(ConfigError, match=r"extra override 'seed.x': 'seed' holds 0 \(int\)"):
        load_config(Run, extra={"seed.x": 1})
