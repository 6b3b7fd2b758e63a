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
import threading
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


# Only the end of a completion is searched for its answer: math-verify's extraction regexes are quadratic on
# some inputs (40,000 characters of "\[" take 19 s, 8,000 take 0.8 s), and the final answer is at the end.
MATH_TAIL_CHARS = 4000
MATH_TIMEOUT_S = 5  # math-verify's own default, per parse and per comparison


def _boxed_unclosed(text: str) -> bool:
    """Whether the last `\\boxed{` of `text` is never closed (an answer cut off mid-way)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return False
    depth = 0
    for char in text[start + len("\\boxed"):]:
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return False
    return True


def require_math_verify() -> None:
    """Raise RewardError naming the fix when the optional math-verify package is missing."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        raise RewardError("math_answer needs the math-verify package: pip install 'jaxrl_llm[math]'") from None


def _math_timeout() -> int | None:
    """Seconds math-verify may spend per parse and per comparison; None (no limit) off the main thread."""
    # math-verify times out with signal.alarm, which only the main thread may call (elsewhere it raises
    # ValueError). Rewards also run on worker threads (sampling.overlap's rollout thread, environment
    # workers): there the timeouts are off, as in TRL's accuracy_reward. MATH_TAIL_CHARS bounds the parsing
    # time there; a comparison that makes sympy evaluate a huge number (\boxed{9^{9^{9}}}) is not bounded.
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _read_math(text: str, timeout: int | None) -> list:
    """What math-verify reads as the answer of `text` (sympy objects), or []: a boxed answer first (TRL,
    open-r1), else the last LaTeX or plain expression or number."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    extraction = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse(text, extraction, fallback_mode="no_fallback", parsing_timeout=timeout)


def _math_gold(value, timeout: int | None) -> list:
    """The gold answer `value` (a number or a string) as math-verify reads it when boxed; ValueError if it can't."""
    text = str(value)
    parsed = None if value is None else _read_math(text if "\\boxed" in text else f"\\boxed{{{text}}}", timeout)
    if not parsed:
        raise ValueError(f"answer {value!r} is no expression math-verify can read")
    return parsed


def _math_matches(completion: str, gold: list, timeout: int | None) -> bool:
    """Whether the final answer of `completion` equals `gold`; garbage (whatever math-verify raises on) does not."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    text = completion[-MATH_TAIL_CHARS:]
    if _boxed_unclosed(text):
        return False
    try:
        found = _read_math(text, timeout)
        return bool(found) and verify(gold, found, timeout_seconds=timeout)
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        return False


def math_answer(prompts, completions, answer, correct=1.0, incorrect=0.0, **fields) -> np.ndarray:
    """`correct` where the completion's final answer equals `answer` as mathematics, else `incorrect`.

    HF's Math-Verify (github.com/huggingface/Math-Verify), used as TRL's `accuracy_reward` and open-r1's
    do: the completion's answer is its `\\boxed{...}` if any, else its last LaTeX or plain expression or
    number (1/2, 1,234, 37.5%); the gold `answer`, a number or a string, is read as if boxed. Equivalent
    forms match: \\frac{1}{2}, \\dfrac12, 1/2 and 0.5; 2\\sqrt{2} and \\sqrt{8}; x = 5 and 5; sets and
    intervals. Only the last MATH_TAIL_CHARS characters are read; an unclosed last `\\boxed{` (an answer
    cut off) or no readable answer scores `incorrect`. An unreadable gold answer is a data error: ValueError.
    """
    require_math_verify()
    timeout = _math_timeout()
    golds = {key: _math_gold(value, timeout) for key, value in {str(a): a for a in answer}.items()}  # once a group
    return np.asarray(
        [correct if _math_matches(c, golds[str(a)], timeout) else incorrect for c, a in zip(completions, answer)],
        np.float32,
    )


def _think_formatted(text: str) -> bool:
    """Whether `text` is `<think>reasoning</think>answer`: one block of each tag, neither part blank."""
    body = text.lstrip()
    if text.count("<think>") != 1 or text.count("</think>") != 1 or not body.startswith("<think>"):
        return False
    reasoning, _, rest = body[len("<think>"):].partition("</think>")
    return bool(reasoning.strip()) and bool(rest.strip())


def think_format(prompts, completions, matched=1.0, unmatched=0.0, **fields) -> np.ndarray:
    """`matched` where the completion reasons in `<think>` tags and then answers (DeepSeek-R1's format
    reward, arXiv 2501.12948), else `unmatched`.

    The rule: after optional leading whitespace the completion opens with `<think>`; it holds exactly one
    `<think>` and one `</think>`; the reasoning between them and the answer after `</think>` are not
    blank. TRL's `think_format_reward` (`^<think>(?!.*<think>)(.*?)</think>.*$`) also accepts empty
    reasoning, an empty answer and a stray later `</think>`; open-r1's `format_reward` further requires
    `<answer>` tags. As in TRL, a `<think>` opened by the chat template (in the prompt) does not count:
    the completion must write its own.
    """
    return np.asarray([matched if _think_formatted(c) else unmatched for c in completions], np.float32)


REGISTRY: Mapping[str, RewardFn] = types.MappingProxyType({
    "arithmetic_exact": arithmetic_exact, "arithmetic_format": arithmetic_format, "math_answer": math_answer,
    "preference_score": preference_score, "think_format": think_format,
})


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

