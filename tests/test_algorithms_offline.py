"""SFT, RM and DPO steps on a tiny model: exact losses, accumulation = one big batch, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algorithms import common
from jaxrl_llm.algorithms.batches import PairBatch, SequenceBatch
from jaxrl_llm.algorithms.dpo import DPOState, make_dpo_step
from jaxrl_llm.algorithms.rm import make_rm_eval, make_rm_step
from jaxrl_llm.algorithms.sft import make_sft_step
from jaxrl_llm.config import DPOSection
from jaxrl_llm.models.transformer import ModelConfig, Transformer, init_params, positions_from_mask
from jaxrl_llm.state import TrainState, make_optimizer

pytestmark = pytest.mark.usefixtures("xla_disk_cache")  # see conftest.py

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
)


def sequence_batch(seed, B=4, P=5, C=6, vocab=64):
    """Left-padded prompts of random lengths followed by right-padded completions."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (B, P + C)).astype(np.int32)
    mask = np.zeros((B, P + C), np.int32)
    completion = np.zeros_like(mask)
    for b in range(B):
        p, c = rng.integers(1, P + 1), rng.integers(1, C + 1)
        mask[b, P - p:P + c] = 1
        completion[b, P:P + c] = 1
    tokens = tokens * mask
    return SequenceBatch(tokens, mask, completion)


def pair_batch(seed, B=4):
    """Pairs sharing their prompt (the first 5 slots)."""
    chosen, rejected = sequence_batch(seed, B), sequence_batch(seed + 100, B)
    rejected.tokens_BxT[:, :5] = chosen.tokens_BxT[:, :5]
    rejected.mask_BxT[:, :5] = chosen.mask_BxT[:, :5]
    return PairBatch(chosen, rejected)


def reference_logp(params, batch: SequenceBatch):
    """log π(token_t | <t) from full logits in float64 numpy."""
    tokens, mask = batch.tokens_BxT, batch.mask_BxT
    logits, _ = Transformer(CONFIG).apply({"params": params}, tokens, positions_from_mask(mask), mask)
    logits = np.asarray(logits, np.float64)
    out = np.zeros(tokens.shape)
    for b in range(out.shape[0]):
        for t in range(1, out.shape[1]):
            z = logits[b, t - 1]
            out[b, t] = z[tokens[b, t]] - np.log(np.exp(z - z.max()).sum()) - z.max()
    return out


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def test_score_tokens_matches_full_logits(params):
    batch = sequence_batch(1)
    logp, ent = common.score_tokens(params, CONFIG, batch.tokens_BxT, batch.mask_BxT, with_entropy=True, chunk_size=4)
    mask = batch.mask_BxT
    np.testing.assert_allclose(np.asarray(logp) * mask, reference_logp(params, batch) * mask, atol=1e-5)
    assert np.all(np.asarray(ent)[:, 1:] > 0)


def test_sft_loss_is_masked_mean_nll_and_decreases(params):
    batch = sequence_batch(2)
    tx = make_optimizer(1e-2, total_steps=20)
    step = jax.jit(make_sft_step(CONFIG))
    state = TrainState.create(params, tx)
    state, metrics = step(state, batch)
    completion = batch.completion_mask_BxT
    want = -(reference_logp(params, batch) * completion).sum() / completion.sum()
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    first = float(metrics["loss"])
    for _ in range(15):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.5 * first
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, state.params)
    assert all(jax.tree.leaves(changed))


