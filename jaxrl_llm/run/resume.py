"""Resuming: what a resumed run must refuse, what it may change, and how it keeps its schedule.

A run resumes from its newest checkpoint that restores. A config that changes what the checkpoint
was made from (the algorithm, the models the run started from) is refused before anything is
written; one that changes how the rest of the run computes (seed, data, optimizer, the algorithm's
section) is followed, with a warning naming each field; a decaying learning-rate schedule keeps
the horizon the run started with, so every step keeps its learning rate.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np

from jaxrl_llm.config import Config, changed_fields, load_config
from jaxrl_llm.errors import ConfigError, TrainingError
from jaxrl_llm.run.phases import decay_steps
from jaxrl_llm.run.registry import ALGORITHMS, other_sections
from jaxrl_llm.state import learning_rate_schedule

# What sets the models a run starts from or the shape of its train state: the checkpoint continues
# from its own, so a change here could not take effect.
START_ONLY = ("algorithm", "model.source", "model.tiny.", "model.ref_path", "model.reward_model_path",
              "model.critic_path", "model.param_dtype", "model.lora.rank", "model.lora.targets",
              "model.lora.quantize", "model.lora.init_from")
# What a resumed run may change without changing what it computes (besides how long it runs).
RESUMABLE = ("run_dir", "mesh.", "train.total_steps", "train.resume", "train.eval_every", "train.log_every",
             "train.checkpoint_every", "train.keep_checkpoints", "train.export_hf", "train.log_compiles", "logging.",
             "train.grad_accum", "model.remat")


def saved_config(run_dir: str) -> Config | None:
    """The config a run was started (or last resumed) with, from RUN_DIR/config.yaml; None when there
    is none, or when another version wrote it."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    try:
        return load_config(path)
    except ConfigError:
        return None


def check_resumable(saved: Config, config: Config) -> None:
    """Refuse to resume with a config that changes what the run's checkpoint was made from."""
    refused = [change for change in changed_fields(saved, config) if change.startswith(START_ONLY)]
    if refused:
        raise TrainingError(
            f"cannot resume {config.run_dir} with {'; '.join(refused)}: these set the algorithm and the models the "
            f"run started from, and its checkpoint continues from its own. Resume with its saved config "
            f"({os.path.join(config.run_dir, 'config.yaml')}), or start a new run_dir."
        )


def keep_schedule(saved: Config, config: Config) -> tuple[Config, list[str]]:
    """`config` with the learning-rate schedule the run started with (optim.decay_steps), when a new
    train.total_steps would move a linear or cosine decay and so change the learning rate of steps
    already taken or planned, and a note saying so."""
    old, new = decay_steps(saved), decay_steps(config)
    if old == new or config.optim.decay_steps != saved.optim.decay_steps:
        return config, []
    o, steps = config.optim, np.arange(config.train.total_steps)
    kept = np.asarray(learning_rate_schedule(o.lr, old, o.schedule, o.warmup_steps)(steps))
    moved = np.asarray(learning_rate_schedule(o.lr, new, o.schedule, o.warmup_steps)(steps))
    changed = np.flatnonzero(kept != moved)
    if not changed.size:
        return config, []
    first = int(changed[0])
    note = (
        f"train.total_steps {saved.train.total_steps} -> {config.train.total_steps} under optim.schedule="
        f"{o.schedule} would change the learning rate from step {first} on ({kept[first]:.3g} -> "
        f"{moved[first]:.3g}), so the run keeps the schedule it started with (optim.decay_steps={old}); its "
        f"learning rate is {kept[-1]:.3g} at step {steps[-1]}. To decay over {new} steps, start a new run_dir."
    )
    return dataclasses.replace(config, optim=dataclasses.replace(o, decay_steps=old)), [note]


def resume_changes(saved: Config, config: Config) -> list[str]:
    """`field: saved -> now` for the fields a resumed run changes that alter what it computes: not
    RESUMABLE ones, other algorithms' sections, or `sampling` for an algorithm that does not sample."""
    ignore = RESUMABLE + START_ONLY + other_sections(config)
    if config.algorithm in ALGORITHMS and not ALGORITHMS[config.algorithm].samples:
        ignore += ("sampling.",)
    return changed_fields(saved, config, ignore)


def warn_of_changes(saved: Config, notes: list[str], config: Config) -> None:
    """Warn when a resumed run's config differs from the one it was started with, saying what the
    continued run does with each change."""
    changes = resume_changes(saved, config)
    if config.algorithm == "ppo" and config.ppo.adaptive_kl and saved.ppo.kl_coef != config.ppo.kl_coef:
        changes = [change for change in changes if not change.startswith("ppo.kl_coef:")]
        notes = notes + [f"ppo.kl_coef {saved.ppo.kl_coef} -> {config.ppo.kl_coef} changes nothing: with "
                         "ppo.adaptive_kl the run's β continues from its checkpoint (ppo.kl_coef sets where a new "
                         "run's β starts)."]
    follows = (
        f"resuming {config.run_dir} with a config that differs from its saved config.yaml in {'; '.join(changes)}. "
        "The continued run follows the new values (data order, updates), so it will not match a run made in one "
        "go; start a new run_dir to keep runs comparable." if changes else ""
    )
    message = " ".join([follows, *notes]).strip()
    if message:
        warnings.warn(message, stacklevel=3)
