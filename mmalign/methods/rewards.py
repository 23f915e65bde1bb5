"""Sequence rewards for the online recipes (online DPO / XPO, token-level guidance): named programmatic
rewards, user functions by ``"module:function"``, and a saved value-head reward model.

Every loader returns one batched signature, ``f(prompts, completions) -> list[float]``, so the recipes score
their samples the same way whichever kind the config names.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.causal_lm import score_batch, unwrap_causal_lm
from ..config import ConfigError
from ..data.batches import TextBatch
from ..data.text import EncodedExample
from ..models.chat import chat_prompt_ids

BatchedReward = Callable[[list, list[str]], list[float]]


def _warm_colors(prompt: str, completion: str) -> float:
    from ..data.warm_colors import reward

    return reward(completion)


def _addition(prompt: str, completion: str) -> float:
    """For ``add: a b =`` prompts (assets/text): 1 for the right sum, 1/(1+|error|) for a wrong number, 0 else."""
    nums = [int(x) for x in re.findall(r"-?\d+", prompt)]
    got = re.findall(r"-?\d+", completion)
    if not nums or not got:
        return 0.0
    return 1.0 / (1.0 + abs(int(got[0]) - sum(nums)))


# Programmatic rewards by name: (prompt, completion) -> float.
REWARD_FNS: dict[str, Callable[[str, str], float]] = {"warm_colors": _warm_colors, "addition": _addition}


def load_reward_fn(spec: str) -> BatchedReward:
    """A :data:`REWARD_FNS` name, or ``"package.module:function"`` taking ``(completion)``,
    ``(prompt, completion)`` or TRL's keyword form ``(prompts=, completions=)`` (batched); returns the batched
    ``f(prompts, completions) -> list[float]``."""
    if spec in REWARD_FNS:
        named = REWARD_FNS[spec]
        return _checked(spec, lambda prompts, completions: [named(_text(p), c)
                                                            for p, c in zip(prompts, completions, strict=True)])
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"options.reward_fn={spec!r} is neither one of {sorted(REWARD_FNS)} nor "
                          "'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"options.reward_fn={spec!r} cannot be imported ({e}); fix: make the module importable "
                          "(on PYTHONPATH) and check the function name") from None
    if not callable(fn):
        raise ConfigError(f"options.reward_fn={spec!r} is a {type(fn).__name__}, not a function")
    params = inspect.signature(fn).parameters
    kinds = {p.kind for p in params.values()}
    if "completions" in params:  # TRL's reward-function convention: batched, keyword arguments
        with_prompts = "prompts" in params or inspect.Parameter.VAR_KEYWORD in kinds
        return _checked(spec, lambda prompts, completions: list(
            fn(prompts=prompts, completions=completions) if with_prompts else fn(completions=completions)))
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
    if len(positional) == 1 and inspect.Parameter.VAR_POSITIONAL not in kinds:
        return _checked(spec, lambda prompts, completions: [fn(c) for c in completions])
    if len(positional) == 2 or (len(positional) < 2 and inspect.Parameter.VAR_POSITIONAL in kinds):
        # a prompt parameter annotated ``str`` gets conversational prompts as text (the demo's addition_reward);
        # otherwise the prompt is passed as the row holds it (TRL passes the messages)
        as_text = _text if positional and positional[0].annotation in (str, "str") else (lambda p: p)
        return _checked(spec, lambda prompts, completions: [fn(as_text(p), c)
                                                            for p, c in zip(prompts, completions, strict=True)])
    raise ConfigError(f"options.reward_fn={spec!r}: the function must take (completion), (prompt, completion) or "
                      "keyword arguments (prompts=, completions=) returning a list of floats")


def _text(prompt: Any) -> str:
    """A conversational prompt (list of ``{role, content}``) as plain text, for the string-based named rewards."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in prompt)


def _checked(spec: str, fn: BatchedReward) -> BatchedReward:
    """One finite float per completion, or an error naming the reward (a wrong length would otherwise surface
    later as a shape error far from its cause)."""

    def call(prompts: list, completions: list[str]) -> list[float]:
        out = fn(prompts, completions)
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            values = None
        if values is None or len(values) != len(completions) or not all(math.isfinite(v) for v in values):
            raise ValueError(f"the reward {spec!r} must return one finite number per completion; got "
                             f"{out!r:.200} for {len(completions)} completions")
        return values

    return call


