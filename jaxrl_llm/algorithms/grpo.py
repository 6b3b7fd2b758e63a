"""GRPO (Shao et al. 2024) and its successors as switches: DAPO, GSPO, SAPO, CISPO, Dr. GRPO.

Shapes: R rows (prompts × G samples, a prompt's samples contiguous), T tokens (prompt, left-padded,
then completion, right-padded), P prompt length, N completion length, U updates (μ × minibatches).

One jitted step takes a rollout whose rewards are already scored on the host and does, in order:
old and reference log-probs with the rollout's params; KL in the reward if configured (the seed
design: r_i − β·Σ_t KL_t before the group baseline); DAPO overlong shaping; group advantages; then
μ passes over shuffled minibatches of clipped / soft-gated policy-gradient updates (`lax.scan`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrl_llm.algorithms.common import (
    accumulate_gradients,
    first_scored,
    hidden_full_kl,
    policy_scores,
    reduce_metrics,
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
)
from jaxrl_llm.models.transformer import ModelConfig
from jaxrl_llm.state import TrainState


class GRPOState(struct.PyTreeNode):
    """The trained policy and the frozen reference (None when no KL term is used)."""

    policy: TrainState
    ref_params: Any = None


def uses_reference(cfg: GRPOSection) -> bool:
    """Whether the KL term, and so a reference model, is active."""
    return cfg.kl_coef > 0 and cfg.kl_placement != "none"


def make_grpo_step(
    model_config: ModelConfig, cfg: GRPOSection, temperature: float = 1.0, num_microbatches: int = 1,
    max_completion_len: int | None = None, chunk_size: int | None = None,
):
    """`step(state, batch, key) -> (state, metrics)` on a `rollout_batch` of prompts × G samples.

    Log-probs are scored at the sampling temperature, as the sampler's policy (TRL does the same).
    `max_completion_len` is Dr. GRPO's constant L and DAPO's L_max (default: the row width T).
    """
    with_ref = uses_reference(cfg)
    # With one update per rollout the policy being trained is the rollout's, so its own detached
    # log-probs are the old ones and the separate scoring pass can go (TRL does the same).
    reuse_logp = cfg.num_iterations == 1 and cfg.num_minibatches == 1 and not (
        with_ref and cfg.kl_placement == "reward"
    )
    full_kl = cfg.kl_estimator == "full"
    loss_kwargs = _loss_kwargs(cfg)

    def scored(params, batch, with_entropy=False):
        return policy_scores(params, model_config, batch, temperature, with_entropy, chunk_size)

    def step(state: GRPOState, batch: dict, key: jax.Array):
        batch = jax.tree.map(jnp.asarray, batch)
        R, T = batch["tokens"].shape
        max_len = max_completion_len or T

        def token_kl(params, hidden_RxTxD, logp_RxT, ref_hidden_RxTxD, ref_logp_RxT):
            if full_kl:
                return hidden_full_kl(
                    params, hidden_RxTxD, state.ref_params, ref_hidden_RxTxD, model_config,
                    temperature, chunk_size, first_scored(batch),
                )
            return kl_estimate(logp_RxT, ref_logp_RxT, cfg.kl_estimator)

        lengths_R = batch["completion_mask"].sum(axis=1)
        if cfg.overlong_filtering:
            kept_R = 1 - batch["truncated"].astype(batch["completion_mask"].dtype)
            batch = {**batch, "completion_mask": batch["completion_mask"] * kept_R[:, None]}
        if not reuse_logp:
            old_hidden_RxTxD, old_logp_RxT, _ = jax.lax.stop_gradient(scored(state.policy.params, batch))
            batch = {**batch, "old_logp": old_logp_RxT}
        rewards_R = batch["rewards"]
        metrics = {}
        if with_ref:
            ref_hidden_RxTxD, ref_logp_RxT, _ = scored(state.ref_params, batch)
            batch["ref_logp"] = ref_logp_RxT
            if full_kl:
                batch["ref_hidden"] = ref_hidden_RxTxD
        if with_ref and cfg.kl_placement == "reward":
            kl_RxT = token_kl(
                state.policy.params, old_hidden_RxTxD, old_logp_RxT, ref_hidden_RxTxD, ref_logp_RxT
            )
            seq_kl_R = jnp.sum(kl_RxT * batch["completion_mask"], axis=1)
            rewards_R = rewards_R - cfg.kl_coef * seq_kl_R
            metrics["kl"] = jnp.mean(seq_kl_R)
            metrics["kl/token"] = aggregate(kl_RxT, batch["completion_mask"])
        if cfg.overlong_shaping:
            shaping_R = overlong_penalty(lengths_R, max_len, cfg.overlong_buffer)
            rewards_R = rewards_R + shaping_R
            metrics["reward/overlong"] = jnp.mean(shaping_R)
        batch["adv"] = group_advantages(rewards_R, cfg.group_size, cfg.adv_scaling, cfg.std, cfg.std_eps)

        def loss_fn(params, mb, normalizer):
            hidden_RxTxD, logp_RxT, entropy_RxT = scored(params, mb, with_entropy=True)
            mask_RxT = mb["completion_mask"]
            old_logp_RxT = jax.lax.stop_gradient(logp_RxT) if reuse_logp else mb["old_logp"]
            pg_RxT, out = policy_loss(logp_RxT, old_logp_RxT, mb["adv"], mask_RxT, cfg.loss, **loss_kwargs)
            loss = aggregate(pg_RxT, mask_RxT, cfg.aggregation, normalizer, max_len=max_len)
            out = {**out, "pg_loss": loss, "entropy": aggregate(entropy_RxT, mask_RxT)}
            if with_ref and cfg.kl_placement == "loss":
                kl_RxT = token_kl(params, hidden_RxTxD, logp_RxT, mb.get("ref_hidden"), mb["ref_logp"])
                kl_loss = aggregate(kl_RxT, mask_RxT, cfg.aggregation, normalizer, max_len=max_len)
                loss = loss + cfg.kl_coef * kl_loss
                out["kl"] = jnp.sum(kl_RxT * mask_RxT) / mask_RxT.shape[0]
                out["kl/token"] = aggregate(kl_RxT, mask_RxT)
            return loss, out

        def one_update(policy, rows):
            mb = jax.tree.map(lambda x: x[rows], batch)
            normalizer = loss_normalizer(mb["completion_mask"], cfg.aggregation)
            loss, grads, out = accumulate_gradients(
                lambda p, micro: loss_fn(p, micro, normalizer), policy.params, mb, num_microbatches
            )
            return policy.apply_gradients(grads), {"loss": loss, "grad_norm": optax.tree.norm(grads), **out}

        rows_UxS = update_rows(key, R, cfg.num_minibatches, cfg.num_iterations)
        policy, update_metrics = jax.lax.scan(one_update, state.policy, rows_UxS)
        metrics.update(reduce_metrics(update_metrics))
        metrics.update(
            _rollout_metrics(batch["rewards"], batch["adv"], lengths_R, batch["truncated"], cfg.group_size)
        )
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


def _rollout_metrics(rewards_R, adv_R, lengths_R, truncated_R, G: int) -> dict:
    """Reward, advantage, response-length and truncation statistics of the rollout."""
    rewards_PxG = rewards_R.reshape(-1, G)
    lengths_R = lengths_R.astype(jnp.float32)
    return {
        "reward/mean": jnp.mean(rewards_R),
        "reward/std": jnp.std(rewards_R),
        "reward/zero_std_groups": jnp.mean(jnp.all(rewards_PxG == rewards_PxG[:, :1], axis=1)),
        "advantages/mean": jnp.mean(adv_R),
        "advantages/min": jnp.min(adv_R),
        "advantages/max": jnp.max(adv_R),
        "response_length/mean": jnp.mean(lengths_R),
        "response_length/min": jnp.min(lengths_R),
        "response_length/max": jnp.max(lengths_R),
        "truncated_fraction": jnp.mean(truncated_R.astype(jnp.float32)),
    }
