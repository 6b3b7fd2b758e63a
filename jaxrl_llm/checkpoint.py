"""Checkpoints with orbax: every N steps and at the end, keep the last K, resume the latest.

A checkpoint holds the train state (any pytree, restored into the same shardings as a
template) and a small JSON record (step, config, the evaluation before training) for exact
resumption. Orbax writes into a temporary folder and renames it when complete, so an interrupted
save never leaves a half-written checkpoint behind as the latest one; one damaged afterwards (a
truncated file) is skipped in favour of the newest one that restores.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxrl_llm.errors import CheckpointError


class _QuietWait(logging.Filter):
    """Drops orbax's "Waiting for previous save to complete took N s": `save` waits for every
    checkpoint to reach the disk, and orbax counts that wait again at the next save."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Waiting for previous save")


logging.getLogger("absl").addFilter(_QuietWait())


def checkpoint_manager(directory: str, keep: int = 3) -> ocp.CheckpointManager:
    """A manager that keeps the last `keep` checkpoints under `directory`; the caller decides when
    to save (orbax's own interval would only accept steps that are multiples of it)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_names=("state", "meta")
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> bool:
    """Save `state` and the JSON-able `meta` at `step`; waits until it is on disk. A failed write
    (a full disk, a folder that turned read-only) is one CheckpointError naming the folder; the
    checkpoints before it are untouched."""
    try:
        saved = manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        )
        manager.wait_until_finished()
    except Exception as error:  # orbax and tensorstore raise their own types; the cause is in the chain
        raise CheckpointError(_save_failure(manager.directory, step, error)) from error
    return saved


def _save_failure(directory, step: int, error: Exception) -> str:
    """What went wrong writing checkpoint `step`, with the free space where it matters."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        if isinstance(cause, OSError) and cause.errno is not None:
            break
        cause = cause.__cause__ or cause.__context__
    message = f"saving checkpoint {step} in {directory} failed ({type(cause).__name__}: {str(cause)[:300]})"
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(str(directory)))).free
        message += f"; the disk is full ({free / 2**20:.0f} MiB free): free space or choose another run_dir"
    return message + ". The earlier checkpoints are intact; resume with train.resume=true once it is fixed."


def restore_latest(
    manager: ocp.CheckpointManager, template: Any, at_most: int | None = None
) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest checkpoint (at most step `at_most`) that restores, restored
    like `template`; None if there is none. An unreadable one (truncated, without its metadata) is
    skipped with a warning naming it; when none restores, one CheckpointError gives each one's reason."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    failures = []
    steps = [step for step in manager.all_steps() if at_most is None or step <= at_most]
    for step in sorted(steps, reverse=True):
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
            )
        except Exception as error:  # a damaged or foreign checkpoint: orbax and tensorstore errors alike
            failures.append(f"step {step}: {type(error).__name__}: {_first_line(error)}")
            continue
        if restored["meta"] is None:
            failures.append(f"step {step}: its metadata (meta/) is missing")
            continue
        if failures:
            warnings.warn(
                f"resuming from checkpoint {step} in {manager.directory}: newer ones could not be restored "
                f"({'; '.join(failures)}).", stacklevel=2,
            )
        return step, restored["state"], restored["meta"]
    if failures:
        raise CheckpointError(
            f"no checkpoint in {manager.directory} could be restored: {'; '.join(failures)}. If the run's config "
            "changed since, resume with the saved config.yaml; otherwise start a new run_dir."
        )
    return None


def _first_line(error: Exception) -> str:
    """The first line of an error's message, at most 200 characters."""
    return (str(error).strip().splitlines() or [""])[0][:200]
