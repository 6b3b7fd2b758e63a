"""GRPO step: exact loss against a NumPy reference, KL placement, accumulation, every loss kind, learning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_llm.algorithms import common
from jaxrl_llm.algorithms.batches import RolloutBatch
from jaxrl_llm.algorithms.grpo import GRPOState, make_grpo_step
from jaxrl_llm.config import GRPOSection
from jaxrl_llm.models.transformer import ModelConfig, Transformer, init_params, positions_from_mask
from jaxrl_llm.sampling import SamplingConfig, generate
from jaxrl_llm.state import TrainState, make_optimizer

pytestmark = pytest.mark.usefixtures("xla_disk_cache")  # see conftest.py

CONFIG = ModelConfig(
    vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
)
G = 4


def rollout(seed, prompts=2, P=4, N=6):
    """Rows of left-padded prompts + right-padded completions, G per prompt, with rewards."""
    rng = np.random.default_rng(seed)
    R = prompts * G
    tokens = rng.integers(2, CONFIG.vocab_size, (R, P + N)).astype(np.int32)
    mask = np.zeros((R, P + N), np.int32)
    completion = np.zeros_like(mask)
    for r in range(R):
        p, n = rng.integers(1, P + 1), rng.integers(1, N + 1)
        mask[r, P - p:P + n] = 1
        completion[r, P:P + n] = 1
    return RolloutBatch(
        tokens_RxT=tokens * mask, mask_RxT=mask, completion_mask_RxT=completion, prompt_mask_RxP=mask[:, :P],
        rewards_R=rng.normal(size=R).astype(np.float32), truncated_R=completion.sum(1) == N,
    )


def ref_logp(params, batch: RolloutBatch, temperature=1.0):
    """log π(token_t | <t) at `temperature` from full logits, in float64 numpy."""
    tokens, mask = batch.tokens_RxT, batch.mask_RxT
    logits, _ = Transformer(CONFIG).apply({"params": params}, tokens, positions_from_mask(mask), mask)
    z = np.asarray(logits, np.float64) / temperature
    out = np.zeros(tokens.shape)
    for r in range(out.shape[0]):
        for t in range(1, out.shape[1]):
            zt = z[r, t - 1]
            out[r, t] = zt[tokens[r, t]] - zt.max() - np.log(np.exp(zt - zt.max()).sum())
    return out


def numpy_group_adv(rewards, eps=1e-4):
    adv = np.zeros_like(rewards, np.float64)
    for start in range(0, len(rewards), G):
        group = rewards[start:start + G].astype(np.float64)
        adv[start:start + G] = (group - group.mean()) / (group.std(ddof=1) + eps)
    return adv


def numpy_aggregate(loss, mask, mode, max_len):
    if mode == "token_mean":
        return (loss * mask).sum() / mask.sum()
    if mode == "seq_mean_token_mean":
        return np.mean([(loss[r] * mask[r]).sum() / mask[r].sum() for r in range(len(mask))])
    return (loss * mask).sum() / (len(mask) * max_len)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def fresh_state(params, ref_params=None, lr=1e-2, tx=None):
    tx = tx or make_optimizer(lr, 100, grad_clip=None)
    return GRPOState(policy=TrainState.create(params, tx), ref_params=ref_params)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_on_policy_loss_is_minus_aggregated_advantage(params, aggregation):
    cfg = GRPOSection(group_size=G, kl_coef=0.0, aggregation=aggregation)
    batch = rollout(0)
    step = jax.jit(make_grpo_step(CONFIG, cfg, max_completion_len=6))
    _, metrics = step(fresh_state(params), batch, jax.random.key(0))
    adv = numpy_group_adv(batch.rewards_R)
    want = numpy_aggregate(-adv[:, None] * np.ones_like(batch.mask_RxT), batch.completion_mask_RxT, aggregation, 6)
    np.testing.assert_allclose(float(metrics["pg_loss"]), want, rtol=1e-4, atol=1e-6)
    assert float(metrics["clipfrac"]) == 0.0
    np.testing.assert_allclose(float(metrics["ratio/mean"]), 1.0, atol=1e-6)


def numpy_rloo_adv(rewards):
    adv = np.zeros_like(rewards, np.float64)
    for start in range(0, len(rewards), G):
        group = rewards[start:start + G].astype(np.float64)
        adv[start:start + G] = [group[i] - np.delete(group, i).mean() for i in range(G)]
    return adv


def numpy_reinforce_pp_baseline_adv(rewards, mask):
    """verl's reinforce_plus_plus_baseline: r − group mean on every valid token, whitened over them."""
    centered = np.concatenate([g - g.mean() for g in rewards.astype(np.float64).reshape(-1, G)])
    values = np.repeat(centered[:, None], mask.shape[1], axis=1)[mask > 0]
    mean, var = values.mean(), values.var(ddof=1)
    return (centered[:, None] - mean) / np.sqrt(var + 1e-8) * mask


