"""core/advantages.py against plain float64 NumPy references (loops over positions) and the GAE invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.core import (
    adaptive_kl_update,
    gae,
    group_advantages,
    ppo_token_rewards,
    reinforce_plus_plus_baseline,
    rloo_advantages,
    whiten,
)

SEEDS = range(10)  # looped inside each test: new data on the same shapes, so no new compiles
EAGER_SEEDS = range(4)
CASES = [(True, (3, 7)), (True, (1, 1)), (False, (2, 5))]  # (jit, shape): compiles dominate the runtime
JITTED = {
    gae: jax.jit(gae),
    whiten: jax.jit(whiten, static_argnames="shift_mean"),
    ppo_token_rewards: jax.jit(ppo_token_rewards),
    group_advantages: jax.jit(group_advantages, static_argnames=("group_size", "scale", "std")),
    rloo_advantages: jax.jit(rloo_advantages, static_argnames="group_size"),
    reinforce_plus_plus_baseline: jax.jit(reinforce_plus_plus_baseline, static_argnames="group_size"),
}


def maybe_jit(fn, jit):
    return JITTED[fn] if jit else fn


def seeds(jit):
    return SEEDS if jit else EAGER_SEEDS


def random_mask(rng, B, T, seed, contiguous=False):
    if contiguous:
        lengths = rng.integers(0 if seed % 2 == 0 else 1, T + 1, size=B)
        return np.arange(T)[None, :] < lengths[:, None]
    mask = rng.random((B, T)) < 0.7
    if seed % 2 == 0:
        mask[0] = False
    return mask


# ----------------------------------------------------------------------------- GAE


def ref_gae(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv, ret = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(T)):
            if not mask[b, t]:
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            adv[b, t] = delta + gamma * lam * next_adv
            ret[b, t] = adv[b, t] + values[b, t]
            next_value, next_adv = float(values[b, t]), adv[b, t]
    return adv, ret


@pytest.mark.parametrize("jit, shape", CASES)
def test_gae_matches_numpy(jit, shape):
    for seed in seeds(jit):
        rng = np.random.default_rng(seed)
        mask = random_mask(rng, *shape, seed, contiguous=seed % 3 == 0)
        rewards, values = rng.normal(size=(2, *shape)).astype(np.float32)
        rewards[~mask] = values[~mask] = np.nan  # garbage under the mask must not leak
        gamma, lam = [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)][seed % 3]
        adv, ret = maybe_jit(gae, jit)(rewards, values, mask, gamma=gamma, lam=lam)
        ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
        assert adv.shape == ret.shape == shape and adv.dtype == jnp.float32
        np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
        np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")


def completion_batch(seed, B=3, T=7):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, B, T, seed, contiguous=True)
    rewards, values = rng.normal(size=(2, B, T)).astype(np.float32)
    return mask, rewards, values


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    for seed in SEEDS:
        mask, rewards, values = completion_batch(seed)
        adv, ret = JITTED[gae](rewards, values, mask, gamma=1.0, lam=1.0)
        B, T = mask.shape
        for b in range(B):
            for t in range(T):
                if mask[b, t]:
                    reward_to_go = sum(float(rewards[b, k]) for k in range(t, T) if mask[b, k])
                    np.testing.assert_allclose(adv[b, t], reward_to_go - values[b, t], rtol=1e-5, atol=1e-5)
                    np.testing.assert_allclose(ret[b, t], reward_to_go, rtol=1e-5, atol=1e-5)


def test_gae_with_lambda_zero_is_one_step_td_error():
    for seed in SEEDS:
        mask, rewards, values = completion_batch(seed)
        adv, _ = JITTED[gae](rewards, values, mask, gamma=0.9, lam=0.0)
        B, T = mask.shape
        for b in range(B):
            for t in range(T):
                next_value = float(values[b, t + 1]) if t + 1 < T and mask[b, t + 1] else 0.0
                td = rewards[b, t] + 0.9 * next_value - values[b, t] if mask[b, t] else 0.0
                np.testing.assert_allclose(adv[b, t], td, rtol=1e-5, atol=1e-5)


def test_gae_fully_masked_rows_are_finite_zeros():
    nan = jnp.full((3, 7), jnp.nan, jnp.float32)
    adv, ret = JITTED[gae](nan, nan, jnp.zeros((3, 7), bool), gamma=1.0, lam=0.95)
    assert jnp.all(adv == 0.0) and jnp.all(ret == 0.0)


# ----------------------------------------------------------------------------- whitening


def ref_whiten(x, mask, shift_mean):
    valid = [float(v) for v, m in zip(x.ravel(), mask.ravel()) if m]
    n = len(valid)
    mean = sum(valid) / max(n, 1)
    var = sum((v - mean) ** 2 for v in valid) / max(n - 1, 1)
    out = np.zeros(x.shape)
    for i, (v, m) in enumerate(zip(x.ravel(), mask.ravel())):
        if m:
            out.flat[i] = (v - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    return out


@pytest.mark.parametrize("jit, shape", CASES)
def test_whiten_matches_numpy(jit, shape):
    for seed in seeds(jit):
        rng = np.random.default_rng(seed)
        mask = random_mask(rng, *shape, seed)
        x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
        shift_mean = bool(seed % 2)
        got = maybe_jit(whiten, jit)(x, mask, shift_mean=shift_mean)
        np.testing.assert_allclose(got, ref_whiten(x, mask, shift_mean), rtol=1e-4, atol=1e-5, err_msg=f"seed {seed}")


def test_whiten_without_mask_and_degenerate_masks():
    x = np.random.default_rng(0).normal(size=8).astype(np.float32)
    np.testing.assert_allclose(whiten(x), ref_whiten(x, np.ones(8, bool), True), rtol=1e-4, atol=1e-5)
    assert jnp.all(whiten(jnp.ones(8), jnp.zeros(8)) == 0.0)
    one_valid = whiten(x, jnp.arange(8) == 3, shift_mean=False)
    np.testing.assert_allclose(one_valid, np.where(np.arange(8) == 3, x, 0.0), rtol=1e-6)


# ----------------------------------------------------------------------------- PPO token rewards, adaptive KL


def ref_token_rewards(score, kl, mask, beta, no_stop, penalty):
    B, T = kl.shape
    out = np.zeros((B, T))
    for b in range(B):
        last = None
        for t in range(T):
            if mask[b, t]:
                out[b, t] = -beta * kl[b, t]
                last = t
        if last is not None:
            out[b, last] += score[b] - (penalty if no_stop is not None and no_stop[b] else 0.0)
    return out


@pytest.mark.parametrize("jit, shape", CASES)
def test_ppo_token_rewards_match_numpy(jit, shape):
    for seed in seeds(jit):
        rng = np.random.default_rng(seed)
        mask = random_mask(rng, *shape, seed, contiguous=seed % 2 == 1)
        kl = np.where(mask, rng.normal(size=shape), np.nan).astype(np.float32)
        score = rng.normal(size=shape[0]).astype(np.float32)
        no_stop = rng.random(shape[0]) < 0.5
        beta = [0.05, 0.1, 0.0][seed % 3]
        got = maybe_jit(ppo_token_rewards, jit)(score, kl, mask, beta, no_stop_B=no_stop, missing_stop_penalty=1.5)
        ref = ref_token_rewards(score, kl, mask, beta, no_stop, 1.5)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=f"seed {seed}")
    if not jit:
        no_penalty = ppo_token_rewards(score, kl, mask, 0.1)
        np.testing.assert_allclose(no_penalty, ref_token_rewards(score, kl, mask, 0.1, None, 0.0), rtol=1e-5, atol=1e-6)


def test_adaptive_kl_update_matches_ziegler():
    for kl, expected_error in [(6.0, 0.0), (7.2, 0.2), (60.0, 0.2), (4.8, -0.2), (0.0, -0.2), (6.6, 0.1)]:
        beta = adaptive_kl_update(0.15, kl, 6.0, 10000, 256)
        np.testing.assert_allclose(beta, 0.15 * (1 + expected_error * 256 / 10000), rtol=1e-6)
    jitted = jax.jit(adaptive_kl_update)(jnp.float32(0.15), jnp.float32(7.2), 6.0, 10000.0, 256.0)
    np.testing.assert_allclose(jitted, 0.15 * (1 + 0.2 * 256 / 10000), rtol=1e-6)


# ----------------------------------------------------------------------------- group advantages, RLOO


def ref_group_advantages(rewards, G, scale, std, eps):
    n = len(rewards)

    def stdev(values):
        mean = sum(values) / len(values)
        denom = max(len(values) - (1 if std == "bessel" else 0), 1)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / denom)

    out = np.zeros(n)
    batch_std = stdev([float(r) for r in rewards])
    for start in range(0, n, G):
        group = [float(r) for r in rewards[start : start + G]]
        mean = sum(group) / G
        for i in range(G):
            centred = group[i] - mean
            if scale == "group":
                centred /= stdev(group) + eps
            elif scale == "batch":
                centred /= batch_std + eps
            out[start + i] = centred
    return out


def ref_rloo(rewards, G):
    out = np.zeros(len(rewards))
    for start in range(0, len(rewards), G):
        for i in range(G):
            others = [float(rewards[start + j]) for j in range(G) if j != i]
            out[start + i] = float(rewards[start + i]) - sum(others) / len(others)
    return out


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("std", ["bessel", "population"])
def test_group_advantages_match_numpy(std, scale, jit):
    for seed in seeds(jit):
        rng = np.random.default_rng(seed)
        rewards = rng.normal(size=12).astype(np.float32)
        if seed % 2:
            rewards = (rng.random(12) < 0.5).astype(np.float32)  # 0/1 rewards: some groups have zero std
        got = maybe_jit(group_advantages, jit)(rewards, group_size=4, scale=scale, std=std, eps=1e-4)
        np.testing.assert_allclose(got, ref_group_advantages(rewards, 4, scale, std, 1e-4), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got).reshape(3, 4).sum(axis=1), 0.0, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_rloo_matches_numpy(jit):
    for seed in seeds(jit):
        rewards = np.random.default_rng(seed).normal(size=12).astype(np.float32)
        for G in (2, 4) if jit else (3,):
            got = maybe_jit(rloo_advantages, jit)(rewards, group_size=G)
            np.testing.assert_allclose(got, ref_rloo(rewards, G), rtol=1e-5, atol=1e-5)


def ref_reinforce_pp_baseline(rewards, G, mask):
    """verl `reinforce_plus_plus_baseline`, one token at a time: r_i − mean of i's group on each valid
    token, then (x − μ)/sqrt(σ² + 1e-8) with the mean and Bessel variance over all valid tokens."""
    centred = [float(rewards[i]) - sum(float(r) for r in rewards[i - i % G : i - i % G + G]) / G
               for i in range(len(rewards))]
    values = [centred[b] for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    out = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                out[b, t] = (centred[b] - mean) / math.sqrt(var + 1e-8)
    return out


@pytest.mark.parametrize("jit", [False, True])
def test_reinforce_plus_plus_baseline_matches_numpy(jit):
    for seed in seeds(jit):
        rng = np.random.default_rng(seed)
        rewards = rng.normal(size=8).astype(np.float32)
        if seed % 2:
            rewards = (rng.random(8) < 0.5).astype(np.float32)
        mask = random_mask(rng, 8, 5, 1, contiguous=True)  # every answer has a token
        got = np.asarray(maybe_jit(reinforce_plus_plus_baseline, jit)(rewards, group_size=4, mask_BxT=mask))
        want = ref_reinforce_pp_baseline(rewards, 4, mask)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # Invariants: zero on masked tokens, constant along each answer, token-weighted mean 0 and
        # Bessel variance 1 (unless every centred reward ties).
        assert np.all(got[~mask] == 0)
        assert all(len(set(np.round(got[b][mask[b]], 6))) == 1 for b in range(8))
        if np.ptp(want[mask]) > 0:
            np.testing.assert_allclose([got[mask].mean(), got[mask].var(ddof=1)], [0.0, 1.0], atol=1e-4)


def test_group_size_errors_speak_to_the_user():
    with pytest.raises(ValueError, match="group_size=5 must divide the batch of 12"):
        group_advantages(jnp.zeros(12), 5)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(jnp.zeros(12), 1)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(jnp.zeros(12), 4, scale="global")