def reward_model_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a saved reward model (None: it is one), checked without loading it."""
    from ..models.text import VALUE_HEAD_FILE

    if not (Path(path) / VALUE_HEAD_FILE).is_file():
        return (f"options.reward_model={str(path)!r}: no {VALUE_HEAD_FILE} there, so the value head would be "
                "random; point it at the `final/` directory of an `rm` run (loss.name=rm)")
    return None


class ModelReward:
    """Scores (prompt, completion) with a value-head reward model saved by mmalign's ``rm`` recipe.

    Texts are re-tokenised with the reward model's own tokenizer the way the ``rm`` run encoded its rows
    (prompt with special tokens, completion without them plus EOS), so policy and reward model may differ in
    vocabulary."""

    def __init__(self, path: str | Path):
        from ..models.text import load_causal_lm, load_tokenizer

        why = reward_model_problem(path)
        if why is not None:
            raise ConfigError(why)
        path = Path(path)
        self.model = load_causal_lm(path, value_head=True).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(path)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return chat_prompt_ids(self.tokenizer, prompt)

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        from ..data.text import collate

        device = next(self.model.parameters()).device
        eos = self.tokenizer.eos_token_id
        examples = []
        for p, c in zip(prompts, completions, strict=True):
            ids = list(self.tokenizer(c, add_special_tokens=False)["input_ids"]) + [eos]
            examples.append(EncodedExample(self._prompt_ids(p) or [self.tokenizer.bos_token_id], [ids], [1.0], {}))
        batch = collate(examples, pad_token_id=self.tokenizer.pad_token_id).to(device)
        return score_batch(self.model, batch, compute_values=True, return_token_logps=False).values[:, 0].tolist()


# -- token-level reward model (token-level guidance, Yang et al. 2306.00398) ------------------------------------

def flat_sequences(batch: TextBatch) -> tuple[Tensor, Tensor, Tensor]:
    """``[B·K, P+C]`` ids, mask and position ids of [left-padded prompt; right-padded completion]: pads only
    at the two ends, so a causal LM with explicit positions sees exactly the unpadded sequence."""
    b, k, c = batch.completion_ids.shape
    ids = torch.cat([batch.prompt_ids.repeat_interleave(k, 0), batch.completion_ids.reshape(b * k, c)], 1)
    mask = torch.cat([batch.prompt_mask.repeat_interleave(k, 0), batch.completion_mask.reshape(b * k, c)], 1)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return ids, mask, pos


def _squash(x: Tensor, mode: str) -> Tensor:
    if mode == "sigmoid":
        return torch.sigmoid(x)
    if mode == "softplus":
        return nn.functional.softplus(x) + 1e-8
    return x


class TokenRewardModel(nn.Module):
    """r_φ(s_t, a_t): a causal-LM decoder reads [prompt; completion]; the head maps the hidden state *at* token
    a_t (it has seen a_t) to one squashed scalar. Returns ``[B, K, C]`` (0 on masked tokens)."""

    def __init__(self, backbone: nn.Module, *, head_hidden: int = 0, squash: str = "sigmoid"):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        if head_hidden:
            self.head = nn.Sequential(nn.Linear(hidden, head_hidden), nn.ReLU(), nn.Linear(head_hidden, 1))
        else:
            self.head = nn.Sequential(nn.Linear(hidden, 1))
        self.head_hidden, self.squash = head_hidden, squash
        dev = next(backbone.parameters()).device
        self.head.to(dev)

    def forward(self, batch: TextBatch) -> Tensor:
        b, k, c = batch.completion_ids.shape
        ids, mask, pos = flat_sequences(batch)
        decoder = unwrap_causal_lm(self.backbone).decoder
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        h = hidden[:, batch.prompt_ids.shape[1]:]
        r = _squash(self.head(h.to(self.head[0].weight.dtype)).squeeze(-1).float(), self.squash)
        return torch.where(batch.completion_mask.reshape(b * k, c).bool(), r, torch.zeros_like(r)).view(b, k, c)

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> None:
        """``state_dict`` (keys ``backbone.*`` / ``head.*``) replaces the modules' own weights."""
        from safetensors.torch import save_file

        from ..models import sub_state_dict

        path = Path(path)
        self.backbone.save_pretrained(str(path), state_dict=sub_state_dict(state_dict, "backbone."))
        head = self.head.state_dict() if state_dict is None else sub_state_dict(state_dict, "head.")
        save_file({k: v.detach().cpu().contiguous() for k, v in head.items()},
                  str(path / "token_reward_head.safetensors"))
        (path / "token_reward_head.json").write_text(json.dumps({"head_hidden": self.head_hidden,
                                                                 "squash": self.squash}))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TokenRewardModel:
        from safetensors.torch import load_file

        from ..models.text import load_causal_lm

        path = Path(path)
        meta = json.loads((path / "token_reward_head.json").read_text())
        model = cls(load_causal_lm(path), head_hidden=meta["head_hidden"], squash=meta["squash"])
        model.head.load_state_dict(load_file(str(path / "token_reward_head.safetensors")))
        return model
