"""Train-state pytrees (named, immutable, updated with `.replace`) and the optimizer they carry."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrl_llm.models.lora import combine

SCHEDULES = ("constant", "linear", "cosine")


class TrainState(struct.PyTreeNode):
    """Params of one trained model with its optimizer state and step counter.

    With LoRA, `params` are the adapters (and a scalar model's head) and `frozen` the base they sit
    on: the model's params are `model_params()`, the optimizer sees `params` only, and the jitted
    step neither donates nor returns `frozen`, nor does a checkpoint save it (`without_frozen`).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    frozen: Any = None

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, frozen: Any = None) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx, frozen=frozen)

    def model_params(self, params: Any = None) -> Any:
        """The whole model's params: `params` (default: the trained ones) over the frozen base."""
        params = self.params if params is None else params
        return params if self.frozen is None else combine(self.frozen, params)

    def apply_gradients(self, grads: Any) -> "TrainState":
        """One optimizer update; returns the new state."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(
            step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state
        )


def learning_rate_schedule(lr: float, total_steps: int, schedule: str = "constant", warmup_steps: int = 0):
    """Linear warm-up to `lr`, then constant, linear decay to 0, or cosine decay to 0."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r} is not one of {SCHEDULES}.")
    decay_steps = max(total_steps - warmup_steps, 1)
    after = {
        "constant": optax.constant_schedule(lr),
        "linear": optax.linear_schedule(lr, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(lr, decay_steps),
    }[schedule]
    if warmup_steps <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def make_optimizer(
    lr: float, total_steps: int, schedule: str = "constant", warmup_steps: int = 0,
    weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    grad_clip: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW with global-norm gradient clipping and a learning-rate schedule."""
    adamw = optax.adamw(
        learning_rate_schedule(lr, total_steps, schedule, warmup_steps),
        b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
    )
    # A traced norm (a sweep's) is on: a sweep puts runs without clipping in a program of their own.
    if grad_clip is None or (not isinstance(grad_clip, jax.core.Tracer) and grad_clip <= 0):
        return adamw
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)


def _is_train_state(node: Any) -> bool:
    return isinstance(node, TrainState)


def frozen_parts(state: Any) -> list:
    """The frozen bases of every TrainState in a (nested) state, in tree order."""
    nodes = jax.tree.leaves(state, is_leaf=_is_train_state)
    return [node.frozen for node in nodes if _is_train_state(node)]


def without_frozen(state: Any) -> Any:
    """The state with each TrainState's frozen base taken out: what a step donates and a checkpoint holds."""
    return jax.tree.map(lambda n: n.replace(frozen=None) if _is_train_state(n) else n, state, is_leaf=_is_train_state)


def with_frozen(state: Any, frozen: list) -> Any:
    """`without_frozen`'s inverse: the bases of `frozen_parts` put back in order."""
    bases = iter(frozen)
    return jax.tree.map(lambda n: n.replace(frozen=next(bases)) if _is_train_state(n) else n, state,
                        is_leaf=_is_train_state)
