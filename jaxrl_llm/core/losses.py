"""Losses and estimators: aggregation, KL, policy (PPO/GSPO/SAPO/CISPO), value, entropy, DPO, RM, SFT, overlong.

Shapes: B sequences (or preference pairs), T completion positions.

Per-token losses come back as [B, T] with masked positions exactly 0 and are reduced by
`aggregate`; masks may be bool or float. Inputs at masked positions are never trusted:
they are zeroed before any exp, so padding cannot turn into NaN.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_KINDS = ("k1", "k2", "k3")
POLICY_KINDS = ("ppo", "gspo", "gspo_token", "sapo", "cispo")
DPO_KINDS = ("sigmoid", "cdpo", "robust", "hinge", "ipo")

# Defaults, each the paper's (and the config's, which reads them from here).
PPO_CLIP = 0.2  # ε of PPO (Schulman 2017) and GRPO (Shao 2024)
GSPO_CLIP = (3e-4, 4e-4)  # GSPO's sequence-ratio range (ε_low, ε_high), arXiv 2507.18071 §5.1
SAPO_TAU = (1.0, 1.05)  # SAPO's gate temperatures (τ_pos, τ_neg), arXiv 2511.20347
CISPO_EPS_MAX = 5.0  # CISPO's weight cap; TRL's recommendation
VALUE_CLIP = 0.2  # ε_v (TRL, OpenAI; verl and OpenRLHF use 0.5)
DPO_BETA = 0.1  # DPO paper, TRL

LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0
LOG_SEQ_RATIO_MAX = 10.0


def _check_kind(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(allowed)}.")


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _masked_mean(x_BxT, mask_BxT):
    m_BxT = _f32(mask_BxT)
    return jnp.sum(x_BxT * m_BxT) / jnp.maximum(jnp.sum(m_BxT), 1.0)


def _masked_min_mean_max(x_BxT, mask_BxT):
    valid_BxT = _f32(mask_BxT) > 0
    any_valid = jnp.any(valid_BxT)
    lo = jnp.where(any_valid, jnp.min(jnp.where(valid_BxT, x_BxT, jnp.inf)), 0.0)
    hi = jnp.where(any_valid, jnp.max(jnp.where(valid_BxT, x_BxT, -jnp.inf)), 0.0)
    return lo, _masked_mean(x_BxT, mask_BxT), hi


def loss_normalizer(mask_BxT: jax.Array, mode: str = "token_mean") -> jax.Array:
    """The default denominator of `aggregate`: valid tokens (token_mean), sequences with ≥1 valid token
    (seq_mean_token_mean), or all B rows (seq_mean_token_sum_norm); compute it on the global batch's
    mask and pass it to every microbatch / data shard so their sum is the one-big-batch loss."""
    _check_kind("aggregation", mode, AGGREGATIONS)
    m_BxT = _f32(mask_BxT)
    if mode == "token_mean":
        return jnp.maximum(jnp.sum(m_BxT), 1.0)
    if mode == "seq_mean_token_mean":
        return jnp.maximum(jnp.sum(jnp.any(m_BxT > 0, axis=1)), 1.0)
    return jnp.asarray(m_BxT.shape[0], jnp.float32)


def aggregate(
    loss_BxT: jax.Array, mask_BxT: jax.Array, mode: str = "token_mean", normalizer: jax.Array | None = None,
    max_len: int | None = None,
) -> jax.Array:
    """Reduce a per-token loss to a scalar.

    token_mean: Σℓm / Σm (DAPO 2503.14476; TRL `dapo`, verl `token-mean`).
    seq_mean_token_mean: (1/B')·Σ_i Σ_t ℓm / |o_i| (GRPO, Shao 2024), B' = sequences with a valid
        token (verl; TRL counts empty rows too).
    seq_mean_token_sum_norm: (1/B)·Σ_i Σ_t ℓm / L (Dr. GRPO, Liu 2025), L = `max_len`, default T.
    `normalizer` replaces the denominator (B', B or Σm) with its global value; see `loss_normalizer`.
    """
    chex.assert_rank([loss_BxT, mask_BxT], 2)
    chex.assert_equal_shape([loss_BxT, mask_BxT])
    _check_kind("aggregation", mode, AGGREGATIONS)
    if normalizer is None:
        normalizer = loss_normalizer(mask_BxT, mode)
    m_BxT = _f32(mask_BxT)
    sum_B = jnp.sum(jnp.where(m_BxT > 0, loss_BxT * m_BxT, 0.0), axis=1)
    if mode == "token_mean":
        return jnp.sum(sum_B) / normalizer
    if mode == "seq_mean_token_mean":
        return jnp.sum(sum_B / jnp.maximum(jnp.sum(m_BxT, axis=1), 1.0)) / normalizer
    return jnp.sum(sum_B) / (loss_BxT.shape[1] if max_len is None else max_len) / normalizer


def kl_estimate(logp_BxT: jax.Array, ref_logp_BxT: jax.Array, kind: str = "k3") -> jax.Array:
    """Per-token estimate of KL(π_θ ‖ π_ref) from sampled tokens, l = logp − ref_logp (Schulman 2020).

    k1 = l; k2 = ½l²; k3 = e^{−l} − 1 + l ≥ 0 (low-variance, unbiased). As verl: k1 and k2 are not
    clamped; for k3, l is clamped to ±20 before the exp and k3 itself to at most 10 (no gradient beyond);
    verl's lower clamp −10 is 0 here, which only removes float rounding below the true minimum 0.
    """
    chex.assert_equal_shape([logp_BxT, ref_logp_BxT])
    _check_kind("KL estimator", kind, KL_KINDS)
    l_BxT = _f32(logp_BxT) - _f32(ref_logp_BxT)
    if kind == "k1":
        return l_BxT
    if kind == "k2":
        return 0.5 * jnp.square(l_BxT)
    l_BxT = jnp.clip(l_BxT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.clip(jnp.expm1(-l_BxT) + l_BxT, 0.0, K3_CLAMP)


def _clipped_surrogate(ratio_BxT, adv_BxT, eps_low, eps_high, dual_clip):
    """PPO-clip: max(−Aρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), then min(·, −A·c) where A < 0 (dual clip)."""
    unclipped_BxT = -adv_BxT * ratio_BxT
    clipped_BxT = -adv_BxT * jnp.clip(ratio_BxT, 1.0 - eps_low, 1.0 + eps_high)
    loss_BxT = jnp.maximum(unclipped_BxT, clipped_BxT)
    if dual_clip is not None:
        loss_BxT = jnp.where(adv_BxT < 0, jnp.minimum(loss_BxT, -adv_BxT * dual_clip), loss_BxT)
    return loss_BxT


def _sequence_log_ratio(raw_log_ratio_BxT, m_BxT):
    """GSPO's log s_i = mean_t log ρ_{i,t} over a sequence's valid tokens (unclamped, as the paper and
    verl), and whether it passed the cap of 10 beyond which neither GSPO kind passes a gradient."""
    count_B = jnp.maximum(jnp.sum(m_BxT, axis=1), 1.0)
    mean_B = jnp.sum(raw_log_ratio_BxT * m_BxT, axis=1) / count_B
    return jnp.minimum(mean_B, LOG_SEQ_RATIO_MAX), mean_B > LOG_SEQ_RATIO_MAX


def _policy_ratio(logp_BxT, raw_log_ratio_BxT, m_BxT, kind):
    """The importance ratio each kind uses: per token (ppo, sapo, cispo; log ρ clamped to ±20, as verl
    and OpenRLHF) or per sequence (gspo, gspo_token)."""
    if kind not in ("gspo", "gspo_token"):
        return jnp.exp(jnp.clip(raw_log_ratio_BxT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    log_s_B, capped_B = _sequence_log_ratio(raw_log_ratio_BxT, m_BxT)
    if kind == "gspo":
        return jnp.broadcast_to(jnp.exp(log_s_B)[:, None], raw_log_ratio_BxT.shape)
    # s_{i,t} = sg[s_i]·π_θ(y_t)/sg[π_θ(y_t)]; past the cap it is the constant e^10, as gspo's is (verl
    # clamps the token expression, which has the same effect).
    sg = jax.lax.stop_gradient
    token_BxT = jnp.where(capped_B[:, None], 0.0, logp_BxT - sg(logp_BxT))
    return jnp.exp(sg(log_s_B)[:, None] + token_BxT)


def _surrogate(kind, ratio_BxT, adv_BxT, logp_BxT, eps_low, eps_high, dual_clip, tau_pos, tau_neg, eps_max):
    """Per-token loss of `kind`, and where its clip is active below and above."""
    rho_BxT = jax.lax.stop_gradient(ratio_BxT)
    never_BxT = jnp.zeros(rho_BxT.shape, bool)
    if kind == "sapo":
        tau_BxT = jnp.where(adv_BxT > 0, tau_pos, tau_neg)
        loss_BxT = -(4.0 / tau_BxT) * jax.nn.sigmoid(tau_BxT * (ratio_BxT - 1.0)) * adv_BxT
        return loss_BxT, never_BxT, never_BxT
    if kind == "cispo":
        return -jnp.minimum(rho_BxT, eps_max) * adv_BxT * logp_BxT, never_BxT, rho_BxT > eps_max
    loss_BxT = _clipped_surrogate(ratio_BxT, adv_BxT, eps_low, eps_high, dual_clip)
    return loss_BxT, (rho_BxT < 1.0 - eps_low) & (adv_BxT < 0), (rho_BxT > 1.0 + eps_high) & (adv_BxT > 0)


def policy_loss(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    adv: jax.Array,
    mask_BxT: jax.Array,
    kind: str = "ppo",
    *,
    eps_low: float | None = None,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    tau_pos: float = SAPO_TAU[0],
    tau_neg: float = SAPO_TAU[1],
    eps_max: float = CISPO_EPS_MAX,
) -> tuple[jax.Array, dict]:
    """Per-token policy-gradient loss [B, T] and metrics; `adv` is adv_BxT or adv_B (one per sequence).

    Token kinds use ρ = exp(clip(logp − old_logp, ±20)) as verl/OpenRLHF. Kinds (loss to minimise):
    ppo: max(−Aρ, −A·clip(ρ, 1−ε_low, 1+ε_high)) (PPO, Schulman 2017; clip-higher ε_high > ε_low from
        DAPO 2503.14476); ε defaults 0.2/ε_low; `dual_clip` c caps the loss at −A·c where A < 0 (verl).
    gspo: the same clip on s_i = exp(mean_t log ρ_{i,t}) (GSPO 2507.18071), ε defaults 3e-4/4e-4; the
        mean is of the unclamped token log-ratios (the paper, verl), log s_i capped at 10 (verl) with no
        gradient beyond; the sequence term is repeated on each of its valid tokens, so aggregate with
        seq_mean_token_mean to get the paper's (1/G)·Σ_i term_i.
    gspo_token: s_{i,t} = sg[s_i]·exp(logp_t − sg[logp_t]) (GSPO 2507.18071); same value and, with A
        constant per sequence, the same gradient as gspo (§4.3), the cap included.
    sapo: −(4/τ)·σ(τ(ρ − 1))·A, τ = τ_pos if A > 0 else τ_neg (SAPO 2511.20347); no hard clip.
    cispo: −sg[min(ρ, ε_max)]·A·logp (CISPO, MiniMax-M1 2025; cap as TRL).
    Metrics over valid tokens: clipfrac/low (ratio below 1−ε_low with A < 0), clipfrac/high (above
    1+ε_high with A > 0, or above ε_max for cispo), clipfrac (their sum), approx_kl = mean ½(logp −
    old_logp)² (TRL), ratio/min|mean|max of the ratio the kind uses.
    """
    chex.assert_rank([logp_BxT, old_logp_BxT, mask_BxT], 2)
    chex.assert_equal_shape([logp_BxT, old_logp_BxT, mask_BxT])
    _check_kind("policy loss", kind, POLICY_KINDS)
    m_BxT = _f32(mask_BxT)
    valid_BxT = m_BxT > 0
    logp_BxT = jnp.where(valid_BxT, _f32(logp_BxT), 0.0)
    old_logp_BxT = jnp.where(valid_BxT, _f32(old_logp_BxT), 0.0)
    adv = _f32(adv)
    adv_BxT = jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, logp_BxT.shape)
    ratio_BxT = _policy_ratio(logp_BxT, logp_BxT - jax.lax.stop_gradient(old_logp_BxT), m_BxT, kind)

    if kind in ("gspo", "gspo_token"):
        eps_low = GSPO_CLIP[0] if eps_low is None else eps_low
        eps_high = GSPO_CLIP[1] if eps_high is None else eps_high
    else:
        eps_low = PPO_CLIP if eps_low is None else eps_low
        eps_high = eps_low if eps_high is None else eps_high
    loss_BxT, low_BxT, high_BxT = _surrogate(
        kind, ratio_BxT, adv_BxT, logp_BxT, eps_low, eps_high, dual_clip, tau_pos, tau_neg, eps_max
    )

    ratio_min, ratio_mean, ratio_max = _masked_min_mean_max(jax.lax.stop_gradient(ratio_BxT), m_BxT)
    clip_low, clip_high = _masked_mean(low_BxT, m_BxT), _masked_mean(high_BxT, m_BxT)
    metrics = {
        "clipfrac/low": clip_low,
        "clipfrac/high": clip_high,
        "clipfrac": clip_low + clip_high,
        "approx_kl": _masked_mean(0.5 * jnp.square(jax.lax.stop_gradient(logp_BxT - old_logp_BxT)), m_BxT),
        "ratio/min": ratio_min,
        "ratio/mean": ratio_mean,
        "ratio/max": ratio_max,
    }
    return loss_BxT * m_BxT, metrics


def value_loss(
    values_BxT: jax.Array, old_values_BxT: jax.Array, returns_BxT: jax.Array, mask_BxT: jax.Array,
    clip_eps: float | None = VALUE_CLIP,
) -> tuple[jax.Array, dict]:
    """Per-token ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²) and its clip fraction (PPO, Schulman 2017).

    ε_v = 0.2 as TRL and OpenAI (verl and OpenRLHF use 0.5); `clip_eps=None` gives the seed
    design's plain ½(V − R)².
    """
    chex.assert_equal_shape([values_BxT, old_values_BxT, returns_BxT, mask_BxT])
    m_BxT = _f32(mask_BxT)
    valid_BxT = m_BxT > 0
    v_BxT = jnp.where(valid_BxT, _f32(values_BxT), 0.0)
    old_v_BxT = jnp.where(valid_BxT, _f32(old_values_BxT), 0.0)
    r_BxT = jnp.where(valid_BxT, _f32(returns_BxT), 0.0)
    unclipped_BxT = 0.5 * jnp.square(v_BxT - r_BxT)
    if clip_eps is None:
        return unclipped_BxT * m_BxT, {"value_clipfrac": jnp.zeros((), jnp.float32)}
    v_clipped_BxT = old_v_BxT + jnp.clip(v_BxT - old_v_BxT, -clip_eps, clip_eps)
    clipped_BxT = 0.5 * jnp.square(v_clipped_BxT - r_BxT)
    loss_BxT = jnp.maximum(unclipped_BxT, clipped_BxT) * m_BxT
    return loss_BxT, {"value_clipfrac": _masked_mean(clipped_BxT > unclipped_BxT, m_BxT)}


def entropy_bonus(
    entropy_BxT: jax.Array, mask_BxT: jax.Array, coef: float, mode: str = "token_mean",
    normalizer: jax.Array | None = None,
) -> jax.Array:
    """The loss term −c·agg(H) that rewards exploration (PPO, Schulman 2017; off by default everywhere)."""
    return -coef * aggregate(_f32(entropy_BxT), mask_BxT, mode, normalizer)


def _dpo_metrics(chosen_B, rejected_B):
    return {
        "rewards/chosen": jnp.mean(chosen_B),
        "rewards/rejected": jnp.mean(rejected_B),
        "rewards/accuracies": jnp.mean(_f32(chosen_B > rejected_B)),
        "rewards/margins": jnp.mean(chosen_B - rejected_B),
    }


def dpo_loss(
    policy_chosen_logp_B: jax.Array,
    policy_rejected_logp_B: jax.Array,
    ref_chosen_logp_B: jax.Array,
    ref_rejected_logp_B: jax.Array,
    beta: float = DPO_BETA,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_len_B: jax.Array | None = None,
    rejected_len_B: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Per-pair loss [B] and metrics; h = β·Δ, Δ = (logπ − logπ_ref)(y_w) − (logπ − logπ_ref)(y_l).

    sigmoid: −log σ(h) (DPO, Rafailov 2023); with label smoothing ε it is cdpo:
        −(1−ε)·log σ(h) − ε·log σ(−h) (conservative DPO, as TRL's sigmoid);
    robust: [−(1−ε)·log σ(h) + ε·log σ(−h)]/(1 − 2ε) (Chowdhury 2024);
    hinge: relu(1 − h) (SLiC, Zhao 2023); ipo: (Δ − 1/(2β))² (IPO, Azar 2023).
    Log-probs are summed over completion tokens; given `chosen_len_B`/`rejected_len_B` they are first
    divided by them, which is how TRL feeds ipo (per-token averages) — or pass averages directly.
    Metrics follow TRL: rewards = β·(logπ − logπ_ref) of each answer.
    """
    _check_kind("DPO loss", kind, DPO_KINDS)
    pc_B, pr_B, rc_B, rr_B = (
        _f32(x) for x in (policy_chosen_logp_B, policy_rejected_logp_B, ref_chosen_logp_B, ref_rejected_logp_B)
    )
    chex.assert_equal_shape([pc_B, pr_B, rc_B, rr_B])
    if chosen_len_B is not None:
        n_c_B = jnp.maximum(_f32(chosen_len_B), 1.0)
        pc_B, rc_B = pc_B / n_c_B, rc_B / n_c_B
    if rejected_len_B is not None:
        n_r_B = jnp.maximum(_f32(rejected_len_B), 1.0)
        pr_B, rr_B = pr_B / n_r_B, rr_B / n_r_B
    chosen_B, rejected_B = pc_B - rc_B, pr_B - rr_B
    delta_B = chosen_B - rejected_B
    h_B = beta * delta_B
    eps = label_smoothing
    if kind in ("sigmoid", "cdpo"):
        loss_B = -(1.0 - eps) * jax.nn.log_sigmoid(h_B) - eps * jax.nn.log_sigmoid(-h_B)
    elif kind == "robust":
        loss_B = (-(1.0 - eps) * jax.nn.log_sigmoid(h_B) + eps * jax.nn.log_sigmoid(-h_B)) / (1.0 - 2.0 * eps)
    elif kind == "hinge":
        loss_B = jax.nn.relu(1.0 - h_B)
    else:
        loss_B = jnp.square(delta_B - 1.0 / (2.0 * beta))
    sg = jax.lax.stop_gradient
    return loss_B, _dpo_metrics(sg(beta * chosen_B), sg(beta * rejected_B))


def reward_model_loss(
    r_chosen_B: jax.Array, r_rejected_B: jax.Array, margin_B: jax.Array | None = None, center_coef: float = 0.0
) -> tuple[jax.Array, dict]:
    """Per-pair Bradley–Terry loss −log σ(r_w − r_l − margin) + c·(r_w + r_l)² [B] and metrics (InstructGPT,
    Ouyang 2022; margin from Llama 2, Touvron 2023; centering c ≈ 0.01 from TRL, off by default)."""
    chex.assert_equal_shape([r_chosen_B, r_rejected_B])
    rw_B, rl_B = _f32(r_chosen_B), _f32(r_rejected_B)
    diff_B = rw_B - rl_B
    margin_B = 0.0 if margin_B is None else _f32(margin_B)
    loss_B = -jax.nn.log_sigmoid(diff_B - margin_B) + center_coef * jnp.square(rw_B + rl_B)
    both_2B = jax.lax.stop_gradient(jnp.concatenate([rw_B, rl_B]))
    metrics = {
        "accuracy": jnp.mean(_f32(diff_B > 0)),
        "margin": jnp.mean(jax.lax.stop_gradient(diff_B)),
        "reward/min": jnp.min(both_2B),
        "reward/mean": jnp.mean(both_2B),
        "reward/max": jnp.max(both_2B),
    }
    return loss_B, metrics


def sft_loss(
    logp_BxT: jax.Array, mask_BxT: jax.Array, mode: str = "token_mean", normalizer: jax.Array | None = None
) -> jax.Array:
    """Masked next-token NLL −agg(log π(y_t)) over answer tokens (prompt tokens masked out)."""
    return aggregate(-_f32(logp_BxT), mask_BxT, mode, normalizer)


def overlong_penalty(lengths_B: jax.Array, max_len: int, buffer_len: int) -> jax.Array:
    """DAPO soft overlong punishment (2503.14476), in tokens: 0 if L ≤ L_max − L_buf, (L_max − L_buf − L)/L_buf
    up to L_max (reaching −1), −1 beyond."""
    if buffer_len <= 0:
        raise ValueError(f"overlong buffer_len must be positive, got {buffer_len}; set it to e.g. max_len // 4.")
    expected = max_len - buffer_len
    return jnp.clip((expected - _f32(lengths_B)) / buffer_len, -1.0, 0.0)
