"""Checkpoints with orbax: every N steps and at the end, keep the last K, resume the latest.

A checkpoint holds the train state (any pytree, restored into the same shardings as a
template) and a small JSON record (step, config, data position) for exact resumption.
Orbax writes into a temporary folder and renames it when complete, so an interrupted save
never leaves a half-written checkpoint behind as the latest one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


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
    """Save `state` and the JSON-able `meta` at `step`; waits until it is on disk."""
    saved = manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )
    manager.wait_until_finished()
    return saved


def restore_latest(manager: ocp.CheckpointManager, template: Any) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest checkpoint, restored like `template`; None if none."""
    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    return step, restored["state"], restored["meta"]
