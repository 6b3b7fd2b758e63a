"""What every training step shares: scoring sequences, gradient accumulation, metric reduction.

Shapes: B sequences, T tokens, M microbatches, D hidden size, U updates.

Position t of a log-prob array scores token t given tokens < t; position 0 scores nothing and
holds 0. In a rollout no loss sees a prompt token, so log-probs are computed from the prompt
width on (the LM head runs on the completion only, as TRL's `logits_to_keep`); earlier positions
hold 0 too.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrl_llm.algorithms.batches import RolloutBatch
from jaxrl_llm.core import chunked_full_kl, chunked_token_logprobs
from jaxrl_llm.core.correction import Correction, corrected
from jaxrl_llm.models.transformer import (
    ModelConfig,
    ScalarModel,
    Transformer,
    lm_head_weight,
    positions_from_mask,
)
from jaxrl_llm.state import TrainState

Params = Any  # a model's param pytree
# LoRA dropout's keys are the step key folded with this (the shuffles use fold_in(key, pass) < it).
DROPOUT_STREAM = 1 << 20


def dropout_rngs(model_config: ModelConfig, rng: jax.Array | None) -> dict:
    """The `rngs` of a training forward: LoRA dropout's key when it is on, else none (deterministic)."""
    lora = model_config.lora
    return {"dropout": rng} if rng is not None and lora is not None and lora.dropout > 0 else {}


def reference_of(ref_params: Params | None, policy: TrainState) -> Params:
    """The frozen reference: its own params, or (LoRA) the policy's base with the adapters off."""
    return policy.frozen if ref_params is None else ref_params


