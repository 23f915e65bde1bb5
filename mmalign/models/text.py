"""Text causal-LM builders: tiny random Llamas for tests/demos, real checkpoints, value heads and LoRA.

Two ways in, one model type out (a ``transformers`` causal LM, optionally wrapped):

- :func:`build_tiny_causal_lm` makes a deterministic random Llama in-process; nothing is downloaded.
- :func:`load_causal_lm` is the path users take for real checkpoints (``from_pretrained``). It checks a
  local directory before handing it to ``transformers`` so that a typo fails with a message naming the
  path and the missing file, not with a hub lookup error. Hub ids still work where there is internet.

Reward models use :class:`ValueHeadModel` (a causal LM plus ``Linear(hidden, 1)``) rather than
``AutoModelForSequenceClassification``: it keeps ``lm_head`` (so the same model can be scored by
``mmalign.adapters.causal_lm`` and regularised with NLL), and it pools at the last *completion* token
chosen by the adapter instead of by ``pad_token_id`` lookup, which breaks on left-padded prompts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from ..config import ConfigError, ModelNotADirectory, ModelNotFound, ModelRequirementError
from .load_checks import check_finite, check_weight_files, hub_error, incomplete_hint, loading, lora_targets_error

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
VALUE_HEAD_FILE = "value_head.safetensors"
# transformers renamed from_pretrained's ``torch_dtype`` to ``dtype`` in 4.56; pyproject allows >=4.46.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
# Any one of these marks a directory that a tokenizer's save_pretrained wrote.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
# Any one of these marks a directory that save_pretrained wrote weights into.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    **overrides: Any,
) -> LlamaConfig:
    """A small Llama config (GQA, RoPE, RMSNorm: the same code paths as real Llama/Qwen checkpoints).

    ``overrides`` go straight to :class:`LlamaConfig` (e.g. ``pad_token_id``, ``eos_token_id``,
    ``initializer_range``, ``tie_word_embeddings``). Attention defaults to ``eager``: on CPU it is as fast
    as SDPA at these sizes and gives bit-stable results across torch versions.
    """
    sizes = {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
             "num_kv_heads": num_kv_heads, "intermediate_size": intermediate_size,
             "max_position_embeddings": max_position_embeddings}
    typical = {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
               "intermediate_size": 128, "max_position_embeddings": 512}
    errors = [f"model.tiny.{k}={v!r} must be an integer >= 1 (e.g. {typical[k]})" for k, v in sizes.items()
              if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    known = ({f.name for f in dataclasses.fields(LlamaConfig)} | {"attn_implementation"}  # a from_config option
             if dataclasses.is_dataclass(LlamaConfig) else None)
    if known is not None:  # LlamaConfig keeps unknown keyword arguments as attributes: a typo would do nothing
        options = sorted({*sizes, *known})
        errors += [f"model.tiny.{k}: unknown key for a tiny Llama{_close(k, options)}; valid: the sizes "
                   f"{sorted(sizes)} or a transformers LlamaConfig field" for k in overrides if k not in known]
    if errors:
        raise ConfigError(errors)
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ConfigError(
            f"model.tiny: hidden_size={hidden_size} must be divisible by num_heads={num_heads}, and "
            f"num_heads by num_kv_heads={num_kv_heads}; pick e.g. hidden_size=64, num_heads=4, num_kv_heads=2"
        )
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _close(word: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, options, n=2, cutoff=0.7)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def build_tiny_causal_lm(vocab_size: int, seed: int = 0, **kw: Any) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama; the same ``seed`` gives the same weights, without touching the
    global RNG state of the caller. ``kw`` goes to :func:`tiny_llama_config`."""
    config = tiny_llama_config(vocab_size, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


@dataclass
class ValueHeadOutput:
    """``logits`` ``[B, T, V]`` from the causal LM and ``values`` ``[B, T]`` from the scalar head."""

    logits: Tensor
    values: Tensor


class ValueHeadModel(nn.Module):
    """A causal LM with a scalar head on its final hidden states (reward models, value baselines).

    ``base`` may be a plain ``transformers`` model or a ``peft.PeftModel``; ``mmalign.adapters.causal_lm``
    reaches the decoder through either and applies ``v_head`` at the last scored completion token.
    """

    def __init__(self, base: nn.Module, v_head: nn.Linear | None = None):
        super().__init__()
        self.base = base
        hidden = _base_config(base).hidden_size
        if v_head is None:
            v_head = nn.Linear(hidden, 1)
            # Small init so that untrained rewards start near 0 and Bradley-Terry losses start near log 2.
            nn.init.normal_(v_head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(v_head.bias)
        self.v_head = v_head.to(device=_first_param(base).device)

    @property
    def config(self):
        return _base_config(self.base)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> ValueHeadOutput:
        out = self.base(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs
        )
        last = out.hidden_states[-1]
        return ValueHeadOutput(
            logits=out.logits, values=self.v_head(last.to(self.v_head.weight.dtype)).squeeze(-1)
        )

    def generate(self, *args: Any, **kwargs: Any):
        return self.base.generate(*args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None,
                        **kwargs: Any) -> None:
        """Writes the base model (or its PEFT adapter) with ``save_pretrained`` and the head beside it;
        ``state_dict`` (keys ``base.*`` / ``v_head.*``) replaces the modules' own weights."""
        from safetensors.torch import save_file

        from . import sub_state_dict

        self.base.save_pretrained(save_directory, state_dict=sub_state_dict(state_dict, "base."), **kwargs)
        head = self.v_head.state_dict() if state_dict is None else sub_state_dict(state_dict, "v_head.")
        state = {k: v.detach().cpu().contiguous() for k, v in head.items()}
        save_file(state, str(Path(save_directory) / VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **load_kwargs: Any) -> ValueHeadModel:
        """Loads what :meth:`save_pretrained` wrote; ``load_kwargs`` go to :func:`load_causal_lm`."""
        return load_causal_lm(path, value_head=True, **load_kwargs)


def save_causal_lm(model: nn.Module, tokenizer: Any, path: str | os.PathLike, *, in_memory_base: bool = False,
                   state_dict: dict | None = None) -> Path:
    """``save_pretrained`` a causal LM (full, PEFT adapter, or :class:`ValueHeadModel`) and its tokenizer.

    ``in_memory_base``: a LoRA adapter whose base exists only in memory (a random ``tiny`` model, or a base
    that earlier adapters were merged into) — that base is saved to ``path/base`` as well and the adapter
    points at it, so :func:`load_causal_lm` / ``PeftModel.from_pretrained`` rebuild the trained model.
    ``state_dict`` (keys relative to ``model``): the gathered weights of a sharded run, written instead of
    the model's own tensors."""
    from . import sub_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    value_head = isinstance(model, ValueHeadModel)
    peft_model = model.base if value_head else model  # reward models: LM in .base
    if in_memory_base and hasattr(peft_model, "peft_config"):
        base_dir = (path / "base").resolve()
        inner = peft_model.get_base_model()
        source = (inner.state_dict() if state_dict is None else
                  sub_state_dict(state_dict, "base.base_model.model." if value_head else "base_model.model."))
        # The base's own weights: drop the LoRA factors, undo peft's `.base_layer` renaming.
        base_state = {k.replace(".base_layer.", "."): v for k, v in source.items() if "lora_" not in k}
        inner.save_pretrained(str(base_dir), state_dict=base_state)
        tokenizer.save_pretrained(str(base_dir))
        for adapter_cfg in peft_model.peft_config.values():
            adapter_cfg.base_model_name_or_path = str(base_dir)
    model.save_pretrained(str(path), state_dict=state_dict)
    tokenizer.save_pretrained(str(path))
    return path


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    value_head: bool = False,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """Load a causal LM: a local ``save_pretrained`` directory, or a hub id where there is internet.

    A directory holding only a PEFT adapter (``adapter_config.json``) loads its base model from
    ``base_model_name_or_path`` and attaches the adapter (trainable). With ``value_head=True`` the result is
    a :class:`ValueHeadModel`, its head read from ``value_head.safetensors`` when the directory has one and
    freshly initialised otherwise. ``gradient_checkpointing`` turns on non-reentrant checkpointing and
    switches the KV cache off (the adapter then scores through its concatenated path).
    """
    if dtype not in DTYPES:
        raise ValueError(f"load_causal_lm: dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
    local = _as_local_dir(name_or_path)
    adapter_dir = None
    if (
        local is not None
        and not (local / "config.json").is_file()
        and (local / "adapter_config.json").is_file()
    ):
        adapter_dir = local
        with loading(local / "adapter_config.json", "adapter config"):
            base_path = json.loads((local / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_path:
            raise ValueError(
                f"{local / 'adapter_config.json'}: field 'base_model_name_or_path' is empty; set it to the "
                "base checkpoint directory the adapter was trained on"
            )
        beside = adapter_dir / "base"
        if not Path(base_path).expanduser().exists() and (beside / "config.json").is_file():
            # An in-memory base saved beside the adapter: its recorded absolute path breaks when the run
            # directory is moved or copied, the sibling ``base/`` does not.
            base_path = str(beside)
        local = _as_local_dir(base_path)
        name_or_path = base_path
    if local is not None:
        _check_checkpoint_dir(local)

    kwargs: dict[str, Any] = {_DTYPE_KWARG: DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit or load_in_8bit:
        kwargs.update(_quantization_kwargs(load_in_4bit, load_in_8bit, DTYPES[dtype]))
    if local is None:
        model = _from_hub(AutoModelForCausalLM, name_or_path, **kwargs)
    else:
        with loading(local):
            model = AutoModelForCausalLM.from_pretrained(str(local), **kwargs)
    if not (load_in_4bit or load_in_8bit):  # quantised weights are integers; bitsandbytes checks its own
        check_finite(model, local or name_or_path)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings (LoRA) without enable_input_require_grads.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if adapter_dir is not None:
        from peft import PeftModel

        check_weight_files(adapter_dir)
        with loading(adapter_dir, "LoRA adapter"):
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        check_finite({n: p for n, p in model.named_parameters() if "lora_" in n}, adapter_dir)
    if not value_head:
        return model
    wrapped = ValueHeadModel(model)
    head_file = Path(adapter_dir or local or "") / VALUE_HEAD_FILE
    if (adapter_dir or local) is not None and head_file.is_file():
        from safetensors.torch import load_file

        check_weight_files(head_file.parent, [head_file])
        with loading(head_file, "value head"):
            wrapped.v_head.load_state_dict(load_file(str(head_file)))
        check_finite(wrapped.v_head, head_file)
    return wrapped


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, set up the way ``TextBatch`` wants it: left padding for prompts and a pad
    token (the EOS token when the checkpoint defines none, which is what Llama-style tokenizers need)."""
    from transformers import AutoTokenizer

    local = _as_local_dir(name_or_path)
    if local is None:
        tokenizer = _from_hub(AutoTokenizer, name_or_path, trust_remote_code=trust_remote_code)
    else:
        if not any((local / f).is_file() for f in TOKENIZER_FILES):
            if not (local / "config.json").is_file():
                _check_checkpoint_dir(local)  # names what a checkpoint needs and what the directory holds
            present = sorted(p.name for p in local.iterdir())
            raise ModelNotFound(f"load_tokenizer: {str(local)!r} holds no tokenizer (none of {list(TOKENIZER_FILES)}; "
                                f"it holds {present}); fix: save the tokenizer there (tokenizer.save_pretrained), or "
                                f"set model.tokenizer to the directory that has it{incomplete_hint(local)}")
        with loading(local, "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(str(local), trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"load_tokenizer: the tokenizer at {str(name_or_path)!r} has neither a pad nor an EOS token; "
                "add one with tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the embeddings"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def apply_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    modules_to_save: list[str] | None = None,
) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (``peft``); only adapter weights stay trainable.

    ``"all-linear"`` targets every linear layer except ``lm_head``. For a :class:`ValueHeadModel` the LoRA
    goes on its base and the value head stays fully trainable; the wrapper itself is returned.
    """
    from peft import LoraConfig, get_peft_model

    if r <= 0:
        raise ValueError(f"apply_lora: r={r} must be a positive integer (typical: 8, 16, 64)")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    inner = model.base if isinstance(model, ValueHeadModel) else model
    try:
        wrapped = get_peft_model(inner, config)
    except ValueError as err:
        if "not found in the base model" not in str(err) and "No modules were targeted" not in str(err):
            raise
        raise lora_targets_error(inner, target_modules, err) from None
    if isinstance(model, ValueHeadModel):
        model.base = wrapped
        model.v_head.requires_grad_(True)
        return model
    return wrapped


def _as_local_dir(name_or_path: str | os.PathLike) -> Path | None:
    """The local directory meant by ``name_or_path``, or None for a hub id (``org/name``).

    Anything that exists, is absolute, starts with ``.``/``~`` or has more than one ``/`` is a path; a
    missing one must raise here, since ``transformers`` would otherwise try the hub and fail obscurely.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    looks_local = path.exists() or text.startswith((".", "~", "/")) or text.count("/") > 1 or "\\" in text
    if not looks_local:
        return None
    if not path.exists():
        raise ModelNotFound(
            f"load_causal_lm: no checkpoint directory at {str(path)!r}; expected a directory written by "
            "save_pretrained (config.json + model.safetensors). Check the path (hub ids look like 'org/name' "
            f"and need internet){incomplete_hint(path)}"
        )
    if not path.is_dir():
        raise ModelNotADirectory(
            f"load_causal_lm: {str(path)!r} is a file; pass the directory that holds config.json and "
            "the weights"
        )
    return path


def _from_hub(cls: Any, name: str | os.PathLike, **kwargs: Any) -> Any:
    """``cls.from_pretrained(hub_id)``; without internet a clean error that says to pass a local directory."""
    try:
        return cls.from_pretrained(str(name), **kwargs)
    except OSError as err:
        raise hub_error(name, err) from err


def _check_checkpoint_dir(path: Path, who: str = "load_causal_lm") -> None:
    present = sorted(p.name for p in path.iterdir())
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append(f"model weights (one of {', '.join(WEIGHT_FILES)})")
    if missing:
        raise ModelNotFound(
            f"{who}: checkpoint directory {str(path)!r} is missing {' and '.join(missing)}; it "
            f"holds {present or 'nothing'}. Write it with model.save_pretrained(dir) or download the full "
            f"checkpoint{incomplete_hint(path)}"
        )
    check_weight_files(path)


def _quantization_kwargs(
    load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype
) -> dict[str, Any]:
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_causal_lm: load_in_4bit and load_in_8bit are exclusive; set only one")
    flag = "load_in_4bit" if load_in_4bit else "load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelRequirementError(
            f"model.{flag}=true: 4/8-bit loading needs the 'bitsandbytes' package, which is not installed; fix: "
            f"pip install bitsandbytes (on a CUDA machine), or model.{flag}=false and model.dtype=bfloat16"
        )
    if not torch.cuda.is_available():
        raise ModelRequirementError(
            f"model.{flag}=true: 4/8-bit (bitsandbytes) loading needs a CUDA GPU and none is visible; fix: "
            f"model.{flag}=false and load in float32/bfloat16"
        )
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
        )
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    # Quantised weights cannot be moved after loading, so place them on this process's GPU up front.
    return {"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}}


def _base_config(model: nn.Module):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(
            f"ValueHeadModel: expected a transformers causal LM (or PeftModel), got {type(inner).__name__}"
        )
    return inner.config.get_text_config()


def _first_param(model: nn.Module) -> Tensor:
    return next(model.parameters())