@pytest.mark.parametrize("advantage", ["rloo", "reinforce_plus_plus_baseline"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_advantage_estimators_match_numpy(params, advantage, aggregation):
    cfg = GRPOSection(group_size=G, kl_coef=0.0, aggregation=aggregation, advantage=advantage)
    batch = rollout(8)
    _, metrics = jax.jit(make_grpo_step(CONFIG, cfg))(fresh_state(params), batch, jax.random.key(0))
    mask = batch.completion_mask_RxT
    if advantage == "rloo":
        adv = numpy_rloo_adv(batch.rewards_R)[:, None] * np.ones_like(mask)
    else:
        adv = numpy_reinforce_pp_baseline_adv(batch.rewards_R, mask)
    np.testing.assert_allclose(float(metrics["pg_loss"]), numpy_aggregate(-adv, mask, aggregation, None), rtol=1e-4,
                               atol=1e-6)
    valid = adv[mask > 0]
    np.testing.assert_allclose([metrics["advantages/min"], metrics["advantages/max"]], [valid.min(), valid.max()],
                               rtol=1e-5)


def test_the_step_scores_at_the_temperature_the_rollout_was_sampled_at(params):
    """The rollout carries the sampler's temperature: the step's log-probs at it equal the sampler's,
    and its k3 KL is that of the T-scaled policies."""
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.7, n=G, stop_token_ids=(1,), pad_token_id=0)
    out = generate(params, [[2, 3, 4], [5, 6]], jax.random.key(3), sampling, CONFIG)
    batch = RolloutBatch.from_completions(out, np.arange(2 * G, dtype=np.float32))
    assert out.logp_temperature == batch.temperature == 0.7
    _, logp, _ = common.rollout_scores(params, CONFIG, batch)
    P = batch.prompt_width
    np.testing.assert_allclose(np.asarray(logp)[:, P:] * np.asarray(out.mask_RxN), out.logp_RxN, atol=1e-5)
    ref_params = jax.tree.map(lambda p: p * 0.9, params)
    cfg = GRPOSection(group_size=G, kl_coef=0.1, kl_estimator="k3", aggregation="token_mean")
    _, metrics = jax.jit(make_grpo_step(CONFIG, cfg))(fresh_state(params, ref_params), batch, jax.random.key(0))
    host = jax.device_get(batch)
    l = ref_logp(params, host, 0.7) - ref_logp(ref_params, host, 0.7)
    k3, m = np.exp(-l) - 1 + l, np.asarray(host.completion_mask_RxT)
    assert float(metrics["kl/token"]) > 0
    np.testing.assert_allclose(float(metrics["kl/token"]), (k3 * m).sum() / m.sum(), rtol=1e-3)


def test_one_update_per_rollout_follows_the_reinforce_gradient(params):
    """μ = 1 with one minibatch reuses the policy's own detached log-probs as the old ones
    (no separate scoring pass); the update must still be -∇ Σ adv·logp / Σ mask."""
    cfg = GRPOSection(group_size=G, kl_coef=0.0, aggregation="token_mean")
    batch = rollout(6)
    state, _ = jax.jit(make_grpo_step(CONFIG, cfg))(fresh_state(params, tx=optax.sgd(1.0)), batch, jax.random.key(0))
    adv = jnp.asarray(numpy_group_adv(batch.rewards_R), jnp.float32)
    cm = jnp.asarray(batch.completion_mask_RxT, jnp.float32)
    tokens, mask = batch.tokens_RxT, batch.mask_RxT

    def reinforce(p):
        logits, _ = Transformer(CONFIG).apply({"params": p}, tokens, positions_from_mask(mask), mask)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
        return -jnp.sum(adv[:, None] * logp * cm[:, 1:]) / cm.sum()

    want = jax.tree.map(lambda p, g: p - g, params, jax.grad(reinforce)(params))
    for got, expected in zip(jax.tree.leaves(state.policy.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, atol=2e-6)


def test_kl_in_reward_is_subtracted_before_the_group_baseline(params):
    ref_params = jax.tree.map(lambda p: p * 0.9, params)
    cfg = GRPOSection(group_size=G, kl_coef=0.5, kl_estimator="k1", kl_placement="reward", aggregation="token_mean")
    batch = rollout(1)
    _, metrics = jax.jit(make_grpo_step(CONFIG, cfg))(fresh_state(params, ref_params), batch, jax.random.key(0))
    seq_kl = ((ref_logp(params, batch) - ref_logp(ref_params, batch)) * batch.completion_mask_RxT).sum(1)
    np.testing.assert_allclose(float(metrics["kl"]), seq_kl.mean(), rtol=1e-4)
    adv = numpy_group_adv(batch.rewards_R - 0.5 * seq_kl)
    want = numpy_aggregate(-adv[:, None] * np.ones_like(batch.mask_RxT), batch.completion_mask_RxT, "token_mean", None)
    np.testing.assert_allclose(float(metrics["pg_loss"]), want, rtol=1e-4, atol=1e-6)


def test_k3_kl_in_loss_matches_numpy(params):
    ref_params = jax.tree.map(lambda p: p * 0.9, params)
    cfg = GRPOSection(group_size=G, kl_coef=0.1, kl_estimator="k3", kl_placement="loss", aggregation="token_mean")
    batch = rollout(2)
    _, metrics = jax.jit(make_grpo_step(CONFIG, cfg))(fresh_state(params, ref_params), batch, jax.random.key(0))
    l = ref_logp(params, batch) - ref_logp(ref_params, batch)
    k3 = np.exp(-l) - 1 + l
    m = batch.completion_mask_RxT
    np.testing.assert_allclose(float(metrics["kl/token"]), (k3 * m).sum() / m.sum(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["kl"]), (k3 * m).sum(1).mean(), rtol=1e-4)
    want = float(metrics["pg_loss"]) + 0.1 * (k3 * m).sum() / m.sum()
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-4)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_microbatches_equal_one_big_batch(params, aggregation):
    cfg = GRPOSection(group_size=G, kl_coef=0.1, kl_estimator="k3", aggregation=aggregation, num_iterations=2)
    ref_params = jax.tree.map(lambda p: p * 0.95, params)
    batch = rollout(3)
    outs = [
        jax.jit(make_grpo_step(CONFIG, cfg, num_microbatches=m))(
            fresh_state(params, ref_params, tx=optax.sgd(0.5)), batch, jax.random.key(0)
        )
        for m in (1, 2)
    ]
    for name in ("loss", "pg_loss", "ratio/min", "ratio/max"):  # metrics too, not just the update
        np.testing.assert_allclose(outs[0][1][name], outs[1][1][name], rtol=1e-5, atol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(outs[0][0].policy.params), jax.tree.leaves(outs[1][0].policy.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "changes",
    [
        dict(loss="ppo", eps_high=0.28, dual_clip=3.0, num_iterations=2, num_minibatches=2),
        dict(loss="gspo", aggregation="seq_mean_token_mean", num_iterations=2),
        dict(loss="gspo_token", num_iterations=2),
        dict(loss="sapo", num_iterations=2),
        dict(loss="cispo", num_iterations=2),
        dict(adv_scaling="none", aggregation="seq_mean_token_sum_norm", overlong_shaping=True, overlong_buffer=2,
             overlong_filtering=True),
        dict(kl_estimator="full", kl_placement="loss"),
        dict(kl_estimator="full", kl_placement="reward", std="population"),
    ],
)
def test_every_switch_runs_and_updates(params, changes):
    cfg = dataclasses.replace(GRPOSection(group_size=G, kl_coef=0.05), **changes)
    ref_params = jax.tree.map(lambda p: p * 0.95, params)
    state, metrics = jax.jit(make_grpo_step(CONFIG, cfg, max_completion_len=6))(
        fresh_state(params, ref_params), rollout(4), jax.random.key(0)
    )
    assert all(np.isfinite(float(v)) for v in metrics.values())
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, state.policy.params)
    assert all(jax.tree.leaves(changed))
    frozen = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), ref_params, state.ref_params)
    assert all(jax.tree.leaves(frozen))
    if changes.get("num_iterations", 1) > 1 and changes["loss"] != "sapo":
        assert float(metrics["ratio/max"]) > 1.0 or float(metrics["ratio/min"]) < 1.0


