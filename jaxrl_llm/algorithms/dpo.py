"""Direct preference optimisation against a frozen reference (Rafailov et al. 2023), with the
IPO / hinge / robust / conservative variants of `core.dpo_loss`.

Shapes: B pairs, T tokens. Log-probs are summed over each answer's completion tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrl_llm.algorithms.batches import PairBatch
from jaxrl_llm.algorithms.common import Params, accumulate_gradients, reference_of, score_tokens
from jaxrl_llm.config import DPOSection
from jaxrl_llm.core import dpo_loss
from jaxrl_llm.models.transformer import ModelConfig
from jaxrl_llm.state import TrainState


class DPOState(struct.PyTreeNode):
    """The trained policy and the frozen reference params (None with LoRA: the policy's base)."""

    policy: TrainState
    ref_params: Any = None


def completion_logps(
    params: Params, model_config: ModelConfig, batch: PairBatch, chunk_size: int | None = None,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Summed completion log-probs (chosen_B, rejected_B) from one forward over both answers."""
    both = batch.stacked()
    logp_2BxT = score_tokens(
        params, model_config, both.tokens_BxT, both.mask_BxT, chunk_size=chunk_size, dropout_rng=dropout_rng
    )
    return jnp.split((logp_2BxT * both.completion_mask_BxT).sum(axis=1), 2)


def pair_loss(
    params: Params, ref_params: Params, model_config: ModelConfig, batch: PairBatch, cfg: DPOSection,
    chunk_size: int | None = None, dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Per-pair DPO loss [B] and metrics; `ipo` averages log-probs per token (as TRL)."""
    ref_chosen_B, ref_rejected_B = jax.lax.stop_gradient(
        completion_logps(ref_params, model_config, batch, chunk_size)
    )
    chosen_B, rejected_B = completion_logps(params, model_config, batch, chunk_size, dropout_rng)
    lengths = {}
    if cfg.loss == "ipo":
        lengths = dict(
            chosen_len_B=batch.chosen.completion_mask_BxT.sum(axis=1),
            rejected_len_B=batch.rejected.completion_mask_BxT.sum(axis=1),
        )
    return dpo_loss(
        chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, beta=cfg.beta, kind=cfg.loss,
        label_smoothing=cfg.label_smoothing, **lengths,
    )


def make_dpo_step(
    model_config: ModelConfig, cfg: DPOSection = DPOSection(), num_microbatches: int = 1,
    chunk_size: int | None = None,
) -> Callable[[DPOState, PairBatch, jax.Array], tuple[DPOState, dict]]:
    """`step(state, batch, key) -> (state, metrics)` on a `PairBatch`."""

    def step(state: DPOState, batch: PairBatch, key=None):
        num_pairs = batch.chosen.tokens_BxT.shape[0]
        ref_params = reference_of(state.ref_params, state.policy)

        def loss_fn(params, micro: PairBatch, rng):
            loss_B, metrics = pair_loss(
                state.policy.model_params(params), ref_params, model_config, micro, cfg, chunk_size, rng
            )
            return loss_B.sum() / num_pairs, metrics

        loss, grads, metrics = accumulate_gradients(loss_fn, state.policy.params, batch, num_microbatches, key)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
        return state.replace(policy=state.policy.apply_gradients(grads)), metrics

    return step
