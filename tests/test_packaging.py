"""Packaging (usability issue, item 12): a small core, one extra per family, and errors that name the extra.

- ``import mmalign.losses`` and a DPO forward/backward work with every non-torch dependency made unimportable;
- the extras table in :mod:`mmalign.extras` and ``pyproject.toml`` list the same packages;
- a family whose package is missing fails with ``pip install 'mmalign[EXTRA]'``, on import and in ``mmalign train``;
- ``python -m build`` makes a wheel whose metadata lists the extras.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import tomllib

from mmalign.extras import EXTRAS, MissingExtraError, missing_modules, require

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# distribution name -> import name, where they differ
IMPORT_NAME = {"open_clip_torch": "open_clip", "pillow": "PIL", "pyyaml": "yaml"}
CORE_IMPORTS = {"accelerate", "safetensors", "numpy", "yaml", "typer", "tqdm"}

# Run in a subprocess: hide the given top-level packages from every import finder present at start-up (the
# installed packages are still on disk; this is what "not installed" looks like to the interpreter).
HIDE = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = set({blocked!r})
    class _Hidden(importlib.abc.MetaPathFinder):
        def __init__(self, inner):
            self.inner = inner
        def find_spec(self, name, path=None, target=None):
            if name.partition('.')[0] in BLOCKED:
                return None
            return self.inner.find_spec(name, path, target)
    sys.meta_path[:] = [_Hidden(f) if hasattr(f, 'find_spec') else f for f in sys.meta_path]
""")


def _dists(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def _run(code: str, blocked: set[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE.format(blocked=sorted(blocked)) + textwrap.dedent(code)],
                          capture_output=True, text=True, cwd=ROOT, timeout=240)


def test_extras_table_matches_pyproject():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for name, modules in EXTRAS.items():
        assert name in extras, f"pyproject.toml has no extra {name!r}"
        imports = {IMPORT_NAME.get(d, d) for d in _dists(extras[name])}
        assert imports == set(modules), f"extra {name!r}: pyproject {sorted(imports)} vs extras.py {sorted(modules)}"
    assert f"mmalign[{','.join(n for n in EXTRAS if n != 'wandb')}]" in extras["all"]
    core = {IMPORT_NAME.get(d, d) for d in _dists(PYPROJECT["project"]["dependencies"])}
    assert core == CORE_IMPORTS | {"torch"}


def test_losses_import_and_train_step_with_only_torch():
    every = {m for mods in EXTRAS.values() for m in mods} | CORE_IMPORTS | {"scipy", "pandas", "tokenizers"}
    out = _run("""
        import torch
        import mmalign.losses as L
        pol = torch.randn(4, 2, requires_grad=True)
        ref = torch.randn(4, 2)
        res = L.dpo(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=0.1)
        res.loss.backward()
        assert pol.grad is not None and torch.isfinite(pol.grad).all()
        leaked = sorted(m for m in BLOCKED if m in sys.modules)
        print('OK', float(res.loss), leaked)
    """, every)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK") and out.stdout.rstrip().endswith("[]"), out.stdout


def test_missing_family_package_names_the_extra():
    out = _run("""
        try:
            import mmalign.models.text  # imports transformers at module level
        except ImportError as err:
            print(type(err).__name__, '|', err)
    """, {"transformers"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MissingExtraError" in out.stdout and "pip install 'mmalign[text]'" in out.stdout, out.stdout
    assert "also in diffusion, clip, vision" in out.stdout, out.stdout


def test_train_without_the_extra_is_a_clean_error():
    out = _run("""
        from typer.testing import CliRunner
        from mmalign.cli import app
        res = CliRunner().invoke(app, ['train', 'configs/diffusion/tiny_dpo.yaml', 'run.output_dir=/nonexistent/x'])
        print('EXIT', res.exit_code)
        print(res.output)
    """, {"diffusers"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "EXIT 2" in out.stdout and "pip install 'mmalign[diffusion]'" in out.stdout, out.stdout
    assert "Traceback" not in out.stdout


def test_require_and_missing_modules():
    assert missing_modules("text") == []
    require("text", "diffusion")
    with pytest.raises(KeyError, match="unknown extra"):
        missing_modules("nope")
    # other libraries' optional imports are untouched: the hint answers only imports made by mmalign
    with pytest.raises(ModuleNotFoundError) as err:
        __import__("wandb_not_a_package_xyz")
    assert not isinstance(err.value, MissingExtraError)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked files")
def test_wheel_metadata_lists_the_extras(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "mmalign", "pyproject.toml",
                            "README.md"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    res = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                          "--outdir", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("mmalign-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    provided = set(re.findall(r"^Provides-Extra: (\S+)$", meta, flags=re.M))
    assert provided == set(PYPROJECT["project"]["optional-dependencies"])
    assert "Requires-Dist: diffusers>=0.31; extra == \"diffusion\"" in meta
    assert not re.search(r"^Requires-Dist: diffusers[^;]*$", meta, flags=re.M), "diffusers must be an extra only"


def test_wandb_without_its_extra_is_a_config_error(monkeypatch):
    from mmalign import extras
    from mmalign.api import load_train_config
    from mmalign.config import ConfigError

    real = extras.missing_modules
    monkeypatch.setattr(extras, "missing_modules", lambda e: ["wandb"] if e == "wandb" else real(e))
    with pytest.raises(ConfigError, match=r"report_to includes wandb, which is not installed; fix: pip install "
                                          r"'mmalign\[wandb\]'"):
        load_train_config(ROOT / "configs/text/tiny_dpo.yaml", ["run.report_to=[jsonl, wandb]"])
