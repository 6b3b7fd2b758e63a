"""core/losses.py against plain float64 NumPy references (loops over positions) and the invariants of issue 4."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.core import (
    aggregate,
    dpo_loss,
    entropy_bonus,
    kl_estimate,
    loss_normalizer,
    overlong_penalty,
    policy_loss,
    reward_model_loss,
    sft_loss,
    value_loss,
)

SEEDS = range(10)  # looped inside each test: new data on the same shapes, so no new compiles
EAGER_SEEDS = range(4)  # eager dispatch is slow; jitted cases get all SEEDS
CASES = [(True, (3, 7)), (True, (1, 1)), (False, (2, 5))]  # (jit, shape): compiles dominate the runtime
KINDS = ["ppo", "gspo", "gspo_token", "sapo", "cispo"]
MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


def summed_policy_loss(logp, old_logp, adv, mask, **kw):
    loss, metrics = policy_loss(logp, old_logp, adv, mask, **kw)
    return jnp.sum(loss), (loss, metrics)


POLICY_VALUE_AND_GRAD = jax.value_and_grad(summed_policy_loss, has_aux=True)
JITTED = {
    "policy": jax.jit(POLICY_VALUE_AND_GRAD, static_argnames="kind"),
    "aggregate": jax.jit(aggregate, static_argnames="mode"),
    "kl": jax.jit(kl_estimate, static_argnames="kind"),
    "value": jax.jit(value_loss),
    "dpo": jax.jit(dpo_loss, static_argnames="kind"),
    "rm": jax.jit(reward_model_loss),
    "sft": jax.jit(sft_loss, static_argnames="mode"),
}
EAGER = {
    "policy": POLICY_VALUE_AND_GRAD,
    "aggregate": aggregate,
    "kl": kl_estimate,
    "value": value_loss,
    "dpo": dpo_loss,
    "rm": reward_model_loss,
    "sft": sft_loss,
}


def fn(name, jit):
    return (JITTED if jit else EAGER)[name]


def seeds(jit):
    return SEEDS if jit else EAGER_SEEDS


def random_mask(rng, B, T, seed):
    mask = rng.random((B, T)) < 0.7
    mask[:, 0] |= B > 1  # mostly non-empty rows...
    if seed % 2 == 0:
        mask[0] = False  # ...but some fully masked ones
    return mask


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- aggregation


def ref_aggregate(loss, mask, mode, max_len=None):
    B, T = loss.shape
    if mode == "token_mean":
        total, count = 0.0, 0
        for b in range(B):
            for t in range(T):
                if mask[b, t]:
                    total += loss[b, t]
                    count += 1
        return total / max(count, 1)
    if mode == "seq_mean_token_mean":
        seq_means = []
        for b in range(B):
            valid = [loss[b, t] for t in range(T) if mask[b, t]]
            if valid:
                seq_means.append(sum(valid) / len(valid))
        return sum(seq_means) / max(len(seq_means), 1)
    total = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                total += loss[b, t]
    return total / (T if max_len is None else max_len) / B


@pytest.mark.parametrize("jit, shape", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_aggregate_matches_numpy(mode, jit, shape):
    for seed in seeds(jit):
        rng = np.random.default_rng(seed)
        mask = random_mask(rng, *shape, seed)
        loss = np.where(mask, rng.normal(size=shape), np.nan).astype(np.float32)  # garbage under the mask must not leak
        max_len = 16.0 if seed % 2 else (float(shape[1]) if jit else None)  # None would be a second compile
        got = fn("aggregate", jit)(loss, mask, mode=mode, max_len=max_len)
        np.testing.assert_allclose(got, ref_aggregate(loss, mask, mode, max_len), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_microbatches_with_global_normalizer_equal_full_batch(mode):
    rng = np.random.default_rng(7)
    loss = rng.normal(size=(6, 7)).astype(np.float32)
    mask = rng.random((6, 7)) < 0.6
    mask[1] = False
    mask[4, :] = True
    normalizer = loss_normalizer(mask, mode)
    halves = [
        JITTED["aggregate"](loss[rows], mask[rows], mode=mode, normalizer=normalizer, max_len=7.0)
        for rows in (slice(0, 3), slice(3, 6))
    ]
    np.testing.assert_allclose(sum(halves), ref_aggregate(loss, mask, mode), rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_fully_masked_batch_aggregates_to_finite_zero(mode):
    loss = jnp.full((2, 3), jnp.nan)
    got = aggregate(loss, jnp.zeros((2, 3), bool), mode)
    assert got == 0.0


# ----------------------------------------------------------------------------- KL estimators


def ref_kl(logp, ref_logp, kind):
    out = np.zeros(logp.shape)
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            l = float(logp[b, t]) - float(ref_logp[b, t])
            if kind == "k1":
                out[b, t] = l
            elif kind == "k2":
                out[b, t] = 0.5 * l * l
            else:
                l = min(max(l, -20.0), 20.0)
                out[b, t] = min(math.exp(-l) - 1.0 + l, 10.0)
    return out


@pytest.mark.parametrize("jit, shape", CASES)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_match_numpy_and_vanish_at_equality(kind, jit, shape):
    for seed in seeds(jit):
        rng = np.random.default_rng(seed)
        logp = -np.abs(rng.normal(size=shape) * 2).astype(np.float32)
        ref_logp = (logp + rng.normal(size=shape) * (0.3 if seed % 2 else 30.0)).astype(np.float32)
        kl = fn("kl", jit)(logp, ref_logp, kind=kind)
        np.testing.assert_allclose(kl, ref_kl(logp, ref_logp, kind), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(fn("kl", jit)(logp, logp, kind=kind), 0.0)


def test_k3_is_never_negative():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        logp = (rng.normal(size=(3, 7)) * 40).astype(np.float32)
        near = (logp + rng.normal(size=(3, 7)) * 1e-4).astype(np.float32)  # where float rounding bites
        assert np.all(np.asarray(JITTED["kl"](logp, (rng.normal(size=(3, 7)) * 40).astype(np.float32), kind="k3")) >= 0)
        assert np.all(np.asarray(JITTED["kl"](logp, near, kind="k3")) >= 0)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(kl_estimate(x, near, "k3"))))(logp + 50.0)
    assert np.all(np.isfinite(grad))


# ----------------------------------------------------------------------------- policy losses


def ref_policy_loss(logp, old, adv, mask, kind, eps_low, eps_high, dual_clip, tau_pos, tau_neg, eps_max):
    """Loss per token, d(Σ loss)/d logp per token, and metrics, one position at a time."""
    B, T = logp.shape
    loss, grad = np.zeros((B, T)), np.zeros((B, T))
    used_ratios, low, high, half_sq = [], 0, 0, []
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        # GSPO: the plain mean of the token log-ratios (no ±20 clamp), capped at 10 with no gradient beyond.
        raw_log_s = sum(float(logp[b, t]) - float(old[b, t]) for t in valid) / max(len(valid), 1)
        s = math.exp(min(raw_log_s, 10.0))
        for t in valid:
            diff = float(logp[b, t]) - float(old[b, t])
            d_log_ratio = 1.0 if abs(diff) < 20.0 else 0.0
            rho = math.exp(min(max(diff, -20.0), 20.0))
            a = float(adv[b, t])
            half_sq.append(0.5 * diff * diff)
            if kind in ("ppo", "gspo", "gspo_token"):
                r = rho if kind == "ppo" else s
                unclipped, clipped = -a * r, -a * min(max(r, 1.0 - eps_low), 1.0 + eps_high)
                value, slope = max(unclipped, clipped), (-a if unclipped >= clipped else 0.0)
                if dual_clip is not None and a < 0 and -a * dual_clip < value:
                    value, slope = -a * dual_clip, 0.0
                loss[b, t] = value
                if kind == "ppo":
                    grad[b, t] += slope * rho * d_log_ratio
                elif raw_log_s >= 10.0:
                    pass  # past the cap neither GSPO kind has a gradient
                elif kind == "gspo_token":
                    grad[b, t] += slope * s
                else:
                    for u in valid:  # every token's term depends on every logp of the sequence through s
                        grad[b, u] += slope * s / len(valid)
                low += r < 1.0 - eps_low and a < 0
                high += r > 1.0 + eps_high and a > 0
                used_ratios.append(r)
            elif kind == "sapo":
                tau = tau_pos if a > 0 else tau_neg
                sig = sigmoid(tau * (rho - 1.0))
                loss[b, t] = -(4.0 / tau) * sig * a
                grad[b, t] = -4.0 * sig * (1.0 - sig) * rho * a * d_log_ratio
                used_ratios.append(rho)
            else:
                weight = min(rho, eps_max)
                loss[b, t] = -weight * a * float(logp[b, t])
                grad[b, t] = -weight * a
                high += rho > eps_max
                used_ratios.append(rho)
    n = max(len(used_ratios), 1)
    metrics = {
        "clipfrac/low": low / n,
        "clipfrac/high": high / n,
        "clipfrac": (low + high) / n,
        "approx_kl": sum(half_sq) / n,
        "ratio/min": min(used_ratios, default=0.0),
        "ratio/mean": sum(used_ratios) / n,
        "ratio/max": max(used_ratios, default=0.0),
    }
    return loss, grad, metrics


def policy_problem(seed, shape, per_sequence_adv):
    rng = np.random.default_rng(seed)
    B, T = shape
    mask = random_mask(rng, B, T, seed)
    logp = -np.abs(rng.normal(size=(B, T))).astype(np.float32)
    old = (logp + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    if seed % 3 == 2:
        old[-1] = logp[-1] - 25.0  # exercises the ±20 token log-ratio clamp and GSPO's cap log s ≤ 10
    if per_sequence_adv:
        adv_in = rng.normal(size=B).astype(np.float32)
        adv_full = np.repeat(adv_in[:, None], T, axis=1)
    else:
        adv_in = adv_full = rng.normal(size=(B, T)).astype(np.float32)
    logp[~mask], old[~mask] = np.nan, np.inf  # garbage under the mask must not leak
    return logp, old, adv_in, adv_full, mask


def kind_params(kind, seed, dual_clip):
    if kind == "ppo":
        return dict(eps_low=0.2, eps_high=0.28 if seed % 2 else 0.2, dual_clip=dual_clip)
    if kind in ("gspo", "gspo_token"):
        return dict(eps_low=3e-4, eps_high=4e-4) if seed % 2 else dict(eps_low=0.2, eps_high=0.3)
    if kind == "sapo":
        return dict(tau_pos=1.0, tau_neg=1.05) if seed % 2 else dict(tau_pos=2.0, tau_neg=0.5)
    return dict(eps_max=5.0) if seed % 2 else dict(eps_max=1.2)


@pytest.mark.parametrize("jit, shape", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_policy_loss_matches_numpy(kind, jit, shape):
    for seed in seeds(jit):
        # Under jit, adv_B vs adv_BxT and dual clip on/off would each be another compile: vary them by case.
        per_sequence_adv = shape[0] == 1 if jit else bool(seed % 2)
        dual_clip = (3.0 if shape[0] > 1 else None) if jit else (3.0 if seed % 2 else None)
        logp, old, adv_in, adv_full, mask = policy_problem(seed, shape, per_sequence_adv)
        params = kind_params(kind, seed, dual_clip)
        (total, (loss, metrics)), grad = fn("policy", jit)(logp, old, adv_in, mask, kind=kind, **params)
        full = dict(eps_low=0.2, eps_high=0.2, dual_clip=None, tau_pos=1.0, tau_neg=1.05, eps_max=5.0)
        full.update({"eps_low": 3e-4, "eps_high": 4e-4} if kind.startswith("gspo") else {})
        full.update(params)
        ref_loss, ref_grad, ref_metrics = ref_policy_loss(logp, old, adv_full, mask, kind, **full)
        assert loss.shape == mask.shape and loss.dtype == jnp.float32
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6, err_msg=f"seed {seed}")
        np.testing.assert_allclose(total, ref_loss.sum(), rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6, err_msg=f"seed {seed}")
        assert set(metrics) == set(ref_metrics)
        for name, value in ref_metrics.items():
            np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=f"{name}, seed {seed}")


@pytest.mark.parametrize("kind", ["ppo", "gspo", "gspo_token"])
def test_on_policy_clipped_equals_unclipped_with_zero_clipfrac(kind):
    rng = np.random.default_rng(1)
    logp = jnp.asarray(-np.abs(rng.normal(size=(4, 6))), jnp.float32)
    adv = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    mask = jnp.asarray(rng.random((4, 6)) < 0.8)

    @jax.jit
    def run(eps_low, eps_high, dual_clip):
        def total(x):
            clip = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
            loss, metrics = policy_loss(x, jax.lax.stop_gradient(x), adv, mask, kind=kind, **clip)
            return aggregate(loss, mask), metrics

        return jax.value_and_grad(total, has_aux=True)(logp)

    (clipped, metrics), g_clipped = run(0.2, 0.28, 3.0)
    (unclipped, _), g_unclipped = run(1e9, 1e9, 1e9)
    np.testing.assert_allclose(clipped, unclipped, rtol=1e-6)
    np.testing.assert_allclose(g_clipped, g_unclipped, rtol=1e-6)
    np.testing.assert_allclose(clipped, -np.sum(adv * mask) / np.sum(mask), rtol=1e-6)
    assert metrics["clipfrac"] == metrics["clipfrac/low"] == metrics["clipfrac/high"] == 0.0
    assert metrics["approx_kl"] == 0.0 and metrics["ratio/min"] == metrics["ratio/max"] == 1.0


def test_gspo_token_gradient_equals_gspo_with_sequence_advantages():
    rng = np.random.default_rng(3)
    logp = jnp.asarray(-np.abs(rng.normal(size=(5, 7))), jnp.float32)
    old = logp + jnp.asarray(rng.normal(size=(5, 7)) * 0.02, jnp.float32)
    adv_B = jnp.asarray(rng.normal(size=5), jnp.float32)
    mask = jnp.asarray(rng.random((5, 7)) < 0.7).at[2].set(False)

    @jax.jit
    def value_and_grads(eps_low, eps_high):
        def objective(x, kind):
            loss, _ = policy_loss(x, old, adv_B, mask, kind=kind, eps_low=eps_low, eps_high=eps_high)
            return aggregate(loss, mask, "seq_mean_token_mean")

        return [jax.value_and_grad(objective)(logp, kind) for kind in ("gspo", "gspo_token")]

    for eps in [(3e-4, 4e-4), (0.2, 0.2)]:
        (v_seq, g_seq), (v_tok, g_tok) = value_and_grads(*eps)
        np.testing.assert_allclose(v_tok, v_seq, rtol=1e-6)
        np.testing.assert_allclose(g_tok, g_seq, rtol=1e-5, atol=1e-8)
        assert np.any(np.asarray(g_seq) != 0)


def test_gspo_takes_the_plain_mean_of_token_log_ratios():
    """verl and the paper: one token at log-ratio 24 among three (A = -1, per-row aggregation) gives
    log s = 8 and a loss of e^8 (a ±20 clamp first gave e^6.67), and both kinds give every token of
    the row the same gradient."""
    logp = jnp.asarray([[-1.0, -2.0, -0.5]], jnp.float32)
    old = logp - jnp.asarray([[24.0, 0.0, 0.0]], jnp.float32)
    mask = jnp.ones((1, 3))

    def objective(x, kind):
        loss, _ = policy_loss(x, old, -jnp.ones(1), mask, kind=kind)
        return aggregate(loss, mask, "seq_mean_token_mean")

    for kind in ("gspo", "gspo_token"):
        value, grad = jax.value_and_grad(objective)(logp, kind)
        np.testing.assert_allclose(value, math.exp(8.0), rtol=1e-5)
        np.testing.assert_allclose(grad, np.full((1, 3), math.exp(8.0) / 3), rtol=1e-5)


def test_gspo_kinds_agree_past_the_sequence_ratio_cap():
    """Past log s = 10 gspo passes no gradient (s is capped), so gspo_token must not either (GSPO
    §4.3: same gradient with sequence-level advantages); it used to pass about e^10·|A|/|o_i| a token."""
    logp = jnp.asarray([[-1.0, -2.0, -0.5, -1.5], [-0.3, -0.2, -0.9, -1.1]], jnp.float32)
    old = logp - jnp.asarray([[30.0, 25.0, 0.0, 0.0], [0.1, -0.1, 0.0, 0.2]], jnp.float32)  # row 0: log s = 13.75
    mask, adv = jnp.ones((2, 4)), jnp.asarray([-1.0, 0.5])

    def objective(x, kind):
        loss, _ = policy_loss(x, old, adv, mask, kind=kind, eps_low=0.2, eps_high=0.2)
        return aggregate(loss, mask, "seq_mean_token_mean")

    (v_seq, g_seq), (v_tok, g_tok) = [jax.value_and_grad(objective)(logp, k) for k in ("gspo", "gspo_token")]
    np.testing.assert_allclose(v_tok, v_seq, rtol=1e-6)
    np.testing.assert_allclose(g_tok, g_seq, rtol=1e-5, atol=1e-8)
    assert np.all(np.asarray(g_tok)[0] == 0.0) and np.any(np.asarray(g_tok)[1] != 0.0)


def test_sapo_gradient_weight_is_sech_squared_and_one_on_policy():
    rng = np.random.default_rng(4)
    old = jnp.asarray(-np.abs(rng.normal(size=(3, 40))), jnp.float32)
    rho = jnp.asarray(np.linspace(0.2, 3.0, 120).reshape(3, 40), jnp.float32)
    logp = old + jnp.log(rho)
    adv = jnp.asarray(rng.choice([-1.5, 0.7], size=(3, 40)), jnp.float32)
    mask = jnp.ones((3, 40), bool)
    sapo = jax.jit(jax.grad(lambda x: jnp.sum(policy_loss(x, old, adv, mask, kind="sapo")[0])))(logp)
    pg = -adv * rho  # the unclipped policy gradient d(−ρA)/d logp
    tau = jnp.where(adv > 0, 1.0, 1.05)
    np.testing.assert_allclose(sapo / pg, 1.0 / np.cosh(tau * (rho - 1.0) / 2.0) ** 2, rtol=1e-4)
    on_policy_loss = lambda x: jnp.sum(policy_loss(x, jax.lax.stop_gradient(x), adv, mask, kind="sapo")[0])
    on_policy = jax.jit(jax.grad(on_policy_loss))(old)
    np.testing.assert_allclose(on_policy, -adv, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_policy_loss_fully_masked_gives_finite_zeros(kind):
    nan = jnp.full((2, 5), jnp.nan, jnp.float32)  # the eager case's shape: primitives already compiled
    mask = jnp.zeros((2, 5), bool)
    (total, (loss, metrics)), grad = EAGER["policy"](nan, nan, jnp.ones(2), mask, kind=kind)
    assert total == 0.0 and jnp.all(loss == 0.0) and jnp.all(grad == 0.0)
    assert all(float(v) == 0.0 for v in metrics.values())


def test_unknown_policy_kind_names_the_choices():
    with pytest.raises(ValueError, match="ppo, gspo, gspo_token, sapo, cispo"):
        policy_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros(1), jnp.ones((1, 2)), kind="grpo")


# ----------------------------------------------------------------------------- value, entropy, SFT


def ref_value_loss(values, old, returns, mask, clip_eps):
    B, T = values.shape
    loss, clipped_count, count = np.zeros((B, T)), 0, 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            unclipped = 0.5 * (values[b, t] - returns[b, t]) ** 2
            if clip_eps is None:
                loss[b, t] = unclipped
            else:
                v_clip = min(max(values[b, t], old[b, t] - clip_eps), old[b, t] + clip_eps)
                clipped = 0.5 * (v_clip - returns[b, t]) ** 2
                loss[b, t] = max(unclipped, clipped)
                clipped_count += clipped > unclipped
            count += 1
    return loss, clipped_count / max(count, 1)


@pytest.mark.parametrize("jit, shape", CASES)
def test_value_loss_matches_numpy(jit, shape):
    for seed in seeds(jit):
        rng = np.random.default_rng(seed)
        mask = random_mask(rng, *shape, seed)
        values, old, returns = (rng.normal(size=(3, *shape))).astype(np.float32)
        clip_eps = None if seed % 3 == 0 else 0.2 + 0.3 * (seed % 2)
        loss, metrics = fn("value", jit)(values, old, returns, mask, clip_eps=clip_eps)
        ref_loss, ref_clipfrac = ref_value_loss(values, old, returns, mask, clip_eps)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["value_clipfrac"], ref_clipfrac, atol=1e-6)


def test_value_loss_fully_masked_gives_finite_zeros():
    nan = jnp.full((2, 3), jnp.nan)
    loss, metrics = value_loss(nan, nan, nan, jnp.zeros((2, 3)))
    assert jnp.all(loss == 0.0) and metrics["value_clipfrac"] == 0.0


@pytest.mark.parametrize("jit, shape", CASES)
def test_sft_loss_and_entropy_bonus_match_numpy(jit, shape):
    for seed in seeds(jit):
        rng = np.random.default_rng(seed)
        mask = random_mask(rng, *shape, seed)
        logp = -np.abs(rng.normal(size=shape)).astype(np.float32)
        ent = np.abs(rng.normal(size=shape)).astype(np.float32)
        mode = MODES[0] if jit else MODES[seed % 3]  # the modes themselves are covered by test_aggregate
        got = fn("sft", jit)(logp, mask, mode=mode)
        np.testing.assert_allclose(got, ref_aggregate(-logp, mask, mode), rtol=1e-5, atol=1e-6)
        bonus = entropy_bonus(ent, mask, 0.01)
        np.testing.assert_allclose(bonus, -0.01 * ref_aggregate(ent, mask, "token_mean"), rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- DPO and reward model


def ref_dpo(pc, pr, rc, rr, beta, kind, eps):
    losses, chosen, rejected = [], [], []
    for i in range(len(pc)):
        delta = (pc[i] - rc[i]) - (pr[i] - rr[i])
        h = beta * delta
        if kind in ("sigmoid", "cdpo"):
            losses.append(-(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h))
        elif kind == "robust":
            losses.append((-(1 - eps) * log_sigmoid(h) + eps * log_sigmoid(-h)) / (1 - 2 * eps))
        elif kind == "hinge":
            losses.append(max(0.0, 1.0 - h))
        else:
            losses.append((delta - 1.0 / (2.0 * beta)) ** 2)
        chosen.append(beta * (pc[i] - rc[i]))
        rejected.append(beta * (pr[i] - rr[i]))
    n = len(pc)
    metrics = {
        "rewards/chosen": sum(chosen) / n,
        "rewards/rejected": sum(rejected) / n,
        "rewards/accuracies": sum(c > r for c, r in zip(chosen, rejected)) / n,
        "rewards/margins": sum(c - r for c, r in zip(chosen, rejected)) / n,
    }
    return np.array(losses), metrics


@pytest.mark.parametrize("jit, B", [(True, 6), (False, 1)])
@pytest.mark.parametrize("kind", ["sigmoid", "cdpo", "robust", "hinge", "ipo"])
def test_dpo_loss_matches_numpy(kind, jit, B):
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        logps = [(-np.abs(rng.normal(size=B)) * 20).astype(np.float32) for _ in range(4)]
        eps = 0.1 * (seed % 3) if kind in ("sigmoid", "cdpo", "robust") else 0.0
        beta = 0.1 if seed < 5 else 0.5
        lengths = {}
        if seed % 2 or jit:  # lengths or none would be two compiles
            lengths = dict(chosen_len_B=rng.integers(1, 30, size=B), rejected_len_B=rng.integers(1, 30, size=B))
        loss, metrics = fn("dpo", jit)(*logps, beta=beta, kind=kind, label_smoothing=eps, **lengths)
        ref_in = [x.astype(np.float64) for x in logps]
        if lengths:
            ref_in = [x / lengths["chosen_len_B" if i % 2 == 0 else "rejected_len_B"] for i, x in enumerate(ref_in)]
        ref_loss, ref_metrics = ref_dpo(*ref_in, beta, kind, eps)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
        for name, value in ref_metrics.items():
            np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-5, err_msg=f"{name}, seed {seed}")


@pytest.mark.parametrize(
    "kind, expected",
    [("sigmoid", math.log(2)), ("cdpo", math.log(2)), ("robust", math.log(2)), ("hinge", 1.0), ("ipo", 25.0)],
)
def test_dpo_when_policy_equals_reference(kind, expected):
    logp = jnp.asarray([-3.0, -12.5, -40.0, -7.0, -0.5, -2.0])  # B = 6 as the jitted case, for its compile cache
    ref = jnp.asarray([-5.0, -1.0, -41.0, -7.0, -9.0, -2.5])
    smoothing = 0.0 if kind == "sigmoid" else 0.2
    loss, metrics = dpo_loss(logp, ref, logp, ref, beta=0.1, kind=kind, label_smoothing=smoothing)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert metrics["rewards/margins"] == 0.0 and metrics["rewards/accuracies"] == 0.0
    grad = jax.grad(lambda x: jnp.sum(dpo_loss(x, ref, logp, ref, kind="sigmoid")[0]))(logp)
    np.testing.assert_allclose(grad, -0.1 * 0.5, rtol=1e-6)  # −β·σ(−0) pushes the chosen answer up


def ref_rm(rw, rl, margin, center):
    loss = []
    for i in range(len(rw)):
        m = 0.0 if margin is None else float(margin[i])
        loss.append(-log_sigmoid(float(rw[i]) - float(rl[i]) - m) + center * (float(rw[i]) + float(rl[i])) ** 2)
    both = [float(x) for x in rw] + [float(x) for x in rl]
    n = len(rw)
    metrics = {
        "accuracy": sum(rw[i] > rl[i] for i in range(n)) / n,
        "margin": sum(float(rw[i]) - float(rl[i]) for i in range(n)) / n,
        "reward/min": min(both),
        "reward/mean": sum(both) / len(both),
        "reward/max": max(both),
    }
    return np.array(loss), metrics


@pytest.mark.parametrize("jit, B", [(True, 6), (False, 1)])
def test_reward_model_loss_matches_numpy(jit, B):
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        rw, rl = (rng.normal(size=(2, B)) * 3).astype(np.float32)
        margin = rng.random(B).astype(np.float32) if seed % 3 == 0 else None
        center = 0.01 * (seed % 2)
        loss, metrics = fn("rm", jit)(rw, rl, margin, center_coef=center)
        ref_loss, ref_metrics = ref_rm(rw, rl, margin, center)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert set(metrics) == set(ref_metrics)
        for name, value in ref_metrics.items():
            np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=f"{name}, seed {seed}")


# ----------------------------------------------------------------------------- overlong shaping


def ref_overlong(length, max_len, buffer_len):
    expected = max_len - buffer_len
    if length <= expected:
        return 0.0
    if length <= max_len:
        return (expected - length) / buffer_len
    return -1.0


@pytest.mark.parametrize("jit", [False, True])
def test_overlong_penalty_matches_numpy(jit):
    lengths = np.arange(0, 70)
    penalty_fn = jax.jit(overlong_penalty, static_argnums=(1, 2)) if jit else overlong_penalty
    got = penalty_fn(lengths, 64, 16)
    np.testing.assert_allclose(got, [ref_overlong(int(n), 64, 16) for n in lengths], atol=1e-7)
    assert got[48] == 0.0 and got[56] == -0.5 and got[64] == -1.0 and got[69] == -1.0
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, 64, 0)