def test_scoring_only_the_completion_changes_nothing(params):
    """A rollout's prompt width makes the step skip the LM head on prompt positions (and the
    full KL there); every metric and update equals scoring all positions."""
    ref_params = jax.tree.map(lambda p: p * 0.9, params)
    cfg = GRPOSection(group_size=G, kl_coef=0.1, kl_estimator="full", kl_placement="loss", num_iterations=2)
    step = jax.jit(make_grpo_step(CONFIG, cfg))
    batch = rollout(7)
    everywhere = batch.replace(prompt_mask_RxP=batch.prompt_mask_RxP[:, :1])  # scored from position 1
    state, metrics = step(fresh_state(params, ref_params, tx=optax.sgd(1.0)), batch, jax.random.key(0))
    want_state, want = step(fresh_state(params, ref_params, tx=optax.sgd(1.0)), everywhere, jax.random.key(0))
    for name in want:
        np.testing.assert_allclose(metrics[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for got, expected in zip(jax.tree.leaves(state.policy.params), jax.tree.leaves(want_state.policy.params)):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    P = batch.prompt_width
    hidden = common.final_hidden(params, CONFIG, batch.tokens_RxT, batch.mask_RxT)
    logp = common.hidden_logprobs(params, CONFIG, hidden, batch.tokens_RxT, first=P)
    assert not np.any(np.asarray(logp)[:, :P])
    np.testing.assert_allclose(logp[:, P:], ref_logp(params, batch)[:, P:], atol=1e-5)


def test_full_kl_is_zero_against_itself(params):
    cfg = GRPOSection(group_size=G, kl_coef=0.1, kl_estimator="full", kl_placement="loss")
    _, metrics = jax.jit(make_grpo_step(CONFIG, cfg))(fresh_state(params, params), rollout(5), jax.random.key(0))
    assert abs(float(metrics["kl"])) < 1e-6


def test_grpo_learns_a_token_preference(params):
    """Reward = share of token 5 in the answer; a few GRPO steps push it up clearly."""
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, n=8, stop_token_ids=(1,), pad_token_id=0)
    cfg = GRPOSection(group_size=8, kl_coef=0.0, eps_high=0.28, aggregation="token_mean", num_minibatches=2,
                      num_iterations=2)
    state = fresh_state(params, lr=3e-3)
    step = jax.jit(make_grpo_step(CONFIG, cfg))
    prompts = [[2, 3, 4], [5, 6], [7, 8, 9, 10]] * 2
    history = []
    for i in range(12):
        out = generate(state.policy.params, prompts, jax.random.key(100 + i), sampling, CONFIG)
        rewards = ((np.asarray(out.tokens_RxN) == 5) * np.asarray(out.mask_RxN)).sum(1) / 8.0
        state, metrics = step(state, RolloutBatch.from_completions(out, rewards), jax.random.key(i))
        history.append(float(metrics["reward/mean"]))
    assert history[0] < 0.2 and np.mean(history[-3:]) > 0.6, history
