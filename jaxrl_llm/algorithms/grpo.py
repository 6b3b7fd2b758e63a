"""GRPO (Shao et al. 2024) and its successors as switches: DAPO, GSPO, SAPO, CISPO, Dr. GRPO, RLOO,
REINFORCE++-baseline.

Shapes: R rows (prompts × G samples, a prompt's samples contiguous), T tokens (prompt, left-padded,
then completion, right-padded), D hidden size, U updates (μ × minibatches).

One jitted step takes a `RolloutBatch` whose rewards are already scored on the host and does, in
order: old and reference log-probs with the rollout's params; KL in the reward if configured (the
seed design: r_i − β·Σ_t KL_t before the group baseline); DAPO overlong shaping; the configured
advantage estimator; then μ passes over shuffled minibatches of clipped / soft-gated
policy-gradient updates (`lax.scan`). Log-probs are taken at the temperature the rollout was
sampled at (the batch carries it), as TRL does.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrl_llm.algorithms.batches import RolloutBatch
from jaxrl_llm.algorithms.common import (
    DROPOUT_STREAM,
    accumulate_gradients,
    hidden_full_kl,
    reduce_metrics,
    reference_of,
    rollout_correction,
    rollout_scores,
    update_rows,
)
from jaxrl_llm.config import GRPOSection
from jaxrl_llm.core import (
    aggregate,
    group_advantages,
    kl_estimate,
    loss_normalizer,
    overlong_penalty,
    policy_loss,
    reinforce_plus_plus_baseline,
    rloo_advantages,
)
from jaxrl_llm.core.correction import NO_CORRECTION, Correction, corrected
from jaxrl_llm.models.transformer import ModelConfig
from jaxrl_llm.state import TrainState


class GRPOState(struct.PyTreeNode):
    """The trained policy and the frozen reference (None when no KL term is used, or with LoRA,
    whose reference is the policy's base)."""

    policy: TrainState
    ref_params: Any = None


def uses_reference(cfg: GRPOSection) -> bool:
    """Whether the KL term, and so a reference model, is active (a traced β, a sweep's, may be > 0)."""
    return cfg.kl_placement != "none" and (isinstance(cfg.kl_coef, jax.core.Tracer) or cfg.kl_coef > 0)


def advantages(cfg: GRPOSection, rewards_R: jax.Array, mask_RxT: jax.Array) -> jax.Array:
    """The configured estimator's advantages: one per answer [R], or per token [R,T]."""
    if cfg.advantage == "rloo":
        return rloo_advantages(rewards_R, cfg.group_size)
    if cfg.advantage == "reinforce_plus_plus_baseline":
        return reinforce_plus_plus_baseline(rewards_R, cfg.group_size, mask_RxT)
    return group_advantages(rewards_R, cfg.group_size, cfg.adv_scaling, cfg.std, cfg.std_eps)


def make_grpo_step(
    model_config: ModelConfig, cfg: GRPOSection, num_microbatches: int = 1,
    max_completion_len: int | None = None, chunk_size: int | None = None, correction: Correction = NO_CORRECTION,
) -> Callable[[GRPOState, RolloutBatch, jax.Array], tuple[GRPOState, dict]]:
    """`step(state, batch, key) -> (state, metrics)` on a `RolloutBatch` of prompts × G samples.

    `max_completion_len` is Dr. GRPO's constant L and DAPO's L_max (default: the row width T).
    `correction`: TIS / MIS against the sampler's log-probs (`core.correction`), whose mismatch
    metrics are logged whenever the batch carries them.
    """
    with_ref = uses_reference(cfg)
    # With one update per rollout the policy being trained is the rollout's, so its own detached
    # log-probs are the old ones and the separate scoring pass can go (TRL does the same). MIS needs
    # them first: the tokens it drops leave the loss's normaliser.
    reuse_logp = cfg.num_iterations == 1 and cfg.num_minibatches == 1 and correction.mask_level == "none" and not (
        with_ref and cfg.kl_placement == "reward"
    )
    full_kl = cfg.kl_estimator == "full"
    loss_kwargs = _loss_kwargs(cfg)

    def step(state: GRPOState, batch: RolloutBatch, key: jax.Array):
        R, T = batch.tokens_RxT.shape
        max_len = max_completion_len or T

        ref_params = reference_of(state.ref_params, state.policy) if with_ref else None

        def scored(params, rows: RolloutBatch, with_entropy=False, rng=None):
            return rollout_scores(params, model_config, rows, with_entropy, chunk_size, rng)

        def token_kl(params, rows, hidden_RxTxD, logp_RxT, ref_hidden_RxTxD, ref_logp_RxT):
            if full_kl:
                return hidden_full_kl(
                    params, hidden_RxTxD, ref_params, ref_hidden_RxTxD, model_config,
                    rows.temperature, chunk_size, rows.prompt_width,
                )
            return kl_estimate(logp_RxT, ref_logp_RxT, cfg.kl_estimator)

        lengths_R = batch.completion_mask_RxT.sum(axis=1)
        if cfg.overlong_filtering:
            kept_R = 1 - batch.truncated_R.astype(batch.completion_mask_RxT.dtype)
            batch = batch.replace(completion_mask_RxT=batch.completion_mask_RxT * kept_R[:, None])
        targets, metrics = {}, {}
        if not reuse_logp:
            old_hidden_RxTxD, old_logp_RxT, _ = jax.lax.stop_gradient(scored(state.policy.model_params(), batch))
            targets["old_logp_RxT"] = old_logp_RxT
            correction_targets, metrics = rollout_correction(old_logp_RxT, batch, correction)
            targets.update(correction_targets)
        rewards_R = batch.rewards_R
        if with_ref:
            ref_hidden_RxTxD, ref_logp_RxT, _ = scored(ref_params, batch)
            targets["ref_logp_RxT"] = ref_logp_RxT
            if full_kl:
                targets["ref_hidden_RxTxD"] = ref_hidden_RxTxD
        if with_ref and cfg.kl_placement == "reward":
            kl_RxT = token_kl(
                state.policy.model_params(), batch, old_hidden_RxTxD, old_logp_RxT, ref_hidden_RxTxD, ref_logp_RxT
            )
            seq_kl_R = jnp.sum(kl_RxT * batch.completion_mask_RxT, axis=1)
            rewards_R = rewards_R - cfg.kl_coef * seq_kl_R
            metrics["kl"] = jnp.mean(seq_kl_R)
            metrics["kl/token"] = aggregate(kl_RxT, batch.completion_mask_RxT)
        if cfg.overlong_shaping:
            shaping_R = overlong_penalty(lengths_R, max_len, cfg.overlong_buffer)
            rewards_R = rewards_R + shaping_R
            metrics["reward/overlong"] = jnp.mean(shaping_R)
        targets["adv"] = advantages(cfg, rewards_R, batch.completion_mask_RxT)

        def loss_fn(params, micro, rng, normalizer):
            rows, row_targets = micro
            hidden_RxTxD, logp_RxT, entropy_RxT = scored(params, rows, with_entropy=True, rng=rng)
            mask_RxT = row_targets.get("keep_RxT", rows.completion_mask_RxT)
            old_logp_RxT = jax.lax.stop_gradient(logp_RxT) if reuse_logp else row_targets["old_logp_RxT"]
            is_weight_RxT, mismatch = row_targets.get("is_weight_RxT", 1.0), {}
            if reuse_logp and rows.rollout_logp_RxT is not None:
                is_weight_RxT, _, mismatch = corrected(old_logp_RxT, rows.rollout_logp_RxT, mask_RxT, correction)
            pg_RxT, out = policy_loss(logp_RxT, old_logp_RxT, row_targets["adv"], mask_RxT, cfg.loss, **loss_kwargs)
            loss = aggregate(pg_RxT * is_weight_RxT, mask_RxT, cfg.aggregation, normalizer, max_len=max_len)
            out = {**out, **mismatch, "pg_loss": loss, "entropy": aggregate(entropy_RxT, mask_RxT)}
            if with_ref and cfg.kl_placement == "loss":
                kl_RxT = token_kl(
                    params, rows, hidden_RxTxD, logp_RxT, row_targets.get("ref_hidden_RxTxD"),
                    row_targets["ref_logp_RxT"],
                )
                kl_loss = aggregate(kl_RxT, mask_RxT, cfg.aggregation, normalizer, max_len=max_len)
                loss = loss + cfg.kl_coef * kl_loss
                out["kl"] = jnp.sum(kl_RxT * mask_RxT) / mask_RxT.shape[0]
                out["kl/token"] = aggregate(kl_RxT, mask_RxT)
            return loss, out

        def one_update(policy, indexed):
            index, rows_S = indexed
            minibatch = jax.tree.map(lambda x: x[rows_S], (batch, targets))
            loss_mask_RxT = minibatch[1].get("keep_RxT", minibatch[0].completion_mask_RxT)
            normalizer = loss_normalizer(loss_mask_RxT, cfg.aggregation)
            loss, grads, out = accumulate_gradients(
                lambda p, micro, rng: loss_fn(policy.model_params(p), micro, rng, normalizer), policy.params,
                minibatch, num_microbatches, jax.random.fold_in(dropout_key, index),
            )
            return policy.apply_gradients(grads), {"loss": loss, "grad_norm": optax.tree.norm(grads), **out}

        dropout_key = jax.random.fold_in(key, DROPOUT_STREAM)
        rows_UxS = update_rows(key, R, cfg.num_minibatches, cfg.num_iterations)
        policy, update_metrics = jax.lax.scan(one_update, state.policy, (jnp.arange(len(rows_UxS)), rows_UxS))
        metrics.update(reduce_metrics(update_metrics))
        metrics.update(_rollout_metrics(
            batch.rewards_R, targets["adv"], batch.completion_mask_RxT, lengths_R, batch.truncated_R, cfg.group_size
        ))
        return state.replace(policy=policy), metrics

    return step


def _loss_kwargs(cfg: GRPOSection) -> dict:
    """The policy-loss parameters of the configured kind."""
    if cfg.loss in ("gspo", "gspo_token"):
        return dict(eps_low=cfg.gspo_eps_low, eps_high=cfg.gspo_eps_high)
    if cfg.loss == "sapo":
        return dict(tau_pos=cfg.sapo_tau_pos, tau_neg=cfg.sapo_tau_neg)
    if cfg.loss == "cispo":
        return dict(eps_max=cfg.cispo_eps_max)
    return dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip)


