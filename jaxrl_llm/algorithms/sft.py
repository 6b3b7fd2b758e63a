"""Supervised fine-tuning: masked next-token loss on the completion tokens.

Shapes: B sequences, T tokens.
"""

from __future__ import annotations

import optax

from jaxrl_llm.algorithms.common import accumulate_gradients, score_tokens
from jaxrl_llm.core import loss_normalizer, sft_loss
from jaxrl_llm.models.transformer import ModelConfig
from jaxrl_llm.state import TrainState


def make_sft_step(
    model_config: ModelConfig, num_microbatches: int = 1, aggregation: str = "token_mean",
    chunk_size: int | None = None,
):
    """`step(state, batch, key) -> (state, metrics)` for a batch of tokens/mask/completion_mask."""

    def step(state: TrainState, batch: dict, key=None):
        del key  # SFT is deterministic; the argument keeps every step's signature the same.
        normalizer = loss_normalizer(batch["completion_mask"], aggregation)

        def loss_fn(params, microbatch):
            logp_BxT = score_tokens(
                params, model_config, microbatch["tokens"], microbatch["mask"], chunk_size=chunk_size
            )
            return sft_loss(logp_BxT, microbatch["completion_mask"], aggregation, normalizer), {}

        loss, grads, _ = accumulate_gradients(loss_fn, state.params, batch, num_microbatches)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "tokens": batch["completion_mask"].sum(),
        }
        return state.apply_gradients(grads), metrics

    return step
