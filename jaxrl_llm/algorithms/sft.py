"""Supervised fine-tuning: masked next-token loss on the completion tokens.

Shapes: B sequences, T tokens.
"""

from __future__ import annotations

from typing import Callable

import jax
import optax

from jaxrl_llm.algorithms.batches import SequenceBatch
from jaxrl_llm.algorithms.common import accumulate_gradients, score_tokens
from jaxrl_llm.core import loss_normalizer, sft_loss
from jaxrl_llm.models.transformer import ModelConfig
from jaxrl_llm.state import TrainState


def make_sft_step(
    model_config: ModelConfig, num_microbatches: int = 1, aggregation: str = "token_mean",
    chunk_size: int | None = None,
) -> Callable[[TrainState, SequenceBatch, jax.Array], tuple[TrainState, dict]]:
    """`step(state, batch, key) -> (state, metrics)` on a `SequenceBatch`."""

    def step(state: TrainState, batch: SequenceBatch, key=None):
        # The key only draws LoRA dropout; without it SFT is deterministic.
        normalizer = loss_normalizer(batch.completion_mask_BxT, aggregation)

        def loss_fn(params, micro: SequenceBatch, rng):
            logp_BxT = score_tokens(
                state.model_params(params), model_config, micro.tokens_BxT, micro.mask_BxT, chunk_size=chunk_size,
                dropout_rng=rng,
            )
            return sft_loss(logp_BxT, micro.completion_mask_BxT, aggregation, normalizer), {}

        loss, grads, _ = accumulate_gradients(loss_fn, state.params, batch, num_microbatches, key)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "tokens": batch.completion_mask_BxT.sum(),
        }
        return state.apply_gradients(grads), metrics

    return step
