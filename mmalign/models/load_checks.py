"""Checks shared by the model loaders (text, LVLM, diffusion, CLIP): a bad checkpoint a config names becomes one
:class:`~mmalign.config.ModelLoadError` naming the path and the fix, never a traceback from deep inside
``from_pretrained``, safetensors or peft.

- :func:`check_weight_files`: every ``*.safetensors`` file's header is read (``safe_open``: a few KB, no tensor
  data), which catches random bytes, zero-byte and truncated files (the header's offsets must cover the file).
- :func:`loading`: wraps a ``from_pretrained`` call; the OS, safetensors, pickle and JSON failures it may raise
  are turned into a :class:`~mmalign.config.ModelFileError` naming the path.
- :func:`check_finite`: one float32 sum per tensor (no tensor-sized temporaries): a NaN or inf weight is refused
  at load instead of as a non-finite loss at step 1. Weights whose finite values sum past float32's range
  (~3e38) would also be refused; no trained model has such weights.
- :func:`lora_targets_error`: peft's "target modules not found" as the key, the value and module names that exist.
- :func:`incomplete_hint`: a ``final/`` or ``checkpoint-N`` directory of a run that a kill left incomplete gets
  the fix "resume that run from its newest checkpoint".
"""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, ModelFileError, ModelLoadError

__all__ = ["check_finite", "check_weight_files", "hub_error", "incomplete_hint", "loading", "lora_targets_error"]

COMPLETE_FIX = ("fix: point the config at a complete checkpoint (download it again, or write it with "
                "save_pretrained)")


def incomplete_hint(path: Path) -> str:
    """Extra advice when ``path`` is a run's ``final``/``final.tmp``/``checkpoint-N`` directory."""
    path = Path(path)
    name = path.name
    run_dir = path.parent
    if name in ("final", "final.tmp") or name.startswith("checkpoint-"):
        return (f"; {path} looks like the output of a run in {run_dir} that was stopped before it finished writing: "
                f"resume that run from its newest checkpoint (mmalign train {run_dir / 'config.yaml'}) and use its "
                f"final/ once written, or point at one of its complete checkpoint-N directories")
    return ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    files = sorted(directory.glob("*.safetensors"))
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ModelFileError(f"{index} is not a valid shard index ({_first_line(err)}); {COMPLETE_FIX}"
                                 f"{incomplete_hint(directory)}") from None
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise ModelFileError(f"{directory}: the shard index names {len(missing)} missing file(s) "
                                 f"{missing[:3]}; {COMPLETE_FIX}{incomplete_hint(directory)}")
        files = sorted(set(files) | {directory / s for s in shards})
    return files


def check_weight_files(directory: Path, files: Iterable[Path] | None = None) -> None:
    """Read the header of every safetensors file in ``directory`` (or ``files``); refuse empty, random or
    truncated ones with the file, the reason and the fix."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    for f in (list(files) if files is not None else _safetensors_files(directory)):
        size = f.stat().st_size
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            what = "is empty (0 bytes)" if size == 0 else f"is corrupt or truncated ({size} bytes; {_first_line(err)})"
            raise ModelFileError(f"weights file {f} {what}; {COMPLETE_FIX}{incomplete_hint(f.parent)}") from None


@contextlib.contextmanager
def loading(path: str | Path, what: str = "checkpoint") -> Iterator[None]:
    """Turn the file errors of a ``from_pretrained`` call on a local ``path`` into a :class:`ModelFileError`."""
    from safetensors import SafetensorError

    try:
        yield
    except (ConfigError, torch.OutOfMemoryError):  # already a clean error; out of memory is no file problem
        raise
    except (OSError, SafetensorError, EOFError, pickle.UnpicklingError, json.JSONDecodeError, UnicodeDecodeError,
            KeyError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{what} {str(path)!r} could not be loaded ({_first_line(err)}); {COMPLETE_FIX}"
                             f"{incomplete_hint(Path(path))}") from err


def hub_error(name: str | Path, err: BaseException) -> ModelFileError:
    """A hub id that could not be fetched (no internet, HF_HUB_OFFLINE=1, a typo): say to pass a local directory."""
    import os

    offline = "HF_HUB_OFFLINE=1 is set. " if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true") else ""
    return ModelFileError(
        f"could not load {str(name)!r} as a hub id ({_first_line(err)}). {offline}"
        "Without internet pass a local directory written by save_pretrained or huggingface-cli download (a path: "
        "./dir, /abs/dir or ~/dir)")


def check_finite(model: nn.Module | dict, where: str | Path) -> None:
    """Refuse weights holding NaN or inf, naming up to three tensors (float tensors only; meta tensors of an
    offloaded model are skipped)."""
    state = model if isinstance(model, dict) else model.state_dict()
    bad = []
    with torch.no_grad():
        for name, t in state.items():
            if not torch.is_tensor(t) or not t.is_floating_point() or t.device.type == "meta" or t.numel() == 0:
                continue
            if not torch.isfinite(t.sum(dtype=torch.float32)):
                bad.append(name)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ModelFileError(f"checkpoint {str(where)!r} holds NaN or inf weights in {len(bad)} tensor(s) ({shown}); "
                             "a diverged run or a damaged file wrote them; fix: use an earlier checkpoint of that run "
                             "or download the model again")


def lora_targets_error(model: nn.Module, targets: str | list[str], err: Exception) -> ModelLoadError:
    """``lora.target_modules`` matched no module of ``model``: name the value and module names that exist."""
    def names(kinds: tuple) -> list[str]:  # the last name component, as peft matches it ("to_out.0": both)
        found = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] if n.rsplit(".", 1)[-1].isdigit() and "." in n
                 else n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, kinds)}
        return sorted(found)

    linear = names((nn.Linear,))
    other = [n for n in names((nn.Conv1d, nn.Conv2d, nn.Embedding)) if n not in linear]
    shown = ", ".join((linear + other)[:16]) + (", ..." if len(linear) + len(other) > 16 else "")
    return ModelLoadError(f"lora.target_modules={targets!r} matches no module of the model ({_first_line(err)}); "
                          f"its linear (then conv/embedding) module names include: {shown}; fix: list some of these, "
                          "or lora.target_modules=all-linear")
