"""Reward functions: plain callables `(prompts, completions, **fields) -> rewards [B]`.

`prompts` and `completions` are aligned lists (a prompt repeats once per completion of its
group); `fields` holds the batch's other example fields aligned the same way (e.g. `answer`).
A function takes the fields it needs by name and swallows the rest with `**fields`, so a research
script adds one in a few lines and selects it by import path `module:function`.

Rewards that need a loaded model (reward-model scoring) are built by the run layer and handed
to `resolve` / `combine` in `registry`, beside the built-ins of `REGISTRY`.

Shape letters: B completions.
"""

import difflib
import importlib
import math
import re
import types
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxrl_llm.errors import RewardError

RewardFn = Callable[..., Sequence[float] | np.ndarray]
REWARD_MODEL = "reward_model"  # scores with model.reward_model_path; the run layer builds it

_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands separators allowed), or None."""
    found = re.findall(_NUMBER, text)
    return float(found[-1].replace(",", "")) if found else None


def _is_correct(completion: str, answer) -> bool:
    """Whether the completion's last number equals the answer."""
    target = last_number(str(answer))
    if target is None:
        raise ValueError(f"answer {answer!r} holds no number")
    value = last_number(completion)
    return value is not None and math.isclose(value, target, rel_tol=0.0, abs_tol=1e-6)


def arithmetic_exact(prompts, completions, answer, correct=1.0, incorrect=0.0, **fields) -> np.ndarray:
    """`correct` where the last number in the completion equals `answer`, else `incorrect`."""
    return np.asarray([correct if _is_correct(c, a) else incorrect for c, a in zip(completions, answer)], np.float32)


def arithmetic_format(prompts, completions, matched=1.0, unmatched=0.0, **fields) -> np.ndarray:
    """`matched` where the completion is just a number (the synthetic task's answer format), else `unmatched`."""
    pattern = re.compile(rf"\s*{_NUMBER}\s*\.?\s*")
    return np.asarray([matched if pattern.fullmatch(c) else unmatched for c in completions], np.float32)


def count_target(text: str, target: str) -> float:
    """The synthetic preference task's hidden preference of a text: how often `target` occurs in it."""
    return float(text.count(target))


def preference_score(prompts, completions, preference_target, **fields) -> np.ndarray:
    """The synthetic preference task's hidden score of each completion (`count_target`)."""
    return np.asarray([count_target(c, t) for c, t in zip(completions, preference_target)], np.float32)


REGISTRY: Mapping[str, RewardFn] = types.MappingProxyType(
    {"arithmetic_exact": arithmetic_exact, "arithmetic_format": arithmetic_format, "preference_score": preference_score}
)


def _import(path: str) -> RewardFn:
    """The function at `module:function`."""
    module_name, _, name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RewardError(
            f"reward function {path!r}: cannot import module {module_name!r} ({error}); check the spelling and "
            "that the module is importable (on PYTHONPATH)."
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        public = [attr for attr in dir(module) if not attr.startswith("_") and callable(getattr(module, attr))]
        close = difflib.get_close_matches(name, public, n=1)
        hint = f" did you mean '{module_name}:{close[0]}'?" if close else ""
        raise RewardError(f"reward function {path!r}: module {module_name!r} has no function {name!r}.{hint}")
    return function


def resolve(name: str, registry: Mapping[str, RewardFn] = REGISTRY) -> RewardFn:
    """The reward function a registry name or an import path `module:function` selects."""
    if ":" in name:
        return _import(name)
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = f" did you mean {close[0]!r}?" if close else ""
    raise RewardError(
        f"unknown reward function {name!r};{hint} built-in: {', '.join(sorted(registry))}; or give module:function."
    )


def _call(name: str, function: RewardFn, prompts, completions, fields: dict) -> np.ndarray:
    """One function's rewards as float32 [B]; failures, wrong shapes and non-finite values name the function."""
    try:
        rewards_B = np.asarray(function(prompts, completions, **fields), np.float32)
    except Exception as error:
        raise RewardError(f"reward function {name!r} raised {type(error).__name__}: {error}") from error
    if rewards_B.shape != (len(completions),):
        raise RewardError(
            f"reward function {name!r} returned shape {rewards_B.shape} for {len(completions)} completions; "
            "return one float per completion."
        )
    bad = np.flatnonzero(~np.isfinite(rewards_B))
    if bad.size:
        raise RewardError(
            f"reward function {name!r} returned {rewards_B[bad[0]]} for completion {bad[0]}; rewards must be finite."
        )
    return rewards_B


def combine(names: Sequence[str], weights: Sequence[float] | None = None, registry: Mapping[str, RewardFn] = REGISTRY):
    """A function `(prompts, completions, **fields) -> (total_B, {name: rewards_B})` summing weighted rewards."""
    if not names:
        raise RewardError("no reward functions given; name at least one, e.g. ['arithmetic_exact'].")
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise RewardError(f"{len(weights)} reward weights for {len(names)} reward functions; give one per function.")
    if len(set(names)) != len(names):
        raise RewardError(f"reward functions {list(names)} list one twice; give it a single, larger weight.")
    functions = [(name, resolve(name, registry), weight) for name, weight in zip(names, weights)]

    def total(prompts, completions, **fields):
        parts = {name: _call(name, function, prompts, completions, fields) for name, function, _ in functions}
        total_B = sum(weight * parts[name] for name, _, weight in functions)
        return np.asarray(total_B, np.float32), parts

    return total

