"""Reward modelling: a scalar head on the LM backbone, Bradley–Terry loss on preference pairs.

Shapes: B pairs, T tokens. The reward of a sequence is the head's output at its last real token.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxrl_llm.algorithms.batches import PairBatch
from jaxrl_llm.algorithms.common import Params, accumulate_gradients, scalar_scores
from jaxrl_llm.config import RMSection
from jaxrl_llm.core import reward_model_loss
from jaxrl_llm.models.transformer import ModelConfig
from jaxrl_llm.state import TrainState


def pair_rewards(
    params: Params, model_config: ModelConfig, batch: PairBatch, dropout_rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(r_chosen_B, r_rejected_B): one forward over chosen and rejected stacked."""
    both = batch.stacked()
    _, rewards_2B = scalar_scores(params, model_config, both.tokens_BxT, both.mask_BxT, dropout_rng)
    return jnp.split(rewards_2B, 2)


def make_rm_step(
    model_config: ModelConfig, cfg: RMSection = RMSection(), num_microbatches: int = 1
) -> Callable[[TrainState, PairBatch, jax.Array], tuple[TrainState, dict]]:
    """`step(state, batch, key) -> (state, metrics)` on a `PairBatch`."""

    def step(state: TrainState, batch: PairBatch, key=None):
        num_pairs = batch.chosen.tokens_BxT.shape[0]

        def loss_fn(params, micro: PairBatch, rng):
            r_chosen_B, r_rejected_B = pair_rewards(state.model_params(params), model_config, micro, rng)
            margin_B = jnp.full_like(r_chosen_B, cfg.margin)
            loss_B, metrics = reward_model_loss(r_chosen_B, r_rejected_B, margin_B, cfg.center_coef)
            return loss_B.sum() / num_pairs, metrics

        loss, grads, metrics = accumulate_gradients(loss_fn, state.params, batch, num_microbatches, key)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
        return state.apply_gradients(grads), metrics

    return step


def make_rm_eval(model_config: ModelConfig) -> Callable[[dict, PairBatch], dict]:
    """`eval(params, batch) -> metrics` (accuracy, margin, reward stats) on held-out pairs."""

    def evaluate(params, batch: PairBatch):
        r_chosen_B, r_rejected_B = pair_rewards(params, model_config, batch)
        loss_B, metrics = reward_model_loss(r_chosen_B, r_rejected_B)
        return {"loss": loss_B.mean(), **metrics}

    return evaluate
