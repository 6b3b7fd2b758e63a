"""Generation: log-prob parity with a full forward, decoding rules, RNG rules, compiles, SmolLM2.

Shape letters: B prompts, G samples per prompt, R rows (B·G), P padded prompt length,
N new tokens, T P + N, V vocab.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.models.transformer import ModelConfig, Transformer, init_params, positions_from_mask
from jaxrl_llm.padding import Bucketing
from jaxrl_llm.sampling import (
    SamplingConfig,
    _generate,
    compiled_variants,
    generate,
    pad_prompts,
    sample_tokens,
)

TINY = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, initializer_range=0.2, max_position_embeddings=128,
)
PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11], [42], [200, 201, 202, 203, 204]]
SAMPLE = SamplingConfig(max_new_tokens=10, temperature=1.0, bucketing=Bucketing("pow2", 8))
GREEDY = SamplingConfig(max_new_tokens=10, temperature=0.0, bucketing=Bucketing("pow2", 8))


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0))


def rescore(params, out, temperature, model_config=TINY):
    """logp_RxN of the completion under a full uncached forward over prompt + completion."""
    tokens_RxT = jnp.concatenate([out.prompt_tokens_RxP, out.tokens_RxN], axis=1)
    mask_RxT = jnp.concatenate([out.prompt_mask_RxP, out.mask_RxN], axis=1)
    logits_RxTxV, _ = Transformer(model_config).apply(
        {"params": params}, tokens_RxT, positions_from_mask(mask_RxT), mask_RxT
    )
    P = out.prompt_tokens_RxP.shape[1]
    logp_RxNxV = jax.nn.log_softmax(logits_RxTxV[:, P - 1:-1].astype(jnp.float32) / temperature, -1)
    return jnp.take_along_axis(logp_RxNxV, out.tokens_RxN[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("config", [
    GREEDY,
    SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=20, stop_token_ids=(3, 4), bucketing=Bucketing("pow2", 8)),
    SamplingConfig(max_new_tokens=9, temperature=1.6, top_p=0.9, n=2, bucketing=Bucketing("pow2", 16)),
], ids=["greedy", "t0.7-topk-stops", "t1.6-topp-n2"])
def test_logprobs_equal_full_forward(params, config):
    out = generate(params, PROMPTS, jax.random.key(1), config, TINY)
    ref_RxN = rescore(params, out, config.temperature or 1.0)
    assert out.tokens_RxN.shape == (len(PROMPTS) * config.n, config.max_new_tokens)
    # fp32 rounding of a different summation order: 1e-5 held on CPU, an H200 gave 1.1e-5 at log p -4.2.
    error_RxN = np.abs(np.asarray((out.logp_RxN - ref_RxN) * out.mask_RxN))
    assert np.all(error_RxN <= 1e-5 + 4e-6 * np.abs(np.asarray(ref_RxN))), error_RxN.max()
    assert np.all(np.asarray(out.logp_RxN) <= 0)


def test_prepadded_pair_and_right_padding_match_lists(params):
    out = generate(params, PROMPTS, jax.random.key(1), GREEDY, TINY)
    tokens_BxP, mask_BxP = np.asarray(out.prompt_tokens_RxP), np.asarray(out.prompt_mask_RxP)
    lengths_B = mask_BxP.sum(-1)
    right_tokens_BxP = np.zeros_like(tokens_BxP)
    for row, prompt in enumerate(PROMPTS):
        right_tokens_BxP[row, :len(prompt)] = prompt
    right_mask_BxP = (np.arange(tokens_BxP.shape[1]) < lengths_B[:, None]).astype(np.int32)
    for pair in [(tokens_BxP, mask_BxP), (right_tokens_BxP, right_mask_BxP)]:
        again = generate(params, pair, jax.random.key(1), GREEDY, TINY)
        np.testing.assert_array_equal(again.tokens_RxN, out.tokens_RxN)
        np.testing.assert_allclose(again.logp_RxN, out.logp_RxN, atol=1e-5)


def test_top_k_1_and_tiny_top_p_are_greedy(params):
    greedy = generate(params, PROMPTS, jax.random.key(1), GREEDY, TINY).tokens_RxN
    for config in [
        SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=1, bucketing=Bucketing("pow2", 8)),
        SamplingConfig(max_new_tokens=10, temperature=1.5, top_p=1e-6, bucketing=Bucketing("pow2", 8)),
    ]:
        np.testing.assert_array_equal(generate(params, PROMPTS, jax.random.key(7), config, TINY).tokens_RxN, greedy)


def test_seed_reproduces_and_another_seed_differs(params):
    first = generate(params, PROMPTS, jax.random.key(3), SAMPLE, TINY)
    again = generate(params, PROMPTS, jax.random.key(3), SAMPLE, TINY)
    other = generate(params, PROMPTS, jax.random.key(4), SAMPLE, TINY)
    np.testing.assert_array_equal(first.tokens_RxN, again.tokens_RxN)
    np.testing.assert_array_equal(first.logp_RxN, again.logp_RxN)
    assert np.mean(np.asarray(first.tokens_RxN) != np.asarray(other.tokens_RxN)) > 0.5


def test_stop_tokens_end_rows_and_mask_the_rest(params):
    free = generate(params, PROMPTS, jax.random.key(5), SAMPLE, TINY)
    tokens_RxN = np.asarray(free.tokens_RxN)
    stops = (int(tokens_RxN[0, 2]), int(tokens_RxN[1, 6]))
    config = SamplingConfig(max_new_tokens=10, stop_token_ids=stops, pad_token_id=0, bucketing=Bucketing("pow2", 8))
    out = generate(params, PROMPTS, jax.random.key(5), config, TINY)
    assert not np.asarray(out.truncated_R)[:2].any()
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(np.isin(tokens_RxN[row], stops))
        length = hits[0] + 1 if hits.size else config.max_new_tokens
        assert out.lengths_R[row] == length
        assert bool(out.truncated_R[row]) == (hits.size == 0)
        np.testing.assert_array_equal(out.tokens_RxN[row, :length], tokens_RxN[row, :length])
        np.testing.assert_array_equal(out.tokens_RxN[row, length:], 0)
        np.testing.assert_array_equal(out.logp_RxN[row, length:], 0.0)
        np.testing.assert_array_equal(out.mask_RxN[row], np.arange(config.max_new_tokens) < length)


def test_n_samples_equal_repeated_prompts(params):
    n = 3
    grouped = generate(params, PROMPTS, jax.random.key(9), SamplingConfig(
        max_new_tokens=10, n=n, bucketing=Bucketing("pow2", 8)), TINY)
    repeated = generate(params, [p for p in PROMPTS for _ in range(n)], jax.random.key(9), SAMPLE, TINY)
    np.testing.assert_array_equal(grouped.tokens_RxN, repeated.tokens_RxN)
    np.testing.assert_allclose(grouped.logp_RxN, repeated.logp_RxN, atol=1e-5)
    np.testing.assert_array_equal(grouped.prompt_tokens_RxP, repeated.prompt_tokens_RxP)
    tokens_BxGxN = np.asarray(grouped.tokens_RxN).reshape(len(PROMPTS), n, -1)
    assert (tokens_BxGxN[:, 0] != tokens_BxGxN[:, 1]).any()


def _shapes(jaxpr) -> set[tuple[int, ...]]:
    """Every intermediate shape in a jaxpr, nested jaxprs (scan, while, pjit) included."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes |= _shapes(inner)
    return shapes