def test_accumulated_metrics_equal_one_big_batch():
    """Loss parts (`*_loss`, normalised by the whole batch) add up; `*/min` and `*/max` stay extremes."""
    x_BxT = jnp.arange(8.0).reshape(4, 2)
    normalizer = x_BxT.size

    def loss_fn(w, mb, rng):
        part_loss = jnp.sum(w * mb["x"]) / normalizer
        x = mb["x"]
        return part_loss, {"pg_loss": part_loss, "x/min": x.min(), "x/max": x.max(), "x/mean": x.mean()}

    for m in (1, 2, 4):
        loss, grad, metrics = common.accumulate_gradients(loss_fn, jnp.float32(1.0), {"x": x_BxT}, m)
        np.testing.assert_allclose([loss, grad], [3.5, 3.5], rtol=1e-6)
        np.testing.assert_allclose(
            [metrics[k] for k in ("pg_loss", "x/min", "x/max", "x/mean")], [3.5, 0.0, 7.0, 3.5], rtol=1e-6
        )


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_sft_microbatches_equal_one_big_batch(params, aggregation):
    batch = sequence_batch(3, B=4)
    tx = make_optimizer(1e-3, total_steps=10, grad_clip=None)
    results = []
    for m in (1, 2):
        state, metrics = jax.jit(make_sft_step(CONFIG, num_microbatches=m, aggregation=aggregation))(
            TrainState.create(params, tx), batch
        )
        results.append((metrics, state.params))
    np.testing.assert_allclose(results[0][0]["loss"], results[1][0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(results[0][0]["grad_norm"], results[1][0]["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_dpo_starts_at_log2_matches_reference_and_learns(params):
    batch = pair_batch(4)
    tx = make_optimizer(1e-2, total_steps=20)
    state = DPOState(policy=TrainState.create(params, tx), ref_params=params)
    step = jax.jit(make_dpo_step(CONFIG, DPOSection(beta=0.5)))
    state, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), np.log(2.0), rtol=1e-6)
    for _ in range(10):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.5 and float(metrics["rewards/accuracies"]) == 1.0
    assert float(metrics["rewards/margins"]) > 1.0
    frozen = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, state.ref_params)
    assert all(jax.tree.leaves(frozen))

    two = jax.jit(make_dpo_step(CONFIG, DPOSection(beta=0.5), num_microbatches=2))
    fresh = DPOState(policy=TrainState.create(state.policy.params, tx), ref_params=params)
    (_, m1), (_, m2) = step(fresh, batch), two(fresh, batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["rewards/margins"], m2["rewards/margins"], rtol=1e-4)


def test_dpo_loss_equals_numpy_reference(params):
    batch = pair_batch(5)
    policy = jax.tree.map(lambda p: p * 1.1, params)
    state = DPOState(policy=TrainState.create(policy, make_optimizer(0.0, 1)), ref_params=params)
    _, metrics = make_dpo_step(CONFIG, DPOSection(beta=0.3))(state, batch)

    def summed(p, answer):
        seq = getattr(batch, answer)
        return (reference_logp(p, seq) * seq.completion_mask_BxT).sum(1)

    chosen = summed(policy, "chosen") - summed(params, "chosen")
    h = 0.3 * (chosen - (summed(policy, "rejected") - summed(params, "rejected")))
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(np.log1p(np.exp(-h))), rtol=1e-4)


def test_rm_learns_a_token_preference():
    config = CONFIG.replace(tie_word_embeddings=False)
    params = init_params(config, jax.random.key(1), scalar_head=True)
    tx = make_optimizer(3e-3, total_steps=60)
    state = TrainState.create(params, tx)
    step = jax.jit(make_rm_step(config))
    evaluate = jax.jit(make_rm_eval(config))

    def preference_pairs(seed):
        # Hidden preference: the chosen answer ends in token 7, the rejected one in token 9.
        batch = pair_batch(seed, B=8)
        for answer, token in ((batch.chosen, 7), (batch.rejected, 9)):
            last = common.last_token_index(answer.mask_BxT)
            answer.tokens_BxT[np.arange(8), np.asarray(last)] = token
        return batch

    for i in range(40):
        state, metrics = step(state, preference_pairs(i))
    held_out = evaluate(state.params, preference_pairs(1000))
    assert float(held_out["accuracy"]) == 1.0 and float(held_out["margin"]) > 1.0

    batch = preference_pairs(7)
    (_, m1), (_, m2) = step(state, batch), jax.jit(make_rm_step(config, num_microbatches=2))(state, batch)
    for name in ("loss", "reward/min", "reward/max"):  # min and max over microbatches, not means
        np.testing.assert_allclose(m1[name], m2[name], rtol=1e-5, err_msg=name)
