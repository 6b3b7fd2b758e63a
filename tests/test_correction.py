"""The rollout/trainer mismatch and its correction (TIS, MIS) against float64 NumPy, and in the steps."""

import jax
import numpy as np
import pytest

from jaxrl_llm.algorithms.batches import RolloutBatch
from jaxrl_llm.algorithms.common import rollout_scores
from jaxrl_llm.algorithms.grpo import make_grpo_step
from jaxrl_llm.config import GRPOSection
from jaxrl_llm.core.correction import Correction, correction_weights, mismatch_metrics
from jaxrl_llm.core.losses import POLICY_KINDS
from jaxrl_llm.models.transformer import init_params
from jaxrl_llm.sampling import SamplingConfig, generate
from tests.test_grpo import CONFIG, G, fresh_state, rollout

pytestmark = pytest.mark.usefixtures("xla_disk_cache")  # see conftest.py


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def logps(seed, B=5, T=7, spread=0.4):
    """(train logp, rollout logp, mask) with ratios on both sides of 1 and a ragged mask."""
    rng = np.random.default_rng(seed)
    train = -rng.uniform(0.1, 3.0, (B, T))
    rollout_logp = train + rng.normal(0, spread, (B, T))
    mask = np.zeros((B, T), np.int32)
    for b in range(B):
        mask[b, rng.integers(0, 2): rng.integers(3, T + 1)] = 1
    return train.astype(np.float32), rollout_logp.astype(np.float32), mask


def numpy_weights(train, rollout_logp, mask, c: Correction):
    """TIS weights and MIS keep-mask in float64, token by token."""
    l = (train.astype(np.float64) - rollout_logp) * mask
    level_log = {
        "token": l,
        "sequence": np.repeat(l.sum(1, keepdims=True), l.shape[1], 1),
        "geometric": np.repeat(l.sum(1, keepdims=True) / np.maximum(mask.sum(1, keepdims=True), 1), l.shape[1], 1),
    }
    weights = np.minimum(np.exp(level_log[c.is_level]), c.is_cap) if c.is_level != "none" else np.ones(l.shape)
    keep = mask.astype(np.float64)
    if c.mask_level != "none":
        ratio = np.exp(level_log[c.mask_level])
        keep = keep * ((ratio >= c.mask_low) & (ratio <= c.mask_high))
    return weights * mask, keep


@pytest.mark.parametrize("is_level,mask_level", [
    ("token", "none"), ("sequence", "none"), ("none", "token"), ("none", "sequence"), ("none", "geometric"),
    ("token", "geometric"),
])
def test_weights_and_masks_match_numpy(is_level, mask_level):
    train, rollout_logp, mask = logps(0)
    c = Correction(is_level=is_level, is_cap=1.5, mask_level=mask_level, mask_low=0.7, mask_high=1.3)
    weights, keep = correction_weights(train, rollout_logp, mask, c)
    want_weights, want_keep = numpy_weights(train, rollout_logp, mask, c)
    np.testing.assert_allclose(np.asarray(weights), want_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(keep), want_keep)
    assert 0 < want_keep.sum() < mask.sum() or mask_level == "none"  # the case drops some, not all
    assert np.all(np.asarray(weights)[mask > 0] <= 1.5)


def test_mismatch_metrics_match_numpy():
    train, rollout_logp, mask = logps(1)
    got = {k: float(v) for k, v in mismatch_metrics(train, rollout_logp, mask, 0.8, 1.25).items()}
    valid = mask > 0
    l = train.astype(np.float64)[valid] - rollout_logp[valid]
    ratio = np.exp(l)
    want = {
        "mismatch/abs_logp_diff": np.abs(l).mean(),
        "mismatch/kl": (ratio - 1 - l).mean(),
        "mismatch/ratio/min": ratio.min(),
        "mismatch/ratio/max": ratio.max(),
        "mismatch/outside_fraction": ((ratio < 0.8) | (ratio > 1.25)).mean(),
    }
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, err_msg=name)
    assert got["mismatch/kl"] > 0


def test_equal_log_probs_read_zero_and_change_nothing():
    train, _, mask = logps(2)
    metrics = mismatch_metrics(train, train, mask)
    assert {k: float(v) for k, v in metrics.items()} == {
        "mismatch/abs_logp_diff": 0.0, "mismatch/kl": 0.0, "mismatch/ratio/min": 1.0, "mismatch/ratio/max": 1.0,
        "mismatch/outside_fraction": 0.0,
    }
    c = Correction(is_level="sequence", mask_level="geometric", mask_low=1.0, mask_high=1.0)
    weights, keep = correction_weights(train, train, mask, c)
    np.testing.assert_array_equal(np.asarray(weights), mask)
    np.testing.assert_array_equal(np.asarray(keep), mask)


