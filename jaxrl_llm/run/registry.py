"""The algorithms a run can train, one entry each: everything the rest of the code asks of an
algorithm is read from here.

An entry names the config section holding its switches, the example fields it needs, the phase
builder (`run.phases`), whether it learns from its own samples (then the `sampling` section
matters to it), whether an SFT warm start (`train.sft_warmup_steps`) runs first, and the config
rules of its own (`config.checks`). Adding an algorithm is a step factory in `algorithms/`, a
builder in `run.phases`, a section in `config.schema` when it has switches, and one line here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jaxrl_llm.config import Config, validate
from jaxrl_llm.config.checks import check_batch, check_reward_model, check_rewards, check_task_fields
from jaxrl_llm.errors import ConfigError, did_you_mean
from jaxrl_llm.run import phases

PROMPT, PAIR = ("prompt",), ("prompt", "chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One algorithm as the run layer drives it."""

    name: str
    section: str | None  # its config section (SFT has none)
    fields: tuple[str, ...]  # the example fields it trains on
    build: Callable[..., phases.Phase]  # build(config, policy, train_set, eval_set) -> Phase
    samples: bool  # learns from its own samples
    warm_starts: bool  # runs train.sft_warmup_steps of SFT before it
    checks: tuple[Callable[[Config], None], ...] = ()  # rules of its own, beyond batch and data fields


ALGORITHMS = {a.name: a for a in (
    Algorithm("sft", None, ("prompt", "completion"), phases.sft_phase, samples=False, warm_starts=False),
    Algorithm("rm", "rm", PAIR, phases.rm_phase, samples=False, warm_starts=False),
    Algorithm("dpo", "dpo", PAIR, phases.dpo_phase, samples=False, warm_starts=False),
    Algorithm("grpo", "grpo", PROMPT, phases.grpo_phase, samples=True, warm_starts=True, checks=(check_rewards,)),
    Algorithm("ppo", "ppo", PROMPT, phases.ppo_phase, samples=True, warm_starts=True, checks=(check_reward_model,)),
)}


def algorithm(config: Config) -> Algorithm:
    """The registry entry of `config.algorithm`."""
    entry = ALGORITHMS.get(config.algorithm)
    if entry is None:
        raise ConfigError(
            f"algorithm must be one of {', '.join(ALGORITHMS)}, got {config.algorithm!r}"
            + did_you_mean(config.algorithm, ALGORITHMS)
        )
    return entry


def check(config: Config, max_positions: int | None = None) -> Config:
    """`config` validated as a run of its algorithm: every common rule, then the algorithm's own."""
    config = validate(config, max_positions)
    entry = algorithm(config)
    check_batch(config, entry.section)
    check_task_fields(config, entry.fields)
    for rule in entry.checks:
        rule(config)
    return config


def other_sections(config: Config) -> tuple[str, ...]:
    """The config sections of the algorithms this run is not (`grpo.`, `ppo.`, ...): they change nothing."""
    return tuple(f"{a.section}." for a in ALGORITHMS.values() if a.section and a.name != config.algorithm)
