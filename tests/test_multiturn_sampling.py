"""Multi-turn sampling into per-row caches: a first turn equals `generate`, and every turn's
log-probs equal one full forward pass over the whole conversation."""

import jax
import jax.numpy as jnp
import numpy as np
from test_sampling import PROMPTS, TINY

from jaxrl_llm.core.logprobs import token_logprobs
from jaxrl_llm.models.transformer import Transformer, init_params, positions_from_mask
from jaxrl_llm.padding import Bucketing
from jaxrl_llm.sampling import SamplingConfig, generate, init_turn_cache, sample_turn

CONFIG = SamplingConfig(
    max_new_tokens=6, temperature=1.3, top_k=50, stop_token_ids=(7,), bucketing=Bucketing("pow2", 4)
)
PARAMS = init_params(TINY, jax.random.key(0))


def test_first_turn_equals_generate():
    out = generate(PARAMS, PROMPTS, jax.random.key(3), CONFIG, TINY)
    turns = init_turn_cache(TINY, len(PROMPTS), 32)
    _, turn = sample_turn(PARAMS, turns, PROMPTS, [6] * len(PROMPTS), jax.random.key(3), CONFIG, TINY)
    np.testing.assert_array_equal(turn.tokens_RxN, out.tokens_RxN)
    np.testing.assert_array_equal(turn.lengths_R, out.lengths_R)
    np.testing.assert_array_equal(turn.stopped_R, ~out.truncated_R)
    np.testing.assert_allclose(turn.logp_RxN, out.logp_RxN, atol=2e-5)


def conversation(seed, limits):
    """Three turns with 'tool' tokens between them; (tokens of each row, model-token flags, logps)."""
    rng = np.random.default_rng(seed)
    rows = len(PROMPTS)
    turns = init_turn_cache(TINY, rows, 96)
    tokens = [list(p) for p in PROMPTS]
    model = [[False] * len(p) for p in PROMPTS]
    logps = [[0.0] * len(p) for p in PROMPTS]
    blocks = [list(p) for p in PROMPTS]
    for t in range(3):
        turns, turn = sample_turn(PARAMS, turns, blocks, limits, jax.random.key(10 + t), CONFIG, TINY)
        blocks = []
        for r in range(rows):
            n = int(turn.lengths_R[r])
            tokens[r] += turn.tokens_RxN[r, :n].tolist()
            model[r] += [True] * n
            logps[r] += turn.logp_RxN[r, :n].tolist()
            tool = rng.integers(10, 250, rng.integers(1, 9)).tolist() if r != 2 or t == 0 else []
            tokens[r] += tool
            model[r] += [False] * len(tool)
            logps[r] += [0.0] * len(tool)
            # The turn's last token is not in the cache yet; a row with no block ends its talk.
            blocks.append([tokens[r][-len(tool) - 1], *tool] if tool and n else [])
        # The cache holds every token but those of the next block.
        assert all(int(f) + len(b) == len(x) for f, b, x in zip(turns.fill_R, blocks, tokens) if b)
    return tokens, model, logps


def test_turns_logprobs_equal_full_forward_of_the_whole_conversation():
    tokens, model, logps = conversation(0, [6, 3, 6, 6])
    T = max(map(len, tokens))
    pad = lambda rows, value: np.array([list(x) + [value] * (T - len(x)) for x in rows])
    tokens_RxT, mask_RxT = pad(tokens, 0), pad([[1] * len(x) for x in tokens], 0)
    logits_RxTxV, _ = Transformer(TINY).apply(
        {"params": PARAMS}, jnp.asarray(tokens_RxT), positions_from_mask(jnp.asarray(mask_RxT)), jnp.asarray(mask_RxT)
    )
    ref_RxT = np.asarray(token_logprobs(logits_RxTxV[:, :-1], jnp.asarray(tokens_RxT[:, 1:]), CONFIG.temperature))
    model_RxT, logp_RxT = pad(model, False), pad(logps, 0.0)
    assert model_RxT.sum() > 20 and model_RxT[1].sum() <= 3 * 3  # row 1's turns are cut at 3 tokens
    np.testing.assert_allclose(np.where(model_RxT[:, 1:], logp_RxT[:, 1:], 0), np.where(model_RxT[:, 1:], ref_RxT, 0),
                               atol=2e-5)