def _rollout_metrics(rewards_R, adv, mask_RxT, lengths_R, truncated_R, G: int) -> dict:
    """Reward, advantage (over answers, or over valid tokens for per-token advantages),
    response-length and truncation statistics of the rollout."""
    rewards_PxG = rewards_R.reshape(-1, G)
    lengths_R = lengths_R.astype(jnp.float32)
    valid = jnp.ones(adv.shape, bool) if adv.ndim == 1 else mask_RxT > 0
    some = jnp.any(valid)
    return {
        "reward/mean": jnp.mean(rewards_R),
        "reward/std": jnp.std(rewards_R),
        "reward/zero_std_groups": jnp.mean(jnp.all(rewards_PxG == rewards_PxG[:, :1], axis=1)),
        "advantages/mean": jnp.sum(jnp.where(valid, adv, 0.0)) / jnp.maximum(jnp.sum(valid), 1),
        "advantages/min": jnp.where(some, jnp.min(jnp.where(valid, adv, jnp.inf)), 0.0),
        "advantages/max": jnp.where(some, jnp.max(jnp.where(valid, adv, -jnp.inf)), 0.0),
        "response_length/mean": jnp.mean(lengths_R),
        "response_length/min": jnp.min(lengths_R),
        "response_length/max": jnp.max(lengths_R),
        "truncated_fraction": jnp.mean(truncated_R.astype(jnp.float32)),
    }
