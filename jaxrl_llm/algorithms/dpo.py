"""Direct preference optimisation against a frozen reference (Rafailov et al. 2023), with the
IPO / hinge / robust / conservative variants of `core.dpo_loss`.

Shapes: B pairs, T tokens. Log-probs are summed over each answer's completion tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrl_llm.algorithms.common import accumulate_gradients, score_tokens
from jaxrl_llm.core import dpo_loss
from jaxrl_llm.models.transformer import ModelConfig
from jaxrl_llm.state import TrainState


class DPOState(struct.PyTreeNode):
    """The trained policy and the frozen reference params."""

    policy: TrainState
    ref_params: Any


def completion_logps(params, model_config: ModelConfig, batch: dict, chunk_size: int | None = None):
    """Summed completion log-probs (chosen_B, rejected_B) from one forward over both answers."""
    tokens_2BxT = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    mask_2BxT = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    completion_2BxT = jnp.concatenate([batch["chosen_completion_mask"], batch["rejected_completion_mask"]])
    logp_2BxT = score_tokens(params, model_config, tokens_2BxT, mask_2BxT, chunk_size=chunk_size)
    return jnp.split((logp_2BxT * completion_2BxT).sum(axis=1), 2)


def pair_loss(
    params, ref_params, model_config: ModelConfig, batch: dict, beta: float, kind: str,
    label_smoothing: float, chunk_size: int | None = None,
):
    """Per-pair DPO loss [B] and metrics; `ipo` averages log-probs per token (as TRL)."""
    ref_chosen_B, ref_rejected_B = jax.lax.stop_gradient(
        completion_logps(ref_params, model_config, batch, chunk_size)
    )
    chosen_B, rejected_B = completion_logps(params, model_config, batch, chunk_size)
    lengths = {}
    if kind == "ipo":
        lengths = dict(
            chosen_len_B=batch["chosen_completion_mask"].sum(axis=1),
            rejected_len_B=batch["rejected_completion_mask"].sum(axis=1),
        )
    return dpo_loss(
        chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, beta=beta, kind=kind,
        label_smoothing=label_smoothing, **lengths,
    )


def make_dpo_step(
    model_config: ModelConfig, beta: float = 0.1, kind: str = "sigmoid", label_smoothing: float = 0.0,
    num_microbatches: int = 1, chunk_size: int | None = None,
):
    """`step(state, batch, key) -> (state, metrics)` on pairs of chosen/rejected sequence batches."""

    def step(state: DPOState, batch: dict, key=None):
        del key
        num_pairs = batch["chosen_tokens"].shape[0]

        def loss_fn(params, microbatch):
            loss_B, metrics = pair_loss(
                params, state.ref_params, model_config, microbatch, beta, kind, label_smoothing, chunk_size
            )
            return loss_B.sum() / num_pairs, metrics

        loss, grads, metrics = accumulate_gradients(loss_fn, state.policy.params, batch, num_microbatches)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
        return state.replace(policy=state.policy.apply_gradients(grads)), metrics

    return step