def final_hidden(
    params: Params, model_config: ModelConfig, tokens_BxT: jax.Array, mask_BxT: jax.Array,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Final-normed hidden states [B,T,D] of the decoder."""
    hidden_BxTxD, _ = Transformer(model_config).apply(
        {"params": params}, tokens_BxT, positions_from_mask(mask_BxT), mask_BxT, return_hidden=True,
        rngs=dropout_rngs(model_config, dropout_rng),
    )
    return hidden_BxTxD


def hidden_logprobs(
    params: Params, model_config: ModelConfig, hidden_BxTxD: jax.Array, tokens_BxT: jax.Array,
    temperature: float = 1.0, with_entropy: bool = False, chunk_size: int | None = None, first: int = 1,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """log π(token_t | tokens_<t) [B,T] (and that distribution's entropy) from final hidden
    states, never materialising [B,T,V] logits; positions before `first` (≥ 1) hold 0."""
    lm_head_DxV = lm_head_weight(params, model_config).astype(hidden_BxTxD.dtype)
    scored = chunked_token_logprobs(
        hidden_BxTxD[:, first - 1 : -1], lm_head_DxV, tokens_BxT[:, first:], chunk_size=chunk_size,
        with_entropy=with_entropy, temperature=temperature,
    )
    return jax.tree.map(lambda x_BxN: shift_right(x_BxN, first), scored)


def score_tokens(
    params: Params, model_config: ModelConfig, tokens_BxT: jax.Array, mask_BxT: jax.Array,
    temperature: float = 1.0, with_entropy: bool = False, chunk_size: int | None = None,
    dropout_rng: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`hidden_logprobs` of a forward pass over the tokens."""
    hidden_BxTxD = final_hidden(params, model_config, tokens_BxT, mask_BxT, dropout_rng)
    return hidden_logprobs(
        params, model_config, hidden_BxTxD, tokens_BxT, temperature, with_entropy, chunk_size
    )


def hidden_full_kl(
    params: Params, hidden_BxTxD: jax.Array, ref_params: Params, ref_hidden_BxTxD: jax.Array,
    model_config: ModelConfig, temperature: float = 1.0, chunk_size: int | None = None, first: int = 1,
) -> jax.Array:
    """Exact KL(π_θ(·|s_t) ‖ π_ref(·|s_t)) [B,T] over the vocabulary at the state that emits token t
    (0 before `first`)."""
    kl_BxN = chunked_full_kl(
        hidden_BxTxD[:, first - 1 : -1], lm_head_weight(params, model_config).astype(hidden_BxTxD.dtype),
        ref_hidden_BxTxD[:, first - 1 : -1],
        lm_head_weight(ref_params, model_config).astype(ref_hidden_BxTxD.dtype),
        chunk_size=chunk_size, temperature=temperature,
    )
    return shift_right(kl_BxN, first)


def shift_right(x_BxN: jax.Array, by: int = 1) -> jax.Array:
    """Prepend `by` zero columns: [B,T-by] scores of tokens by..T-1 become [B,T] aligned with the tokens."""
    return jnp.pad(x_BxN, ((0, 0), (by, 0)))


def rollout_scores(
    params: Params, model_config: ModelConfig, batch: RolloutBatch, with_entropy: bool = False,
    chunk_size: int | None = None, dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(final hidden [R,T,D], log-probs [R,T], entropy [R,T] or None) of a rollout's answers, at the
    temperature they were sampled at."""
    hidden_RxTxD = final_hidden(params, model_config, batch.tokens_RxT, batch.mask_RxT, dropout_rng)
    scored = hidden_logprobs(
        params, model_config, hidden_RxTxD, batch.tokens_RxT, batch.temperature, with_entropy, chunk_size,
        batch.prompt_width,
    )
    logp_RxT, entropy_RxT = scored if with_entropy else (scored, None)
    return hidden_RxTxD, logp_RxT, entropy_RxT


def rollout_correction(train_logp_RxT: jax.Array, batch: RolloutBatch, correction: Correction) -> tuple[dict, dict]:
    """(targets, metrics) of the rollout/trainer mismatch: the mismatch metrics whenever the batch
    carries the sampler's log-probs; with a correction on, targets `is_weight_RxT` (TIS) and
    `keep_RxT` (the loss mask after MIS) for the policy-gradient loss."""
    if batch.rollout_logp_RxT is None:
        return {}, {}
    weights_RxT, keep_RxT, metrics = corrected(
        train_logp_RxT, batch.rollout_logp_RxT, batch.completion_mask_RxT, correction
    )
    targets = {"is_weight_RxT": weights_RxT} if correction.is_level != "none" else {}
    if correction.mask_level != "none":
        targets["keep_RxT"] = keep_RxT
    return targets, metrics


def update_rows(key: jax.Array, num_rows: int, num_minibatches: int, passes: int) -> jax.Array:
    """Row indices [passes·M, B/M] of each update: every pass is a fresh shuffle split in M minibatches."""
    if num_minibatches == 1:
        return jnp.tile(jnp.arange(num_rows)[None], (passes, 1))
    perms = [jax.random.permutation(jax.random.fold_in(key, i), num_rows) for i in range(passes)]
    return jnp.concatenate(perms).reshape(passes * num_minibatches, num_rows // num_minibatches)


def last_token_index(mask_BxT: jax.Array) -> jax.Array:
    """Index of each row's last real token (rows are right-padded after the completion)."""
    T = mask_BxT.shape[1]
    return T - 1 - jnp.argmax(mask_BxT[:, ::-1].astype(jnp.int32), axis=1)


def scalar_scores(
    params: Params, model_config: ModelConfig, tokens_BxT: jax.Array, mask_BxT: jax.Array,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """A value/reward model's per-position scalars [B,T] and the score at the last real token [B]."""
    values_BxT = ScalarModel(model_config).apply(
        {"params": params}, tokens_BxT, positions_from_mask(mask_BxT), mask_BxT,
        rngs=dropout_rngs(model_config, dropout_rng),
    )
    last_B = last_token_index(mask_BxT)
    return values_BxT, jnp.take_along_axis(values_BxT, last_B[:, None], axis=1)[:, 0]


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
    """Every [B, ...] leaf as [M, B/M, ...], microbatch m holding rows m, m+M, m+2M, ..."""
    # Strided rows: when the rows are split over devices, every device keeps its own rows in each
    # microbatch, so splitting needs no communication.
    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(
                f"batch of {x.shape[0]} rows does not split into {num_microbatches} microbatches."
            )
        x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def reduce_metrics(metrics_N: dict, summed_losses: bool = False) -> dict:
    """Metrics stacked over microbatches or updates [N, ...] to one value each: `*/min` by min,
    `*/max` by max, with `summed_losses` the `*_loss` terms (parts of one batch loss) by sum, the
    rest by mean."""

    def reduce(name, m_N):
        if name.endswith("/min"):
            return jnp.min(m_N, axis=0)
        if name.endswith("/max"):
            return jnp.max(m_N, axis=0)
        if summed_losses and name.endswith("_loss"):
            return jnp.sum(m_N, axis=0)
        return jnp.mean(m_N, axis=0)

    return {name: reduce(name, m_N) for name, m_N in metrics_N.items()}


def accumulate_gradients(
    loss_fn: Callable[[Params, Any, jax.Array | None], tuple[jax.Array, dict]], params: Params, batch: Any,
    num_microbatches: int = 1, rng: jax.Array | None = None,
) -> tuple[jax.Array, Params, dict]:
    """(loss, grads, metrics) summed over M microbatches with `lax.scan`; metrics combined by
    `reduce_metrics`.

    `loss_fn(params, microbatch, rng)` must normalise by the whole batch (see `core.loss_normalizer`)
    so that the summed loss and gradients equal those of one big batch; so must the `*_loss`
    metrics it reports, which are summed like the loss. `rng` (LoRA dropout's) is folded with the
    microbatch's index; None stays None.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng)
        return loss, grads, metrics

    def one_microbatch(carry, indexed):
        loss_sum, grads_sum = carry
        index, microbatch = indexed
        micro_rng = None if rng is None else jax.random.fold_in(rng, index)
        (loss, metrics), grads = grad_fn(params, microbatch, micro_rng)
        return (loss_sum + loss, jax.tree.map(jnp.add, grads_sum, grads)), metrics

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), metrics_M = jax.lax.scan(
        one_microbatch, zeros, (jnp.arange(num_microbatches), split_microbatches(batch, num_microbatches))
    )
    return loss, grads, reduce_metrics(metrics_M, summed_losses=True)
