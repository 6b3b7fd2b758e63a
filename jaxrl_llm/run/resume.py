"""What a resumed run compares with what it was started with, and what a finished run left behind."""

from __future__ import annotations

import json
import os
import warnings

from jaxrl_llm.config import Config, changed_fields, load_config
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.run.registry import ALGORITHMS, algorithm, other_sections

# What a resumed run may change without changing what it computes (besides how long it runs).
RESUMABLE = ("run_dir", "mesh.", "train.total_steps", "train.resume", "train.eval_every", "train.log_every",
             "train.checkpoint_every", "train.tensorboard", "train.export_hf")


def resume_changes(saved: Config, config: Config) -> list[str]:
    """`field: saved -> now` for the fields a resumed run changes that alter what it computes: not
    RESUMABLE ones, other algorithms' sections, or `sampling` for an algorithm that does not sample."""
    ignore = RESUMABLE + other_sections(config)
    if config.algorithm in ALGORITHMS and not algorithm(config).samples:
        ignore += ("sampling.",)
    return changed_fields(saved, config, ignore)


def warn_of_changes(saved_path: str, config: Config) -> None:
    """Warn when a resumed run's config differs from the one it was started with (seed, data, lr...)."""
    try:
        changes = resume_changes(load_config(saved_path), config)
    except ConfigError:  # written by another version: nothing to compare field by field
        return
    if changes:
        warnings.warn(
            f"resuming {config.run_dir} with a config that differs from its saved config.yaml in "
            f"{'; '.join(changes)}. The continued run follows the new values (data order, updates), so it "
            "will not match a run made in one go; start a new run_dir to keep runs comparable.",
            stacklevel=3,
        )


def saved_summary(run_dir: str) -> dict:
    """RUN_DIR/summary.json of an earlier run, or {}."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as file:
        return json.load(file)
