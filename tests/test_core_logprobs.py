"""core/logprobs.py against plain float64 NumPy references, and the chunked path against the plain one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.core import chunked_full_kl, chunked_token_logprobs, entropy, full_kl, token_logprobs

SEEDS = range(10)  # looped inside each test: new data on the same shapes, so no new compiles
EAGER_SEEDS = range(4)
CASES = [(True, (3, 7, 16)), (True, (1, 1, 5)), (False, (2, 5, 9))]  # (jit, shape): compiles dominate the runtime
JITTED = {
    token_logprobs: jax.jit(token_logprobs),
    entropy: jax.jit(entropy),
    full_kl: jax.jit(full_kl, static_argnames="chunk_size"),
}


def maybe_jit(fn, jit):
    return JITTED[fn] if jit else fn


def seeds(jit):
    return SEEDS if jit else EAGER_SEEDS


def random_problem(seed, shape):
    rng = np.random.default_rng(seed)
    B, T, V = shape
    logits = (rng.normal(size=(B, T, V)) * (1 + seed % 4)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T))
    return rng, logits, tokens


def ref_log_softmax(z):
    top = max(z)
    lse = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - lse for v in z], lse


def ref_token_logprobs(logits, tokens, temperature=1.0):
    B, T, _ = logits.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            logp, _ = ref_log_softmax([float(v) / temperature for v in logits[b, t]])
            out[b, t] = logp[tokens[b, t]]
    return out


def ref_entropy(logits, temperature=1.0):
    B, T, _ = logits.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            z = [float(v) / temperature for v in logits[b, t]]
            logp, lse = ref_log_softmax(z)
            out[b, t] = lse - sum(math.exp(lp) * zv for lp, zv in zip(logp, z))
    return out


def ref_full_kl(logits, ref_logits, temperature=1.0):
    B, T, _ = logits.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            logp, _ = ref_log_softmax([float(v) / temperature for v in logits[b, t]])
            logq, _ = ref_log_softmax([float(v) / temperature for v in ref_logits[b, t]])
            out[b, t] = sum(math.exp(lp) * (lp - lq) for lp, lq in zip(logp, logq))
    return out


@pytest.mark.parametrize("jit, shape", CASES)
def test_token_logprobs_and_entropy_match_numpy(jit, shape):
    for seed in seeds(jit):
        _, logits, tokens = random_problem(seed, shape)
        temperature = 1.0 if seed % 2 else 0.7
        logp = maybe_jit(token_logprobs, jit)(logits, tokens, temperature=temperature)
        ent = maybe_jit(entropy, jit)(logits, temperature=temperature)
        assert logp.shape == ent.shape == shape[:2] and logp.dtype == ent.dtype == jnp.float32
        np.testing.assert_allclose(logp, ref_token_logprobs(logits, tokens, temperature), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ent, ref_entropy(logits, temperature), rtol=1e-5, atol=1e-5)


def test_logprob_and_entropy_gradients_match_numpy():
    @jax.jit
    def grads(logits, tokens, w_logp, w_ent):
        return jax.grad(lambda z: jnp.sum(w_logp * token_logprobs(z, tokens)) + jnp.sum(w_ent * entropy(z)))(logits)

    for seed in SEEDS:
        rng, logits, tokens = random_problem(seed, CASES[0][1])
        w_logp, w_ent = rng.normal(size=(2, *logits.shape[:2])).astype(np.float32)
        want = np.zeros(logits.shape)
        B, T, V = logits.shape
        for b in range(B):
            for t in range(T):
                logp, _ = ref_log_softmax([float(v) for v in logits[b, t]])
                p = [math.exp(lp) for lp in logp]
                mean_z = sum(pv * float(zv) for pv, zv in zip(p, logits[b, t]))
                for v in range(V):
                    d_logp = (1.0 if v == tokens[b, t] else 0.0) - p[v]  # d log p_y / d z_v
                    d_ent = -p[v] * (float(logits[b, t, v]) - mean_z)  # d H / d z_v
                    want[b, t, v] = w_logp[b, t] * d_logp + w_ent[b, t] * d_ent
        np.testing.assert_allclose(grads(logits, tokens, w_logp, w_ent), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("jit, shape", CASES)
def test_full_kl_matches_numpy_and_vanishes_on_itself(jit, shape):
    for seed in seeds(jit):
        rng, logits, _ = random_problem(seed, shape)
        ref_logits = logits + rng.normal(size=logits.shape).astype(np.float32)
        temperature = 1.0 if seed % 2 else 0.7
        kl = maybe_jit(full_kl, jit)(logits, ref_logits, chunk_size=3, temperature=temperature)
        assert kl.shape == shape[:2] and kl.dtype == jnp.float32
        np.testing.assert_allclose(kl, ref_full_kl(logits, ref_logits, temperature), rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(kl) >= -1e-6)
        np.testing.assert_allclose(maybe_jit(full_kl, jit)(logits, logits, chunk_size=3), 0.0, atol=1e-6)


def test_bf16_logits_accumulate_in_fp32():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 4096)) * 4, jnp.bfloat16)
    tokens = rng.integers(0, 4096, size=(2, 3))
    as_f64 = np.asarray(logits.astype(jnp.float32), np.float64)
    logp, ent = token_logprobs(logits, tokens), entropy(logits)
    kl = full_kl(logits, jnp.roll(logits, 1, axis=-1))
    assert logp.dtype == ent.dtype == kl.dtype == jnp.float32
    # A bf16 accumulation over 4096 entries would be off by ~1e-2.
    np.testing.assert_allclose(logp, ref_token_logprobs(as_f64, tokens), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ent, ref_entropy(as_f64), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(kl, ref_full_kl(as_f64, np.roll(as_f64, 1, axis=-1)), rtol=1e-5, atol=1e-4)


def hidden_problem(seed, B=2, T=7, D=6, V=33):
    rng = np.random.default_rng(100 + seed)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    lm_head = (rng.normal(size=(D, V)) * 0.7).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T))
    weights = rng.normal(size=(3, B, T)).astype(np.float32)
    return rng, hidden, lm_head, tokens, weights


def value_grads_and_outputs(fn, weights):
    """jit(h, w -> ((Σ weights·outputs, outputs), d/d(h, w))) for fn returning one or two [B, T] arrays."""

    def objective(h, w):
        outs = fn(h, w)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return sum(jnp.sum(wt * o) for wt, o in zip(weights, outs)), outs

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))


def assert_same_values_and_gradients(got, want):
    (v_got, outs_got), grads_got = got
    (v_want, outs_want), grads_want = want
    np.testing.assert_allclose(v_got, v_want, rtol=1e-5)
    for o_got, o_want in zip(outs_got, outs_want):
        np.testing.assert_allclose(o_got, o_want, rtol=1e-5, atol=1e-5)
    for g_got, g_want in zip(grads_got, grads_want):
        np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-5)


def test_chunked_logprobs_equal_plain_values_and_gradients():
    _, hidden, lm_head, tokens, weights = hidden_problem(0)

    def plain(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w)
        logp = token_logprobs(logits, tokens, temperature=0.8)
        return logp, entropy(logits, temperature=0.8), logp

    def chunked(h, w):
        # chunk 3 leaves a partial last chunk of T = 7; chunk 64 is longer than T.
        logp, ent = chunked_token_logprobs(h, w, tokens, chunk_size=3, with_entropy=True, temperature=0.8)
        return logp, ent, chunked_token_logprobs(h, w, tokens, chunk_size=64, temperature=0.8)

    want = value_grads_and_outputs(plain, weights)(hidden, lm_head)
    assert_same_values_and_gradients(value_grads_and_outputs(chunked, weights)(hidden, lm_head), want)
    logits = np.einsum("btd,dv->btv", hidden.astype(np.float64), lm_head.astype(np.float64)) / 0.8
    np.testing.assert_allclose(want[0][1][0], ref_token_logprobs(logits, tokens), rtol=1e-5, atol=1e-5)
    one_position_chunks = chunked_token_logprobs(hidden, lm_head, tokens, chunk_size=1, temperature=0.8)
    np.testing.assert_allclose(one_position_chunks, want[0][1][0], rtol=1e-5, atol=1e-5)


def test_default_chunks_fill_the_logit_budget(monkeypatch):
    """chunk_size=None: as many positions as keep B·C·V within LOGITS_PER_CHUNK, at least one,
    at most T; with a small budget the default path splits and still equals one chunk."""
    from jaxrl_llm.core import logprobs

    assert logprobs._positions_per_chunk(None, 4, 256, 49152) == 256  # SmolLM2 SFT batch: one chunk
    assert logprobs._positions_per_chunk(None, 256, 1024, 49152) == 5  # 256·5·V ≤ 2^26 < 256·6·V
    assert logprobs._positions_per_chunk(None, 4096, 64, 49152) == 1
    assert logprobs._positions_per_chunk(7, 4, 3, 10) == 3
    _, hidden, lm_head, tokens, _ = hidden_problem(0)
    B, T = tokens.shape
    monkeypatch.setattr(logprobs, "LOGITS_PER_CHUNK", 2 * B * lm_head.shape[1])  # 2 positions a chunk
    assert logprobs._positions_per_chunk(None, B, T, lm_head.shape[1]) == 2
    np.testing.assert_allclose(chunked_token_logprobs(hidden, lm_head, tokens),
                               chunked_token_logprobs(hidden, lm_head, tokens, chunk_size=T), rtol=1e-6, atol=1e-6)


def test_chunked_full_kl_equals_plain_values_and_gradients():
    rng, hidden, lm_head, _, weights = hidden_problem(0)
    ref_hidden = hidden + 0.5 * rng.normal(size=hidden.shape).astype(np.float32)
    ref_head = lm_head + 0.5 * rng.normal(size=lm_head.shape).astype(np.float32)

    def plain(h, w):
        return full_kl(jnp.einsum("btd,dv->btv", h, w), jnp.einsum("btd,dv->btv", ref_hidden, ref_head))

    def chunked(h, w):
        return chunked_full_kl(h, w, ref_hidden, ref_head, chunk_size=3)

    want = value_grads_and_outputs(plain, weights)(hidden, lm_head)
    assert_same_values_and_gradients(value_grads_and_outputs(chunked, weights)(hidden, lm_head), want)
    logits = np.einsum("btd,dv->btv", hidden.astype(np.float64), lm_head.astype(np.float64))
    ref_logits = np.einsum("btd,dv->btv", ref_hidden.astype(np.float64), ref_head.astype(np.float64))
    np.testing.assert_allclose(want[0][1][0], ref_full_kl(logits, ref_logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked_full_kl(hidden, lm_head, hidden, lm_head, chunk_size=3), 0.0, atol=1e-6)


def test_chunked_bf16_inputs_give_fp32_logprobs():
    _, hidden, lm_head, tokens, _ = hidden_problem(0, V=2048)
    h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(lm_head, jnp.bfloat16)
    logp = chunked_token_logprobs(h16, w16, tokens, chunk_size=3)
    assert logp.dtype == jnp.float32
    h64, w64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (h16, w16))
    logits = np.einsum("btd,dv->btv", h64, w64)
    np.testing.assert_allclose(logp, ref_token_logprobs(logits, tokens), rtol=1e-5, atol=1e-4)


def test_chunked_backward_never_holds_the_full_logits():
    B, T, D, V = 2, 256, 8, 4096
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    lm_head = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))

    def temp_bytes(logp_fn):
        step = jax.jit(jax.grad(lambda h, w: jnp.sum(logp_fn(h, w)), argnums=(0, 1)))
        stats = step.lower(hidden, lm_head).compile().memory_analysis()
        if stats is None:
            pytest.skip("this backend reports no memory analysis")
        return stats.temp_size_in_bytes

    full_logits_bytes = B * T * V * 4
    plain = temp_bytes(lambda h, w: token_logprobs(jnp.einsum("btd,dv->btv", h, w), tokens))
    chunked = temp_bytes(lambda h, w: chunked_token_logprobs(h, w, tokens, chunk_size=16))
    assert plain >= full_logits_bytes  # the measurement sees the [B, T, V] buffer when it exists
    assert chunked < full_logits_bytes // 4
