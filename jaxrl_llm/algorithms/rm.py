"""Reward modelling: a scalar head on the LM backbone, Bradley–Terry loss on preference pairs.

Shapes: B pairs, T tokens. The reward of a sequence is the head's output at its last real token.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxrl_llm.algorithms.common import accumulate_gradients, scalar_scores
from jaxrl_llm.core import reward_model_loss
from jaxrl_llm.models.transformer import ModelConfig
from jaxrl_llm.state import TrainState


def pair_rewards(params, model_config: ModelConfig, batch: dict):
    """(r_chosen_B, r_rejected_B): one forward over chosen and rejected stacked."""
    tokens_2BxT = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    mask_2BxT = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    _, rewards_2B = scalar_scores(params, model_config, tokens_2BxT, mask_2BxT)
    return jnp.split(rewards_2B, 2)


def make_rm_step(
    model_config: ModelConfig, num_microbatches: int = 1, margin: float = 0.0, center_coef: float = 0.0
):
    """`step(state, batch, key) -> (state, metrics)` on pairs chosen_tokens/mask, rejected_tokens/mask."""

    def step(state: TrainState, batch: dict, key=None):
        del key
        num_pairs = batch["chosen_tokens"].shape[0]

        def loss_fn(params, microbatch):
            r_chosen_B, r_rejected_B = pair_rewards(params, model_config, microbatch)
            margin_B = jnp.full_like(r_chosen_B, margin)
            loss_B, metrics = reward_model_loss(r_chosen_B, r_rejected_B, margin_B, center_coef)
            return loss_B.sum() / num_pairs, metrics

        loss, grads, metrics = accumulate_gradients(loss_fn, state.params, batch, num_microbatches)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
        return state.apply_gradients(grads), metrics

    return step


def make_rm_eval(model_config: ModelConfig):
    """`eval(params, batch) -> metrics` (accuracy, margin, reward stats) on held-out pairs."""

    def evaluate(params, batch: dict):
        r_chosen_B, r_rejected_B = pair_rewards(params, model_config, batch)
        loss_B, metrics = reward_model_loss(r_chosen_B, r_rejected_B)
        return {"loss": loss_B.mean(), **metrics}

    return evaluate
