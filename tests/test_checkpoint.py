"""Checkpoints: keep the last K, resume restores the exact state and its metadata."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_llm import checkpoint
from jaxrl_llm.state import TrainState


def _state(seed: int) -> TrainState:
    key = jax.random.key(seed)
    params = {"w": jax.random.normal(key, (3, 4)), "b": jnp.zeros(4)}
    return TrainState.create(params, optax.adamw(1e-2))


def _step(state: TrainState) -> TrainState:
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params)
    return state.apply_gradients(grads)


def test_keeps_last_k_and_restores_latest_exactly(tmp_path):
    manager = checkpoint.checkpoint_manager(str(tmp_path), keep=2)
    state = _state(0)
    for step in (2, 5, 8, 11):  # every 3 steps, as a loop with checkpoint_every=3 saves them
        state = _step(state)
        checkpoint.save(manager, step, state, {"step": step, "data_index": 10 * step})
    assert manager.all_steps() == [8, 11]

    reopened = checkpoint.checkpoint_manager(str(tmp_path), keep=2)
    step, restored, meta = checkpoint.restore_latest(reopened, _state(1))
    assert step == 11 and meta == {"step": 11, "data_index": 110}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # A resumed state continues exactly like the uninterrupted one.
    np.testing.assert_array_equal(_step(restored).params["w"], _step(state).params["w"])


def test_restore_latest_without_checkpoints_is_none(tmp_path):
    manager = checkpoint.checkpoint_manager(str(tmp_path / "empty"))
    assert checkpoint.restore_latest(manager, _state(0)) is None


def test_orbax_wait_message_is_not_printed(caplog):
    """`save` waits for every checkpoint to reach the disk, so orbax's warning at the next save that
    it waited is noise; other orbax warnings still show."""
    from absl import logging as absl_logging

    with caplog.at_level(logging.WARNING, logger="absl"):
        absl_logging.warning("Waiting for previous save to complete took %f seconds. If this number is high...", 3.0)
        absl_logging.warning("another orbax warning")
    assert "Waiting for previous save" not in caplog.text and "another orbax warning" in caplog.text