def test_prefill_runs_once_per_prompt_not_per_sample(params):
    config = SamplingConfig(max_new_tokens=4, n=3, bucketing=Bucketing("pow2", 16))
    tokens_BxP, mask_BxP = pad_prompts(PROMPTS[:2], config, TINY)
    jaxpr = jax.make_jaxpr(lambda p, t, m, k: _generate(p, t, m, k, config, TINY))(
        params, tokens_BxP, mask_BxP, jax.random.key(0)
    )
    shapes = _shapes(jaxpr.jaxpr)
    D, P = TINY.hidden_size, 16
    assert (2, P, D) in shapes
    assert (6, P, D) not in shapes
    assert (6, 1, D) in shapes


def test_bucketing_keeps_compiles_few(params):
    config = SamplingConfig(max_new_tokens=3, temperature=0.0, bucketing=Bucketing("pow2", 8))
    rng = np.random.default_rng(0)
    lengths = [3, 5, 8, 9, 12, 16, 4, 14, 7, 11]
    before = compiled_variants()
    for longest in lengths:
        batch = [rng.integers(1, 256, size=int(k)).tolist() for k in (longest, max(1, longest - 2))]
        generate(params, batch, jax.random.key(0), config, TINY)
    buckets = {config.bucketing.length(k) for k in lengths}
    assert buckets == {8, 16}
    assert compiled_variants() - before == len(buckets)


