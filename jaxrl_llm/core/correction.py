"""The rollout/trainer mismatch and its correction: the sampler's log-probs beside the trainer's.

Shapes: B sequences, T tokens. ρ_t = π_train(t) / π_rollout(t) for each sampled token, where
π_train is the trainer's policy at the rollout's params (PPO's π_old) and π_rollout the sampler's
(another precision, another kernel, or a stale policy). Log-ratios are clamped to ±20 before any
exp, as verl does.

Corrections (verl's "decoupled" mode: the PPO ratio stays π_θ/π_old, these reweight or drop terms):
- TIS, truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings
  you off-policy RL training"): the policy-gradient term of a token is multiplied by
  w = min(ρ, C), token level (ρ_t) or sequence level (Π_t ρ_t on each of the sequence's tokens).
- MIS, masked importance sampling (verl's rollout correction, "rollout_rs"; Liu, Li et al. 2025,
  "When Speed Kills Stability"): tokens, or whole sequences, whose ratio leaves [low, high] are
  dropped from the loss and from its normaliser. Sequence level uses Π_t ρ_t, geometric level
  exp(mean_t log ρ_t).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LEVELS = ("none", "token", "sequence")
MASK_LEVELS = ("none", "token", "sequence", "geometric")
TIS_CAP = 2.0  # C of Yao et al. 2025 and verl's rollout_is_threshold default
LOG_RATIO_CLAMP = 20.0  # verl's safety bound on log ρ


@dataclasses.dataclass(frozen=True)
class Correction:
    """Which correction to apply: TIS at `is_level` capped at `is_cap`; MIS at
    `mask_level` keeping ratios in [mask_low, mask_high]."""

    is_level: str = "none"
    is_cap: float = TIS_CAP
    mask_level: str = "none"
    mask_low: float = 0.5
    mask_high: float = 2.0

    @property
    def active(self) -> bool:
        return self.is_level != "none" or self.mask_level != "none"


NO_CORRECTION = Correction()  # metrics only


def _log_ratio(train_logp_BxT, rollout_logp_BxT, mask_BxT):
    """Clamped log ρ [B,T], 0 off the mask."""
    l_BxT = jnp.asarray(train_logp_BxT, jnp.float32) - jnp.asarray(rollout_logp_BxT, jnp.float32)
    return jnp.where(mask_BxT > 0, jnp.clip(l_BxT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), 0.0)


def _sequence_log_ratio(log_ratio_BxT, mask_BxT, level: str) -> jax.Array:
    """log of the ratio `level` uses, per token [B,T]: the token's own, or its sequence's
    (Σ_t, or mean_t for geometric) repeated on each token."""
    if level == "token":
        return log_ratio_BxT
    total_B = jnp.sum(log_ratio_BxT, axis=1)
    if level == "geometric":
        total_B = total_B / jnp.maximum(jnp.sum(mask_BxT, axis=1), 1)
    return jnp.broadcast_to(jnp.clip(total_B, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)[:, None], log_ratio_BxT.shape)


def correction_weights(
    train_logp_BxT: jax.Array, rollout_logp_BxT: jax.Array, mask_BxT: jax.Array, correction: Correction
) -> tuple[jax.Array, jax.Array]:
    """(weights_BxT, keep_BxT): TIS weights (1 where TIS is off) and the MIS mask (the loss mask
    with dropped tokens zeroed; the mask itself where MIS is off). Both carry no gradient."""
    mask_BxT = jnp.asarray(mask_BxT)
    log_ratio_BxT = jax.lax.stop_gradient(_log_ratio(train_logp_BxT, rollout_logp_BxT, mask_BxT))
    weights_BxT = jnp.ones(mask_BxT.shape, jnp.float32)
    if correction.is_level != "none":
        log_w_BxT = _sequence_log_ratio(log_ratio_BxT, mask_BxT, correction.is_level)
        weights_BxT = jnp.minimum(jnp.exp(log_w_BxT), correction.is_cap)
    keep_BxT = mask_BxT
    if correction.mask_level != "none":
        ratio_BxT = jnp.exp(_sequence_log_ratio(log_ratio_BxT, mask_BxT, correction.mask_level))
        inside_BxT = (ratio_BxT >= correction.mask_low) & (ratio_BxT <= correction.mask_high)
        keep_BxT = mask_BxT * inside_BxT.astype(mask_BxT.dtype)
    return jnp.where(mask_BxT > 0, weights_BxT, 0.0), keep_BxT


def mismatch_metrics(
    train_logp_BxT: jax.Array, rollout_logp_BxT: jax.Array, mask_BxT: jax.Array, low: float = 0.5,
    high: float = 2.0,
) -> dict:
    """How far the sampler's log-probs are from the trainer's over the masked tokens: mean |Δ log p|,
    KL(π_rollout ‖ π_train) by the k3 estimator on the rollout's own samples (ρ − 1 − log ρ), the
    ratio's min and max, and the fraction of tokens whose ρ leaves [low, high]."""
    mask_BxT = jnp.asarray(mask_BxT)
    valid_BxT = mask_BxT > 0
    count = jnp.maximum(jnp.sum(valid_BxT), 1)
    l_BxT = jax.lax.stop_gradient(_log_ratio(train_logp_BxT, rollout_logp_BxT, mask_BxT))
    ratio_BxT = jnp.exp(l_BxT)
    mean = lambda x_BxT: jnp.sum(jnp.where(valid_BxT, x_BxT, 0.0)) / count
    some = jnp.any(valid_BxT)
    return {
        "mismatch/abs_logp_diff": mean(jnp.abs(l_BxT)),
        "mismatch/kl": mean(ratio_BxT - 1.0 - l_BxT),
        "mismatch/ratio/min": jnp.where(some, jnp.min(jnp.where(valid_BxT, ratio_BxT, jnp.inf)), 1.0),
        "mismatch/ratio/max": jnp.where(some, jnp.max(jnp.where(valid_BxT, ratio_BxT, -jnp.inf)), 1.0),
        "mismatch/outside_fraction": mean(((ratio_BxT < low) | (ratio_BxT > high)).astype(jnp.float32)),
    }


def corrected(
    train_logp_BxT: jax.Array, rollout_logp_BxT: jax.Array, mask_BxT: jax.Array, correction: Correction
) -> tuple[jax.Array, jax.Array, dict]:
    """(weights_BxT, keep_BxT, metrics): `correction_weights` and `mismatch_metrics`, with the mean TIS
    weight and the fraction MIS dropped when those are on."""
    weights_BxT, keep_BxT = correction_weights(train_logp_BxT, rollout_logp_BxT, mask_BxT, correction)
    metrics = mismatch_metrics(train_logp_BxT, rollout_logp_BxT, mask_BxT, correction.mask_low, correction.mask_high)
    count = jnp.maximum(jnp.sum(mask_BxT), 1)
    if correction.is_level != "none":
        metrics["correction/is_weight_mean"] = jnp.sum(weights_BxT) / count
    if correction.mask_level != "none":
        metrics["correction/masked_fraction"] = 1.0 - jnp.sum(keep_BxT) / count
    return weights_BxT, keep_BxT, metrics
