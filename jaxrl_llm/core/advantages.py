"""Advantages and reward shaping: GAE, whitening, PPO token rewards, adaptive KL, and the outcome
estimators of critic-free RL: group baselines (GRPO), leave-one-out (RLOO), REINFORCE++-baseline.

Shapes: B sequences, T completion positions, P prompts (groups), G samples per prompt (B = P·G,
each group contiguous).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax

SCALES = ("group", "batch", "none")
STDS = ("bessel", "population")
# Outcome-reward advantage estimators of GRPO-style training (config `grpo.advantage`).
ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus_baseline")

GAE_GAMMA, GAE_LAMBDA = 1.0, 0.95  # TRL, OpenAI; verl and OpenRLHF use λ = 1
GROUP_STD_EPS = 1e-4  # TRL (verl 1e-6)


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def gae(
    rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, gamma: float = GAE_GAMMA,
    lam: float = GAE_LAMBDA,
) -> tuple[jax.Array, jax.Array]:
    """GAE (Schulman 2016): δ_t = r_t + γV_{t+1} − V_t, A_t = δ_t + γλA_{t+1}; returns (A, R = A + V).

    Scanned right to left (`lax.scan(reverse=True)`). Masked positions are skipped — V_{t+1} and A_{t+1}
    are those of the next *valid* position (verl), the value after the last valid token is 0 — and get
    A = R = 0. Defaults γ = 1, λ = 0.95 (TRL, OpenAI; verl and OpenRLHF use λ = 1). Whiten A after
    computing R, not before.
    """
    chex.assert_rank([rewards_BxT, values_BxT, mask_BxT], 2)
    chex.assert_equal_shape([rewards_BxT, values_BxT, mask_BxT])
    valid_BxT = _f32(mask_BxT) > 0
    r_BxT = jnp.where(valid_BxT, _f32(rewards_BxT), 0.0)
    v_BxT = jnp.where(valid_BxT, _f32(values_BxT), 0.0)

    def step(carry, xs):
        next_v_B, next_a_B = carry
        r_B, v_B, valid_B = xs
        a_B = r_B + gamma * next_v_B - v_B + gamma * lam * next_a_B
        carry = (jnp.where(valid_B, v_B, next_v_B), jnp.where(valid_B, a_B, next_a_B))
        return carry, jnp.where(valid_B, a_B, 0.0)

    zeros_B = jnp.zeros(r_BxT.shape[0], jnp.float32)
    _, adv_TxB = lax.scan(step, (zeros_B, zeros_B), (r_BxT.T, v_BxT.T, valid_BxT.T), reverse=True)
    adv_BxT = adv_TxB.T
    return adv_BxT, jnp.where(valid_BxT, adv_BxT + v_BxT, 0.0)


def whiten(x: jax.Array, mask: jax.Array | None = None, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """Masked whitening (x − μ)·rsqrt(σ² + eps) over valid entries, σ² Bessel-corrected (TRL, verl).

    `shift_mean=False` adds μ back (reward whitening). Masked entries come back as 0; with one valid
    entry σ² is taken as 0.
    """
    x = _f32(x)
    m = jnp.ones_like(x) if mask is None else _f32(mask)
    chex.assert_equal_shape([x, m])
    n = jnp.sum(m)
    mean = jnp.sum(x * m) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.square(x - mean) * m) / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def ppo_token_rewards(
    score_B: jax.Array, kl_BxT: jax.Array, mask_BxT: jax.Array, beta: float | jax.Array,
    no_stop_B: jax.Array | None = None, missing_stop_penalty: float = 0.0,
) -> jax.Array:
    """Per-token PPO reward r_t = −β·KL_t on completion tokens, plus the RM score at the last valid token.

    (Ziegler 2019, InstructGPT; the seed design; verl and OpenRLHF place the score on the last valid token,
    TRL one past it.) `no_stop_B` marks answers with no stop token; their score loses
    `missing_stop_penalty` (TRL `missing_eos_penalty`). Rows without a valid token get all zeros.
    """
    chex.assert_rank([score_B, kl_BxT, mask_BxT], [1, 2, 2])
    chex.assert_equal_shape([kl_BxT, mask_BxT])
    m_BxT = _f32(mask_BxT)
    score_B = _f32(score_B)
    if no_stop_B is not None:
        score_B = score_B - missing_stop_penalty * _f32(no_stop_B)
    valid_after_BxT = jnp.cumsum(m_BxT[:, ::-1], axis=1)[:, ::-1]
    is_last_BxT = m_BxT * (valid_after_BxT == 1.0)
    kl_BxT = jnp.where(m_BxT > 0, _f32(kl_BxT), 0.0)
    return -beta * kl_BxT * m_BxT + score_B[:, None] * is_last_BxT


def adaptive_kl_update(
    beta: jax.Array, observed_kl: jax.Array, target: float, horizon: int, n_steps: int
) -> jax.Array:
    """Adaptive KL controller (Ziegler et al. 2019): e = clip(KL/target − 1, ±0.2), β ← β·(1 + e·n/horizon).

    `observed_kl` is the sequence-summed KL of the batch, `n_steps` the episodes in it; OpenAI used
    β₀ = 0.15, target 6 nats, horizon 10000.
    """
    error = jnp.clip(_f32(observed_kl) / target - 1.0, -0.2, 0.2)
    return beta * (1.0 + error * n_steps / horizon)


def _std(x, axis, std):
    ddof = 1 if std == "bessel" else 0
    n = x.size if axis is None else x.shape[axis]
    mean = jnp.mean(x, axis=axis, keepdims=True)
    return jnp.sqrt(jnp.sum(jnp.square(x - mean), axis=axis, keepdims=True) / max(n - ddof, 1))


def _grouped(rewards_B, group_size):
    if group_size < 1 or rewards_B.shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size} must divide the batch of {rewards_B.shape[0]} rewards "
            "(each prompt's G samples contiguous)."
        )
    return _f32(rewards_B).reshape(-1, group_size)


def group_advantages(
    rewards_B: jax.Array, group_size: int, scale: str = "group", std: str = "bessel", eps: float = GROUP_STD_EPS
) -> jax.Array:
    """GRPO advantage A_i = (r_i − mean_group)/(std + ε) (Shao 2024), broadcast by the caller to answer i's tokens.

    scale: `group` std within the group (GRPO), `batch` one std over the batch (TRL `batch`), `none` no
    division (Dr. GRPO, Liu 2025). std: `bessel` (1/(G−1), TRL, verl, OpenRLHF) or `population`
    (1/G, as the seed design writes it). ε = 1e-4 as TRL (verl 1e-6).
    """
    chex.assert_rank(rewards_B, 1)
    if scale not in SCALES:
        raise ValueError(f"Unknown advantage scale {scale!r}; choose one of {', '.join(SCALES)}.")
    if std not in STDS:
        raise ValueError(f"Unknown std convention {std!r}; choose one of {', '.join(STDS)}.")
    r_PxG = _grouped(rewards_B, group_size)
    centered_PxG = r_PxG - jnp.mean(r_PxG, axis=1, keepdims=True)
    if scale == "group":
        centered_PxG = centered_PxG / (_std(r_PxG, 1, std) + eps)
    elif scale == "batch":
        centered_PxG = centered_PxG / (_std(r_PxG, None, std) + eps)
    return centered_PxG.reshape(-1)


def rloo_advantages(rewards_B: jax.Array, group_size: int) -> jax.Array:
    """REINFORCE leave-one-out (Kool 2019; Ahmadian 2024): A_i = r_i − mean_{j≠i} r_j within each group."""
    chex.assert_rank(rewards_B, 1)
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2 samples per prompt, got {group_size}.")
    r_PxG = _grouped(rewards_B, group_size)
    others_PxG = (jnp.sum(r_PxG, axis=1, keepdims=True) - r_PxG) / (group_size - 1)
    return (r_PxG - others_PxG).reshape(-1)


def reinforce_plus_plus_baseline(rewards_B: jax.Array, group_size: int, mask_BxT: jax.Array) -> jax.Array:
    """REINFORCE++-baseline (Hu 2025, arXiv 2501.03262): r_i − mean_group, put on every valid token of
    answer i, then whitened over all valid tokens of the batch [B, T] (verl
    `reinforce_plus_plus_baseline`: token-weighted mean, Bessel-corrected variance, ε = 1e-8)."""
    chex.assert_rank([rewards_B, mask_BxT], [1, 2])
    r_PxG = _grouped(rewards_B, group_size)
    centered_B = (r_PxG - jnp.mean(r_PxG, axis=1, keepdims=True)).reshape(-1)
    return whiten(jnp.broadcast_to(centered_B[:, None], mask_BxT.shape), mask_BxT)