def test_bf16_logprobs_close_to_fp32(params):
    bf16 = TINY.replace(dtype="bfloat16")
    out = generate(params, PROMPTS, jax.random.key(2), SAMPLE, bf16)
    ref_RxN = rescore(params, out, 1.0)
    error = np.abs(np.asarray((out.logp_RxN - ref_RxN) * out.mask_RxN)).max()
    assert out.logp_RxN.dtype == jnp.float32
    assert 1e-4 < error < 0.2, error


def _allowed_probs(z_V: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """float64 reference: softmax(z/T), restricted to the top-k, then to the top-p nucleus."""
    z_V = z_V.astype(np.float64) / config.temperature
    order_V = np.argsort(-z_V)
    keep_V = np.zeros(z_V.shape, bool)
    keep_V[order_V[:config.top_k or len(z_V)]] = True
    p_V = np.where(keep_V, np.exp(z_V - z_V.max()), 0.0)
    p_V /= p_V.sum()
    mass_before_V = np.cumsum(p_V[order_V]) - p_V[order_V]
    nucleus_V = np.zeros(z_V.shape, bool)
    nucleus_V[order_V[mass_before_V < config.top_p]] = True
    p_V = np.where(keep_V & nucleus_V, p_V, 0.0)
    return p_V / p_V.sum()


@pytest.mark.parametrize("config", [
    SamplingConfig(temperature=0.8),
    SamplingConfig(temperature=1.0, top_k=4),
    SamplingConfig(temperature=1.2, top_p=0.7),
    SamplingConfig(temperature=0.9, top_k=6, top_p=0.8),
], ids=["plain", "top-k", "top-p", "top-k+top-p"])
def test_sampler_draws_the_truncated_distribution(config):
    R = 20_000
    z_V = np.array([2.0, 1.5, 1.4, 1.0, 0.5, 0.2, 0.0, -0.3, -1.0, -2.0, 1.45, 0.9], np.float32)
    keys_R = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(11), jnp.arange(R))
    token_R, logp_R = jax.jit(sample_tokens, static_argnums=2)(jnp.tile(z_V, (R, 1)), keys_R, config)
    expected_V = _allowed_probs(z_V, config)
    counts_V = np.bincount(np.asarray(token_R), minlength=len(z_V))
    assert counts_V[expected_V == 0].sum() == 0
    sigma_V = np.sqrt(expected_V * (1 - expected_V) / R)
    np.testing.assert_array_less(np.abs(counts_V / R - expected_V), 5 * sigma_V + 1e-9)
    untruncated_V = jax.nn.log_softmax(z_V / config.temperature)
    np.testing.assert_allclose(logp_R, untruncated_V[np.asarray(token_R)], atol=1e-6)


@pytest.mark.parametrize("bad, field", [
    (dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"), (dict(n=0), "n"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_k=-1), "top_k"), (dict(cache_dtype="int8"), "cache_dtype"),
])
def test_config_validation_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**bad)


def test_prompt_errors_are_raised_before_compiling(params):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(params, [[1] * 120], jax.random.key(0), SAMPLE, TINY)
    with pytest.raises(ValueError, match="at least one token"):
        generate(params, [[1, 2], []], jax.random.key(0), SAMPLE, TINY)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(params, [[1, 256]], jax.random.key(0), SAMPLE, TINY)
    assert SamplingConfig(stop_token_ids=[2, 3]).stop_token_ids == (2, 3)


CHATS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
]


@pytest.mark.slow
def test_greedy_equals_transformers_on_smollm2(smollm2, smollm2_torch):
    import torch

    torch_model, tokenizer = smollm2_torch
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        for text in CHATS
    ]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    eos = tokenizer.eos_token_id
    config = SamplingConfig(max_new_tokens=24, temperature=0.0, stop_token_ids=(eos,), pad_token_id=eos)
    out = generate(smollm2.params, prompts, jax.random.key(0), config, smollm2.config)
    threads = torch.get_num_threads()
    # One torch thread: on a shared 2-core machine its spinning OpenMP threads stall for minutes.
    torch.set_num_threads(1)
    try:
        for row, prompt in enumerate(prompts):
            with torch.no_grad():
                ref = torch_model.generate(
                    torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    do_sample=False, max_new_tokens=24, eos_token_id=eos, pad_token_id=eos,
                )[0, len(prompt):].tolist()
            assert np.asarray(out.tokens_RxN[row, :int(out.lengths_R[row])]).tolist() == ref
    finally:
        torch.set_num_threads(threads)
