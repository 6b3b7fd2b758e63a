"""PPO for RLHF as the seed design lays it out (Ziegler et al. 2019; Ouyang et al. 2022).

Four models: the actor π_θ (trained), the critic V_φ (trained, its own optimizer), the frozen
reference π_SFT and the frozen reward model. Shapes: R rollout rows, T tokens (prompt left-padded,
then completion right-padded), U updates (epochs × minibatches).

One jitted step takes a sampled rollout and does, in order: old log-probs, reference log-probs,
old values and the RM score; per-token rewards r_t = −β·KL_t with the score added at the last
completion token; GAE (λ, γ) and returns R = A + V; whitened advantages; then `epochs` passes over
shuffled minibatches updating actor (clipped surrogate − entropy bonus) and critic (clipped value
loss); finally the adaptive KL controller's β update, if on.

Alignment: the state that emits token t is the prefix tokens < t, whose value the critic gives at
position t − 1; values are shifted right by one like the log-probs (`common.score_tokens`).
Log-probs are taken at the temperature the rollout was sampled at (the batch carries it).
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
    scalar_scores,
    shift_right,
    update_rows,
)
from jaxrl_llm.config import PPOSection
from jaxrl_llm.core import (
    adaptive_kl_update,
    aggregate,
    entropy_bonus,
    gae,
    kl_estimate,
    loss_normalizer,
    policy_loss,
    ppo_token_rewards,
    value_loss,
    whiten,
)
from jaxrl_llm.core.correction import NO_CORRECTION, Correction
from jaxrl_llm.models.transformer import ModelConfig
from jaxrl_llm.state import TrainState


class PPOState(struct.PyTreeNode):
    """Actor and critic with their optimizers, the frozen reference (None with LoRA: the actor's
    base) and reward model, and β."""

    actor: TrainState
    critic: TrainState
    ref_params: Any
    reward_params: Any  # None: the score is the batch's host-computed `rewards` alone
    kl_coef: jax.Array

    @classmethod
    def create(
        cls, actor: TrainState, critic: TrainState, ref_params: Any, reward_params: Any, kl_coef: float
    ) -> "PPOState":
        return cls(actor, critic, ref_params, reward_params, jnp.asarray(kl_coef, jnp.float32))


def explained_variance(values_RxT: jax.Array, returns_RxT: jax.Array, mask_RxT: jax.Array) -> jax.Array:
    """1 − Var(R − V)/Var(R) over valid tokens: 1 is a perfect critic, ≤ 0 no better than a constant."""
    def var(x):
        return aggregate(jnp.square(x - aggregate(x, mask_RxT)), mask_RxT)

    return 1.0 - var(returns_RxT - values_RxT) / jnp.maximum(var(returns_RxT), 1e-8)


def make_ppo_step(
    model_config: ModelConfig, cfg: PPOSection, num_microbatches: int = 1,
    critic_config: ModelConfig | None = None, reward_config: ModelConfig | None = None,
    chunk_size: int | None = None, correction: Correction = NO_CORRECTION,
) -> Callable[[PPOState, RolloutBatch, jax.Array], tuple[PPOState, dict]]:
    """`step(state, batch, key) -> (state, metrics)` on a `RolloutBatch`, scored at its temperature;
    `correction` (TIS / MIS against the sampler's log-probs) acts on the actor's loss alone."""
    critic_config = critic_config or model_config
    reward_config = reward_config or model_config
    full_kl = cfg.kl_estimator == "full"

    def scored(params, rows: RolloutBatch, with_entropy=False, rng=None):
        return rollout_scores(params, model_config, rows, with_entropy, chunk_size, rng)

    def values_of(params, rows: RolloutBatch, rng=None):
        values_RxT, _ = scalar_scores(params, critic_config, rows.tokens_RxT, rows.mask_RxT, rng)
        return shift_right(values_RxT[:, :-1])

    def step(state: PPOState, batch: RolloutBatch, key: jax.Array):
        R = batch.tokens_RxT.shape[0]
        mask_RxT = batch.completion_mask_RxT
        # A fixed β is the config's (so a resumed run takes a changed ppo.kl_coef); the adaptive
        # controller's β lives in the state, starting from ppo.kl_coef.
        beta = state.kl_coef if cfg.adaptive_kl else jnp.asarray(cfg.kl_coef, jnp.float32)

        actor_params, ref_params = state.actor.model_params(), reference_of(state.ref_params, state.actor)
        hidden_RxTxD, old_logp_RxT, _ = jax.lax.stop_gradient(scored(actor_params, batch))
        ref_hidden_RxTxD, ref_logp_RxT, _ = scored(ref_params, batch)
        if full_kl:
            kl_RxT = hidden_full_kl(
                actor_params, hidden_RxTxD, ref_params, ref_hidden_RxTxD, model_config,
                batch.temperature, chunk_size, batch.prompt_width,
            )
        else:
            kl_RxT = kl_estimate(old_logp_RxT, ref_logp_RxT, cfg.kl_estimator)
        # The host's rewards (an environment's; 0 for single answers), plus the reward model's score.
        score_R = batch.rewards_R
        if state.reward_params is not None:
            score_R = score_R + scalar_scores(state.reward_params, reward_config, batch.tokens_RxT, batch.mask_RxT)[1]
        if cfg.reward_clip is not None:
            score_R = jnp.clip(score_R, -cfg.reward_clip, cfg.reward_clip)
        penalty = 0.0 if cfg.missing_stop_penalty is None else cfg.missing_stop_penalty  # a sweep's may be traced
        rewards_RxT = ppo_token_rewards(score_R, kl_RxT, mask_RxT, beta, batch.truncated_R, penalty)
        if batch.token_rewards_RxT is not None:  # per-turn rewards, each at its turn's last token
            rewards_RxT = rewards_RxT + batch.token_rewards_RxT * mask_RxT
        old_values_RxT = values_of(state.critic.model_params(), batch)
        adv_RxT, returns_RxT = gae(rewards_RxT, old_values_RxT, mask_RxT, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv_RxT = whiten(adv_RxT, mask_RxT)
        targets = {
            "old_logp_RxT": old_logp_RxT, "old_values_RxT": old_values_RxT, "adv_RxT": adv_RxT,
            "returns_RxT": returns_RxT,
        }
        correction_targets, mismatch = rollout_correction(old_logp_RxT, batch, correction)
        targets.update(correction_targets)

        def actor_loss(params, micro, rng, normalizer):
            rows, row_targets = micro
            _, logp_RxT, entropy_RxT = scored(params, rows, with_entropy=True, rng=rng)
            m_RxT = row_targets.get("keep_RxT", rows.completion_mask_RxT)
            pg_RxT, out = policy_loss(
                logp_RxT, row_targets["old_logp_RxT"], row_targets["adv_RxT"], m_RxT, "ppo",
                eps_low=cfg.eps, eps_high=cfg.eps,
            )
            pg_loss = aggregate(pg_RxT * row_targets.get("is_weight_RxT", 1.0), m_RxT, "token_mean", normalizer)
            loss = pg_loss + entropy_bonus(entropy_RxT, m_RxT, cfg.entropy_coef, "token_mean", normalizer)
            return loss, {**out, "pg_loss": pg_loss, "entropy": aggregate(entropy_RxT, m_RxT)}

        def critic_loss(params, micro, rng, normalizer):
            rows, row_targets = micro
            values_RxT = values_of(params, rows, rng)
            vf_RxT, out = value_loss(
                values_RxT, row_targets["old_values_RxT"], row_targets["returns_RxT"], rows.completion_mask_RxT,
                cfg.value_clip,
            )
            vf_loss = aggregate(vf_RxT, rows.completion_mask_RxT, "token_mean", normalizer)
            return cfg.vf_coef * vf_loss, {**out, "vf_loss": vf_loss}

        def one_update(models, indexed):
            actor, critic = models
            index, rows = indexed
            mb = jax.tree.map(lambda x: x[rows], (batch, targets))
            normalizer = loss_normalizer(mb[0].completion_mask_RxT, "token_mean")
            actor_normalizer = loss_normalizer(mb[1].get("keep_RxT", mb[0].completion_mask_RxT), "token_mean")
            rng = jax.random.fold_in(dropout_key, index)
            _, actor_grads, actor_out = accumulate_gradients(
                lambda p, micro, r: actor_loss(actor.model_params(p), micro, r, actor_normalizer), actor.params, mb,
                num_microbatches, jax.random.fold_in(rng, 0),
            )
            _, critic_grads, critic_out = accumulate_gradients(
                lambda p, micro, r: critic_loss(critic.model_params(p), micro, r, normalizer), critic.params, mb,
                num_microbatches, jax.random.fold_in(rng, 1),
            )
            out = {
                **actor_out, **critic_out,
                "grad_norm/actor": optax.tree.norm(actor_grads),
                "grad_norm/critic": optax.tree.norm(critic_grads),
            }
            return (actor.apply_gradients(actor_grads), critic.apply_gradients(critic_grads)), out

        dropout_key = jax.random.fold_in(key, DROPOUT_STREAM)
        rows_UxS = update_rows(key, R, cfg.num_minibatches, cfg.epochs)
        (actor, critic), update_metrics = jax.lax.scan(
            one_update, (state.actor, state.critic), (jnp.arange(len(rows_UxS)), rows_UxS)
        )

        seq_kl_R = jnp.sum(kl_RxT * mask_RxT, axis=1)
        kl_coef = beta
        if cfg.adaptive_kl:
            kl_coef = adaptive_kl_update(beta, jnp.mean(seq_kl_R), cfg.kl_target, cfg.kl_horizon, R)
        lengths_R = mask_RxT.sum(axis=1).astype(jnp.float32)
        metrics = {
            **reduce_metrics(update_metrics),
            **mismatch,
            "score/mean": jnp.mean(score_R),
            "score/std": jnp.std(score_R),
            "reward/mean": jnp.mean(jnp.sum(rewards_RxT, axis=1)),
            "reward/non_score": jnp.mean(jnp.sum(rewards_RxT, axis=1) - score_R),
            "kl": jnp.mean(seq_kl_R),
            "kl_coef": beta,
            "values/mean": aggregate(old_values_RxT, mask_RxT),
            "returns/mean": aggregate(returns_RxT, mask_RxT),
            "explained_variance": explained_variance(old_values_RxT, returns_RxT, mask_RxT),
            "response_length/mean": jnp.mean(lengths_R),
            "response_length/max": jnp.max(lengths_R),
            "truncated_fraction": jnp.mean(batch.truncated_R.astype(jnp.float32)),
        }
        return state.replace(actor=actor, critic=critic, kl_coef=kl_coef), metrics

    return step
