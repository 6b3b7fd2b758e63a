"""PPO step: rewards, GAE and returns against NumPy, value and policy updates, adaptive β, learning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_grpo import CONFIG, ref_logp, rollout

from jaxrl_llm.algorithms import common
from jaxrl_llm.algorithms.batches import RolloutBatch
from jaxrl_llm.algorithms.ppo import PPOState, make_ppo_step
from jaxrl_llm.config import PPOSection
from jaxrl_llm.models.transformer import init_params
from jaxrl_llm.sampling import SamplingConfig, generate
from jaxrl_llm.state import TrainState, make_optimizer

pytestmark = pytest.mark.usefixtures("xla_disk_cache")  # see conftest.py


def make_state(params, value_params, ref_params, reward_params, kl_coef=0.1, lr=1e-2):
    actor = TrainState.create(params, make_optimizer(lr, 100))
    critic = TrainState.create(value_params, make_optimizer(lr, 100))
    return PPOState.create(actor, critic, ref_params, reward_params, kl_coef)


@pytest.fixture(scope="module")
def models():
    params = init_params(CONFIG, jax.random.key(0))
    value_params = init_params(CONFIG, jax.random.key(1), scalar_head=True)
    reward_params = init_params(CONFIG, jax.random.key(2), scalar_head=True)
    return params, value_params, jax.tree.map(lambda p: p * 0.9, params), reward_params


def numpy_gae(rewards, values, mask, gamma, lam):
    adv = np.zeros_like(rewards)
    for r in range(len(rewards)):
        valid = np.flatnonzero(mask[r])
        next_v = next_a = 0.0
        for t in valid[::-1]:
            delta = rewards[r, t] + gamma * next_v - values[r, t]
            next_a = delta + gamma * lam * next_a
            next_v = values[r, t]
            adv[r, t] = next_a
    return adv, (adv + values) * mask


def test_rollout_rewards_gae_and_returns_match_numpy(models):
    params, value_params, ref_params, reward_params = models
    cfg = PPOSection(kl_estimator="k1", kl_coef=0.1, gamma=0.9, lam=0.8, epochs=1, reward_clip=None,
                     missing_stop_penalty=0.5)
    batch = rollout(0)
    _, metrics = jax.jit(make_ppo_step(CONFIG, cfg))(
        make_state(params, value_params, ref_params, reward_params), batch, jax.random.key(0)
    )
    m = batch.completion_mask_RxT.astype(np.float64)
    kl = (ref_logp(params, batch) - ref_logp(ref_params, batch)) * m
    values_all, score = common.scalar_scores(value_params, CONFIG, batch.tokens_RxT, batch.mask_RxT)
    _, score = common.scalar_scores(reward_params, CONFIG, batch.tokens_RxT, batch.mask_RxT)
    values = np.zeros(m.shape)
    values[:, 1:] = np.asarray(values_all, np.float64)[:, :-1]
    # The reward model's score plus the batch's host rewards (an environment's; zeros for single answers).
    score = np.asarray(score, np.float64) + np.asarray(batch.rewards_R, np.float64) - 0.5 * batch.truncated_R
    rewards = -0.1 * kl
    for r in range(len(m)):
        rewards[r, np.flatnonzero(m[r])[-1]] += score[r]
    adv, returns = numpy_gae(rewards, values * m, m, 0.9, 0.8)
    np.testing.assert_allclose(float(metrics["kl"]), kl.sum(1).mean(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["returns/mean"]), (returns * m).sum() / m.sum(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["reward/mean"]), rewards.sum(1).mean(), rtol=1e-4, atol=1e-6)
    ev = 1 - np.var((returns - values)[m > 0]) / np.var(returns[m > 0])
    np.testing.assert_allclose(float(metrics["explained_variance"]), ev, rtol=1e-3, atol=1e-5)
    # One epoch, one minibatch: the update starts on-policy, so nothing is clipped.
    assert float(metrics["clipfrac"]) == 0.0


def test_token_rewards_join_the_per_token_rewards(models):
    """An environment's per-turn rewards (`token_rewards_RxT`) add to r_t where they sit, before GAE."""
    params, value_params, ref_params, reward_params = models
    cfg = PPOSection(kl_estimator="k1", kl_coef=0.1, gamma=0.9, lam=0.8, epochs=1, reward_clip=None)
    batch = rollout(1)
    m = batch.completion_mask_RxT.astype(np.float64)
    token_rewards = np.zeros(m.shape)
    for r in range(len(m)):  # a reward at the first and at the middle completion token of each row
        valid = np.flatnonzero(m[r])
        token_rewards[r, valid[0]], token_rewards[r, valid[len(valid) // 2]] = 0.5, -1.0 + r
    step = jax.jit(make_ppo_step(CONFIG, cfg))
    state = make_state(params, value_params, ref_params, reward_params)
    _, plain = step(state, batch, jax.random.key(0))
    state = make_state(params, value_params, ref_params, reward_params)
    _, turned = step(state, batch.replace(token_rewards_RxT=jnp.asarray(token_rewards, jnp.float32)), jax.random.key(0))
    np.testing.assert_allclose(float(turned["reward/mean"]) - float(plain["reward/mean"]),
                               token_rewards.sum(1).mean(), rtol=1e-5, atol=1e-6)
    kl = (ref_logp(params, batch) - ref_logp(ref_params, batch)) * m
    values_all, _ = common.scalar_scores(value_params, CONFIG, batch.tokens_RxT, batch.mask_RxT)
    _, score = common.scalar_scores(reward_params, CONFIG, batch.tokens_RxT, batch.mask_RxT)
    values = np.zeros(m.shape)
    values[:, 1:] = np.asarray(values_all, np.float64)[:, :-1]
    rewards = -0.1 * kl + token_rewards
    for r in range(len(m)):
        rewards[r, np.flatnonzero(m[r])[-1]] += float(score[r]) + float(batch.rewards_R[r])
    _, returns = numpy_gae(rewards, values * m, m, 0.9, 0.8)
    np.testing.assert_allclose(float(turned["returns/mean"]), (returns * m).sum() / m.sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("changes", [
    dict(kl_estimator="full", epochs=2, num_minibatches=2, entropy_coef=0.01),
    dict(kl_estimator="k3", value_clip=None, whiten_advantages=False),
])
def test_actor_and_critic_both_update(models, changes):
    params, value_params, ref_params, reward_params = models
    cfg = dataclasses.replace(PPOSection(), **changes)
    state, metrics = jax.jit(make_ppo_step(CONFIG, cfg))(
        make_state(params, value_params, ref_params, reward_params), rollout(1), jax.random.key(0)
    )
    assert all(np.isfinite(float(v)) for v in metrics.values())
    for before, after in ((params, state.actor.params), (value_params, state.critic.params)):
        changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
        assert all(jax.tree.leaves(changed))
    np.testing.assert_array_equal(state.ref_params["embed"]["embedding"], ref_params["embed"]["embedding"])


def test_adaptive_kl_raises_beta_when_kl_is_over_target(models):
    params, value_params, ref_params, reward_params = models
    cfg = PPOSection(kl_estimator="k3", adaptive_kl=True, kl_target=1e-6, kl_horizon=100, epochs=1)
    step = jax.jit(make_ppo_step(CONFIG, cfg))
    state = make_state(params, value_params, ref_params, reward_params, kl_coef=0.1)
    state, metrics = step(state, rollout(2), jax.random.key(0))
    np.testing.assert_allclose(float(state.kl_coef), 0.1 * (1 + 0.2 * 8 / 100), rtol=1e-6)


def test_ppo_learns_from_host_rewards(models):
    """Reward = share of token 5 in the answer (no RM): PPO pushes it up and the critic learns it."""
    params, value_params, _, _ = models
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, n=4, stop_token_ids=(1,), pad_token_id=0)
    cfg = PPOSection(kl_estimator="k1", kl_coef=0.01, epochs=2, num_minibatches=2, vf_coef=1.0)
    state = make_state(params, value_params, params, None, kl_coef=0.01, lr=3e-3)
    step = jax.jit(make_ppo_step(CONFIG, cfg))
    prompts = [[2, 3, 4], [5, 6], [7, 8, 9, 10], [11, 12]] * 2
    history = []
    for i in range(12):
        out = generate(state.actor.params, prompts, jax.random.key(100 + i), sampling, CONFIG)
        rewards = ((np.asarray(out.tokens_RxN) == 5) * np.asarray(out.mask_RxN)).sum(1) / 8.0
        state, metrics = step(state, RolloutBatch.from_completions(out, rewards), jax.random.key(i))
        history.append((float(metrics["score/mean"]), float(metrics["vf_loss"])))
    scores, value_losses = zip(*history)
    assert scores[0] < 0.2 and np.mean(scores[-3:]) > 0.5, scores
    assert np.mean(value_losses[-3:]) < 0.5 * np.mean(value_losses[:3]), value_losses


def test_a_fixed_beta_is_the_configs_and_an_adaptive_one_the_states(models):
    """A resumed PPO run takes a changed ppo.kl_coef when β is fixed; the adaptive controller's β
    continues from the state (where a resume restores it)."""
    state = make_state(*models, kl_coef=0.05)
    for adaptive, want in ((False, 0.2), (True, 0.05)):
        cfg = PPOSection(kl_coef=0.2, adaptive_kl=adaptive, kl_estimator="k1", epochs=1)
        step = jax.jit(make_ppo_step(CONFIG, cfg))
        _, metrics = step(state, rollout(0), jax.random.key(0))
        assert float(metrics["kl_coef"]) == pytest.approx(want), adaptive