def sampled_batch(params, temperature=1.0):
    """A rollout of the tiny model through `generate`: the batch carries the sampler's log-probs."""
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    sampling = SamplingConfig(max_new_tokens=6, temperature=temperature, n=G)
    out = generate(params, prompts, jax.random.key(3), sampling, CONFIG)
    rewards = np.random.default_rng(0).normal(size=len(prompts) * G).astype(np.float32)
    return RolloutBatch.from_completions(out, rewards)


@pytest.mark.parametrize("reuse", [True, False])
def test_same_weights_and_precision_read_zero_in_the_step(params, reuse):
    # The sampler decodes token by token through a KV cache, the trainer scores the whole row at
    # once: the same math in another summation order, so the two agree to fp32 rounding.
    cfg = GRPOSection(group_size=G, kl_coef=0.0, num_iterations=1 if reuse else 2)
    batch = sampled_batch(params, temperature=0.7)
    _, metrics = jax.jit(make_grpo_step(CONFIG, cfg))(fresh_state(params), batch, jax.random.key(0))
    assert float(metrics["mismatch/abs_logp_diff"]) < 1e-5
    assert abs(float(metrics["mismatch/kl"])) < 1e-6
    assert float(metrics["mismatch/outside_fraction"]) == 0.0
    assert 1 - 1e-5 < float(metrics["mismatch/ratio/min"]) <= float(metrics["mismatch/ratio/max"]) < 1 + 1e-5


# Every kind with one update (the trainer's log-probs reused); one kind with μ = 2, where the old
# log-probs come from a scoring pass first (the path MIS takes).
@pytest.mark.parametrize("kind,reuse", [(kind, True) for kind in POLICY_KINDS] + [("ppo", False)])
def test_tis_and_mis_compose_with_every_policy_loss(params, kind, reuse):
    # The rollout's log-probs one log(1.5) below the trainer's: every token's ratio is 1.5, so token
    # TIS scales the policy-gradient loss by 1.5 (by the cap 1.2 when capped), token MIS with
    # mask_high 1.4 drops every token, and with mask_high 2 keeps the loss as it was.
    batch = rollout(4)
    cfg = GRPOSection(group_size=G, kl_coef=0.0, loss=kind, num_iterations=1 if reuse else 2)
    state = fresh_state(params)
    _, plain = jax.jit(make_grpo_step(CONFIG, cfg, max_completion_len=6))(state, batch, jax.random.key(0))
    old_logp = np.asarray(rollout_scores(params, CONFIG, batch)[1])
    shifted = batch.replace(rollout_logp_RxT=(old_logp - np.log(1.5)) * batch.completion_mask_RxT)

    def pg_loss(correction):
        step = jax.jit(make_grpo_step(CONFIG, cfg, max_completion_len=6, correction=correction))
        return step(state, shifted, jax.random.key(0))[1]

    # With μ = 2 the metric averages both updates; Adam takes the same steps from 1.5× the gradient.
    scaled = pg_loss(Correction(is_level="token", is_cap=5.0))
    np.testing.assert_allclose(float(scaled["pg_loss"]), 1.5 * float(plain["pg_loss"]), rtol=2e-4, atol=1e-6)
    capped = pg_loss(Correction(is_level="token", is_cap=1.2))
    np.testing.assert_allclose(float(capped["pg_loss"]), 1.2 * float(plain["pg_loss"]), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(float(capped["correction/is_weight_mean"]), 1.2, rtol=1e-5)
    np.testing.assert_allclose(float(capped["mismatch/ratio/min"]), 1.5, rtol=1e-4)
    if not reuse:  # MIS needs the trainer's log-probs before the normaliser (no reuse path)
        dropped = pg_loss(Correction(mask_level="token", mask_high=1.4))
        assert float(dropped["pg_loss"]) == 0.0 and float(dropped["correction/masked_fraction"]) == 1.0
        kept = pg_loss(Correction(mask_level="token", mask_high=2.0))
        np.testing.assert_allclose(float(kept["pg_loss"]), float(plain["pg_loss"]), rtol=1e-5, atol=1e-7)

