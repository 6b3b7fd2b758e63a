"""KV-cache generation: one shared prefill, then a compiled decode loop returning what RL needs.

Shape letters: B prompts, R rows (B·n samples), P padded prompt length, N max new tokens,
S cache length (P + N), D embed, V vocab, C candidate tokens, L layers, K kv heads, E head dim.

RNG rule: at step t, row r draws one uniform from `fold_in(fold_in(key, r), t)` and inverts the
CDF of its (truncated) next-token distribution; sample j of prompt i sits at row i·n + j. A row's
samples depend only on (key, r, its prompt), so `n` samples of each prompt equal the same prompts
repeated n times (each copy at the same row) with n = 1 and the same key.

Speed: the prefill runs the layers once over the B prompts and the decode loop once per token, both
unrolled over per-layer weight copies (`models.transformer.decode_step`); the loop stops as soon
as every row has emitted a stop token.
"""

from __future__ import annotations

import dataclasses
import operator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import sharding
from jaxrl_llm.core.logprobs import token_logprobs
from jaxrl_llm.models.transformer import (
    DTYPES,
    Cache,
    ModelConfig,
    constrain_layer_cache,
    decode_step,
    init_cache,
    lm_logits,
    positions_from_mask,
    unstack_layers,
)
from jaxrl_llm.padding import Bucketing, pad_bucketed


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample; hashable, so static under jit.

    temperature 0 = greedy; top_k 0 and top_p 1 = off. Prompts given as token lists are
    left-padded to `bucketing`'s width. cache_dtype None = the model's compute dtype.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    pad_token_id: int = 0
    bucketing: Bucketing = Bucketing()
    cache_dtype: str | None = None
    slots: int = 0  # > 0: continuous batching over this many rows (`generate_continuous`); 0: one static batch

    def __post_init__(self):
        # A list of stop ids would make the config unhashable, so store it as a tuple.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = (
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 means greedy)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns top-k off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1] (1 turns top-p off)"),
            (self.n >= 1, "n (samples per prompt) must be >= 1"),
            (self.slots == 0 or self.slots >= self.n, "slots must be 0 (static batching) or >= n (a prompt's samples)"),
            (self.pad_token_id >= 0, "pad_token_id must be a token id >= 0"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids >= 0"),
            (
                self.cache_dtype in (None, *DTYPES),
                "cache_dtype must be None (the model's dtype), float32, bfloat16 or float16",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingConfig: {message}; got {self}.")


@flax.struct.dataclass
class Completions:
    """Sampled rows (sample j of prompt i at row i·n + j) and what a trainer needs to rescore them.

    logp_RxN is log_softmax(logits / temperature) of each token (temperature 1 when greedy),
    taken BEFORE top-k/top-p truncation: the policy a trainer scores, not the truncated sampler.
    mask_RxN runs through the first stop token inclusive; after it tokens are pad and logp 0.
    truncated_R: the row hit max_new_tokens without a stop token.
    prompt_tokens_RxP / prompt_mask_RxP: the padded prompts, so prompt + completion can be
    concatenated (with their masks) and rescored with `positions_from_mask`.
    logp_temperature: the temperature logp_RxN is taken at, which a trainer must score at too.
    sampled_mask_RxN: the tokens the model sampled, when not all of mask_RxN are (multi-turn
    trajectories hold the environment's tokens too); None: all of them.
    """

    tokens_RxN: jax.Array
    logp_RxN: jax.Array
    mask_RxN: jax.Array
    lengths_R: jax.Array
    truncated_R: jax.Array
    prompt_tokens_RxP: jax.Array
    prompt_mask_RxP: jax.Array
    logp_temperature: float = flax.struct.field(pytree_node=False, default=1.0)
    sampled_mask_RxN: jax.Array | None = None


@flax.struct.dataclass
class _DecodeState:
    """The while-loop carry: step t, last tokens, stop flags, output buffers, per-layer KV caches."""

    t: jax.Array
    token_R: jax.Array
    done_R: jax.Array
    length_R: jax.Array
    tokens_RxN: jax.Array
    logp_RxN: jax.Array
    caches: list[Cache]


def pad_prompts(prompts, config: SamplingConfig, model_config: ModelConfig):
    """(tokens_BxP, mask_BxP) from token-id lists (left-padded to a bucket) or a padded pair."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
        tokens_BxP, mask_BxP = prompts
        if np.shape(tokens_BxP) != np.shape(mask_BxP):
            raise ValueError(
                f"generate: prompt tokens {np.shape(tokens_BxP)} and mask {np.shape(mask_BxP)} "
                "must have the same [B, P] shape."
            )
        lengths_B = np.asarray(mask_BxP).astype(bool).sum(-1)
    else:
        lengths_B = np.array([len(p) for p in prompts])
        if not len(prompts):
            raise ValueError("generate: prompts is empty; pass at least one list of token ids.")
        tokens_BxP, mask_BxP = pad_bucketed(prompts, config.bucketing, config.pad_token_id)
        if tokens_BxP.size and not 0 <= tokens_BxP.min() <= tokens_BxP.max() < model_config.vocab_size:
            raise ValueError(
                f"generate: prompt token ids must lie in [0, {model_config.vocab_size}) "
                "(the model's vocab_size); check the tokenizer matches the model."
            )
    _check_lengths(lengths_B, config, model_config)
    return jnp.asarray(tokens_BxP, jnp.int32), jnp.asarray(mask_BxP, jnp.int32)


def _check_lengths(lengths_B: np.ndarray, config: SamplingConfig, model_config: ModelConfig):
    if lengths_B.size and lengths_B.min() < 1:
        raise ValueError("generate: every prompt needs at least one token; found an empty one.")
    longest = int(lengths_B.max(initial=0)) + config.max_new_tokens
    if longest > model_config.max_position_embeddings:
        raise ValueError(
            f"generate: the longest prompt plus max_new_tokens is {longest} tokens, beyond the "
            f"model's max_position_embeddings ({model_config.max_position_embeddings}); shorten "
            "the prompts or lower SamplingConfig.max_new_tokens."
        )


def _nucleus(w_RxC: jax.Array, top_p: float) -> jax.Array:
    """Boolean [R,C]: candidates whose strictly more likely candidates hold < top_p of the mass."""
    # Bisection over the float bits of the probabilities (monotone for p >= 0) finds the exact
    # cut in 31 masked sums; sorting the vocabulary costs ~20x more on CPU.
    probs_RxC = w_RxC / w_RxC.sum(-1, keepdims=True)
    bits_RxC = jax.lax.bitcast_convert_type(probs_RxC, jnp.int32)

    def halve(_, bounds):
        low_R, high_R = bounds
        mid_R = (low_R + high_R) // 2
        above_R = jnp.sum(jnp.where(bits_RxC > mid_R[:, None], probs_RxC, 0.0), axis=-1)
        fits_R = above_R < top_p
        return jnp.where(fits_R, low_R, mid_R + 1), jnp.where(fits_R, mid_R, high_R)

    R = w_RxC.shape[0]
    one_bits = jax.lax.bitcast_convert_type(jnp.float32(1.0), jnp.int32)
    bounds = (jnp.zeros((R,), jnp.int32), jnp.full((R,), one_bits))
    _, cut_R = jax.lax.fori_loop(0, 31, halve, bounds)
    return bits_RxC >= cut_R[:, None]


def _inverse_cdf(w_RxC: jax.Array, u_R: jax.Array) -> jax.Array:
    """Index drawn with probability w / sum(w), from one uniform per row."""
    # Zero-weight slots get cdf 0 so rounding in the cumsum can never pick them.
    cdf_RxC = jnp.where(w_RxC > 0, jnp.cumsum(w_RxC, axis=-1), 0.0)
    target_R = (1.0 - u_R) * cdf_RxC.max(-1)
    return jnp.argmax(cdf_RxC >= target_R[:, None], axis=-1)


def sample_tokens(logits_RxV: jax.Array, keys_R: jax.Array, config: SamplingConfig):
    """(token_R, logp_R): next tokens and their log-probs under the untruncated scaled policy."""
    # Warpers in HF's order: temperature, top-k, top-p over the renormalised top-k (keeping every
    # token tied with the top-p cut). Top-k keeps exactly k tokens, where HF also keeps any tied
    # with the k-th (exact fp32 ties are rare). Greedy scores its tokens at temperature 1.
    logits_RxV = logits_RxV.astype(jnp.float32)
    if config.temperature == 0:
        token_R = jnp.argmax(logits_RxV, axis=-1).astype(jnp.int32)
        return token_R, token_logprobs(logits_RxV[:, None], token_R[:, None])[:, 0]
    z_RxV = logits_RxV / config.temperature
    cand_RxC, index_RxC = z_RxV, None
    if config.top_k:
        cand_RxC, index_RxC = jax.lax.top_k(z_RxV, min(config.top_k, z_RxV.shape[-1]))
    w_RxC = jnp.exp(cand_RxC - cand_RxC.max(-1, keepdims=True))
    if config.top_p < 1.0:
        w_RxC = jnp.where(_nucleus(w_RxC, config.top_p), w_RxC, 0.0)
    u_R = jax.vmap(jax.random.uniform)(keys_R)
    token_R = _inverse_cdf(w_RxC, u_R)
    if index_RxC is not None:
        token_R = jnp.take_along_axis(index_RxC, token_R[:, None], axis=-1)[:, 0]
    token_R = token_R.astype(jnp.int32)
    return token_R, token_logprobs(logits_RxV[:, None], token_R[:, None], config.temperature)[:, 0]


def per_layer(cache: Cache, num_layers: int) -> list[Cache]:
    """A stacked [L, ...] cache as one {"k","v"} per layer, as `decode_step` takes them."""
    return [jax.tree.map(operator.itemgetter(i), cache) for i in range(num_layers)]


def prefill(params, layers, tokens_BxP, mask_BxP, model_config: ModelConfig, cache_dtype):
    """(logits_BxV at each prompt's last real token, per-layer caches [B,P,K,E]) in one pass."""
    B, P = tokens_BxP.shape
    # Over the per-layer weights, like the decode steps: scanning the stacked weights makes XLA
    # CPU copy a bf16 stack to fp32 every call (it slices 16-bit floats in fp32).
    hidden_BxPxD, caches = decode_step(
        params, layers, tokens_BxP, positions_from_mask(mask_BxP), mask_BxP,
        per_layer(init_cache(model_config, B, P, cache_dtype), model_config.num_layers), 0, model_config,
    )
    last_B = P - 1 - jnp.argmax(mask_BxP[:, ::-1], axis=-1)
    hidden_BxD = jnp.take_along_axis(hidden_BxPxD, last_B[:, None, None], axis=1)[:, 0]
    return lm_logits(params, hidden_BxD, model_config), caches


def _emit(state: _DecodeState, logits_RxV, row_keys_R, stops, config: SamplingConfig):
    """Sample step t's tokens, record them (pad once a row is done) and advance t."""
    keys_R = jax.vmap(jax.random.fold_in, (0, None))(row_keys_R, state.t)
    token_R, logp_R = sample_tokens(logits_RxV, keys_R, config)
    live_R = ~state.done_R
    token_R = jnp.where(live_R, token_R, config.pad_token_id)
    logp_R = jnp.where(live_R, logp_R, 0.0)
    return state.replace(
        t=state.t + 1,
        token_R=token_R,
        done_R=state.done_R | jnp.isin(token_R, stops),
        length_R=state.length_R + live_R,
        tokens_RxN=jax.lax.dynamic_update_index_in_dim(state.tokens_RxN, token_R, state.t, 1),
        logp_RxN=jax.lax.dynamic_update_index_in_dim(state.logp_RxN, logp_R, state.t, 1),
    )


def _repeat_rows(cache: Cache, n: int, new_slots: int) -> Cache:
    """A prompt layer cache copied to each prompt's n rows, with `new_slots` empty slots appended."""
    widths = ((0, 0), (0, new_slots), (0, 0), (0, 0))
    return constrain_layer_cache(jax.tree.map(lambda c: jnp.pad(jnp.repeat(c, n, axis=0), widths), cache))


@jax.jit(static_argnames=("config", "model_config", "mesh"))
def _generate(params, tokens_BxP, mask_BxP, key, config: SamplingConfig, model_config: ModelConfig, mesh=None):
    if mesh is None:
        return _decode(params, tokens_BxP, mask_BxP, key, config, model_config)
    with sharding.mesh_context(mesh):
        return _decode(params, tokens_BxP, mask_BxP, key, config, model_config)


def _decode(params, tokens_BxP, mask_BxP, key, config: SamplingConfig, model_config: ModelConfig):
    """Prefill, then the decode loop until every row stopped or N tokens (traced by `_generate`)."""
    n, N, P = config.n, config.max_new_tokens, tokens_BxP.shape[1]
    layers = unstack_layers(params, model_config)
    logits_BxV, prompt_caches = prefill(params, layers, tokens_BxP, mask_BxP, model_config, config.cache_dtype)
    mask_RxP = jnp.repeat(mask_BxP, n, axis=0)
    R = mask_RxP.shape[0]
    kv_mask_RxS = jnp.concatenate([mask_RxP, jnp.ones((R, N), jnp.int32)], axis=1)
    start_R = mask_RxP.sum(-1)
    row_keys_R = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(R))
    stops = jnp.asarray(config.stop_token_ids, jnp.int32)
    state = _DecodeState(
        t=jnp.int32(0),
        token_R=jnp.zeros((R,), jnp.int32),
        done_R=jnp.zeros((R,), bool),
        length_R=jnp.zeros((R,), jnp.int32),
        tokens_RxN=jnp.full((R, N), config.pad_token_id, jnp.int32),
        logp_RxN=jnp.zeros((R, N), jnp.float32),
        caches=[_repeat_rows(cache, n, N) for cache in prompt_caches],
    )
    state = _emit(state, jnp.repeat(logits_BxV, n, axis=0), row_keys_R, stops, config)

    def step(state: _DecodeState) -> _DecodeState:
        # The token sampled at step t-1 goes to slot P+t-1, position (real prompt tokens)+t-1.
        hidden_Rx1xD, caches = decode_step(
            params, layers, state.token_R[:, None], (start_R + state.t - 1)[:, None], kv_mask_RxS,
            state.caches, P + state.t - 1, model_config,
        )
        logits_RxV = lm_logits(params, hidden_Rx1xD[:, 0], model_config)
        return _emit(state.replace(caches=caches), logits_RxV, row_keys_R, stops, config)

    def running(state: _DecodeState) -> jax.Array:
        return (state.t < N) & ~jnp.all(state.done_R)

    state = jax.lax.while_loop(running, step, state)
    return Completions(
        tokens_RxN=state.tokens_RxN,
        logp_RxN=state.logp_RxN,
        mask_RxN=(jnp.arange(N) < state.length_R[:, None]).astype(jnp.int32),
        lengths_R=state.length_R,
        truncated_R=~state.done_R,
        prompt_tokens_RxP=jnp.repeat(tokens_BxP, n, axis=0),
        prompt_mask_RxP=mask_RxP,
        logp_temperature=config.temperature or 1.0,
    )


def generate(params, prompts, key, config: SamplingConfig, model_config: ModelConfig, mesh=None) -> Completions:
    """`config.n` completions per prompt of token-id lists (bucketed) or a padded (tokens, mask) pair.

    With a `mesh` (see `sharding.make_mesh`) rows and the KV cache split over data × fsdp and
    heads over tensor, following the params' own layout; samples equal the unsharded ones.
    """
    tokens_BxP, mask_BxP = pad_prompts(prompts, config, model_config)
    if 0 < config.slots < tokens_BxP.shape[0] * config.n:
        return _continuous(params, tokens_BxP, mask_BxP, key, config, model_config, mesh)
    if mesh is not None:
        tokens_BxP, mask_BxP = sharding.place_batch((tokens_BxP, mask_BxP), mesh)
    return _generate(params, tokens_BxP, mask_BxP, key, config, model_config, mesh)


# Continuous batching: S slots decode together; when slots free up, the next prompts waiting are
# prefilled into them (each prompt's n samples into n free slots) and decoding goes on, so no slot
# idles behind a long row. One compiled loop: admit prompts while enough slots are free, then one
# decode step for all.


@flax.struct.dataclass
class _SlotState:
    """The continuous loop's carry: per slot its row (-1: free), tokens emitted, last token and cache
    fill; per row its outputs; the next prompt to admit."""

    row_S: jax.Array
    step_S: jax.Array
    token_S: jax.Array
    fill_S: jax.Array
    caches: list[Cache]
    next_prompt: jax.Array
    tokens_RxN: jax.Array
    logp_RxN: jax.Array
    length_R: jax.Array
    done_R: jax.Array


def generate_continuous(params, prompts, key, config: SamplingConfig, model_config: ModelConfig, mesh=None):
    """`generate` with `config.slots` rows decoding at a time, each freed slot refilled at once:
    row r draws as `generate`'s row r (same key rule), so the completions are the same."""
    if config.slots < 1:
        raise ValueError("generate_continuous: set SamplingConfig.slots to the rows decoded at a time (>= n).")
    tokens_BxP, mask_BxP = pad_prompts(prompts, config, model_config)
    return _continuous(params, tokens_BxP, mask_BxP, key, config, model_config, mesh)


def right_aligned(tokens_BxP, mask_BxP, pad_token_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """(tokens_BxP with each prompt's real tokens first, lengths_B): how prompts enter the slots,
    where a slot's fill is its next position."""
    mask_np = np.asarray(mask_BxP).astype(bool)
    lengths_B = mask_np.sum(-1).astype(np.int32)
    right_BxP = np.full(mask_np.shape, pad_token_id, np.int32)
    for b, row in enumerate(np.asarray(tokens_BxP)):
        right_BxP[b, : lengths_B[b]] = row[mask_np[b]]
    return jnp.asarray(right_BxP), jnp.asarray(lengths_B)


def _continuous(params, tokens_BxP, mask_BxP, key, config: SamplingConfig, model_config: ModelConfig, mesh):
    right_BxP, lengths_B = right_aligned(tokens_BxP, mask_BxP, config.pad_token_id)
    out = _continuous_loop(params, right_BxP, lengths_B, key, config, model_config, mesh)
    n = config.n
    return Completions(
        tokens_RxN=out.tokens_RxN, logp_RxN=out.logp_RxN,
        mask_RxN=(jnp.arange(config.max_new_tokens) < out.length_R[:, None]).astype(jnp.int32),
        lengths_R=out.length_R, truncated_R=~out.done_R,
        prompt_tokens_RxP=jnp.repeat(jnp.asarray(tokens_BxP), n, axis=0),
        prompt_mask_RxP=jnp.repeat(jnp.asarray(mask_BxP, jnp.int32), n, axis=0),
        logp_temperature=config.temperature or 1.0,
    )


@jax.jit(static_argnames=("config", "model_config", "mesh"))
def _continuous_loop(params, prompts_BxP, lengths_B, key, config: SamplingConfig, model_config: ModelConfig, mesh=None):
    if mesh is None:
        return _slot_decode(params, prompts_BxP, lengths_B, key, config, model_config)
    with sharding.mesh_context(mesh):
        return _slot_decode(params, prompts_BxP, lengths_B, key, config, model_config)


def _slot_decode(params, prompts_BxP, lengths_B, key, config: SamplingConfig, model_config: ModelConfig):
    """The continuous loop (traced by `_continuous_loop`): every row's outputs."""
    (B, P), n, N, S = prompts_BxP.shape, config.n, config.max_new_tokens, config.slots
    R, C = B * n, P + N
    F = max(1, S // (4 * n))  # prompts admitted per prefill: a quarter of the slots
    layers = unstack_layers(params, model_config)
    stops = jnp.asarray(config.stop_token_ids, jnp.int32)
    cache_slot_C = jnp.arange(C)

    def record(state: _SlotState, slot_ids, token, logp, live):
        """Write each live slot's token at its row's step; retire rows that stopped or hit N."""
        rows = jnp.where(live, state.row_S[slot_ids], R)  # R: dropped
        steps = state.step_S[slot_ids]
        tokens_RxN = state.tokens_RxN.at[rows, steps].set(token, mode="drop")
        logp_RxN = state.logp_RxN.at[rows, steps].set(logp, mode="drop")
        step = steps + 1
        stopped, full = jnp.isin(token, stops), step >= N
        ends = live & (stopped | full)
        return state.replace(
            tokens_RxN=tokens_RxN, logp_RxN=logp_RxN,
            length_R=state.length_R.at[rows].set(step, mode="drop"),
            done_R=state.done_R.at[jnp.where(ends & stopped, rows, R)].set(True, mode="drop"),
            step_S=state.step_S.at[slot_ids].set(jnp.where(live, step, state.step_S[slot_ids]), mode="drop"),
            token_S=state.token_S.at[slot_ids].set(jnp.where(live, token, state.token_S[slot_ids]), mode="drop"),
            row_S=state.row_S.at[slot_ids].set(jnp.where(ends, -1, state.row_S[slot_ids]), mode="drop"),
        )

    def draw(logits_KxV, rows_K, steps_K):
        keys_K = jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(key, r), t))(rows_K, steps_K)
        return sample_tokens(logits_KxV, keys_K, config)

    def admit(state: _SlotState) -> _SlotState:
        """Prefill the next F prompts (fewer at the end) into free slots, n each, and emit their rows'
        first tokens."""
        b_F = state.next_prompt + jnp.arange(F)
        valid_F = b_F < B
        b_F = jnp.minimum(b_F, B - 1)
        length_F = lengths_B[b_F]
        zero = per_layer(init_cache(model_config, F, C, config.cache_dtype), model_config.num_layers)
        hidden_FxPxD, prompt_caches = decode_step(
            params, layers, prompts_BxP[b_F], jnp.broadcast_to(jnp.arange(P), (F, P)),
            cache_slot_C < length_F[:, None], zero, jnp.zeros((F,), jnp.int32), model_config,
        )
        last_FxD = jnp.take_along_axis(hidden_FxPxD, (length_F - 1)[:, None, None], axis=1)[:, 0]
        logits_FxV = lm_logits(params, last_FxD, model_config)
        valid_K = jnp.repeat(valid_F, n)  # K = F·n new rows, prompt f's samples at f·n + j
        slot_K = jnp.where(valid_K, jnp.argsort(state.row_S >= 0, stable=True)[: F * n], S)  # free first; S: none
        caches = [
            jax.tree.map(lambda c, new: c.at[slot_K].set(jnp.repeat(new, n, axis=0), mode="drop"), cache, prompt)
            for cache, prompt in zip(state.caches, prompt_caches)
        ]
        rows_K = jnp.repeat(b_F, n) * n + jnp.tile(jnp.arange(n), F)
        token_K, logp_K = draw(jnp.repeat(logits_FxV, n, axis=0), rows_K, jnp.zeros((F * n,), jnp.int32))
        state = state.replace(
            caches=caches, next_prompt=jnp.minimum(state.next_prompt + F, B),
            row_S=state.row_S.at[slot_K].set(rows_K, mode="drop"),
            step_S=state.step_S.at[slot_K].set(0, mode="drop"),
            fill_S=state.fill_S.at[slot_K].set(jnp.repeat(length_F, n), mode="drop"),
        )
        return record(state, slot_K, token_K, logp_K, valid_K)

    def decode(state: _SlotState) -> _SlotState:
        """One token for every busy slot: the last token goes in at slot (and position) fill."""
        live_S = state.row_S >= 0
        hidden_Sx1xD, caches = decode_step(
            params, layers, state.token_S[:, None], state.fill_S[:, None], cache_slot_C <= state.fill_S[:, None],
            state.caches, state.fill_S, model_config,
        )
        logits_SxV = lm_logits(params, hidden_Sx1xD[:, 0], model_config)
        token_S, logp_S = draw(logits_SxV, jnp.maximum(state.row_S, 0), state.step_S)
        state = state.replace(caches=caches, fill_S=state.fill_S + live_S)
        return record(state, jnp.arange(S), token_S, logp_S, live_S)

    def can_admit(state: _SlotState):
        # F prompts at a time (fewer once fewer wait): each prefill reads every weight once, so
        # admitting several per pass saves reads at the cost of a few slots idling until F·n are free.
        waiting = jnp.minimum(B - state.next_prompt, F)
        return (waiting > 0) & (jnp.sum(state.row_S < 0) >= waiting * n)

    def step(state: _SlotState) -> _SlotState:
        state = jax.lax.while_loop(can_admit, admit, state)
        return jax.lax.cond(jnp.any(state.row_S >= 0), decode, lambda s: s, state)

    state = _SlotState(
        row_S=jnp.full((S,), -1, jnp.int32), step_S=jnp.zeros((S,), jnp.int32), token_S=jnp.zeros((S,), jnp.int32),
        fill_S=jnp.zeros((S,), jnp.int32),
        caches=per_layer(init_cache(model_config, S, C, config.cache_dtype), model_config.num_layers),
        next_prompt=jnp.int32(0), tokens_RxN=jnp.full((R, N), config.pad_token_id, jnp.int32),
        logp_RxN=jnp.zeros((R, N), jnp.float32), length_R=jnp.zeros((R,), jnp.int32), done_R=jnp.zeros((R,), bool),
    )
    return jax.lax.while_loop(lambda s: (s.next_prompt < B) | jnp.any(s.row_S >= 0), step, state)


def generate_runs(params, batched, prompts: list, keys: list, config: SamplingConfig,
                  model_config: ModelConfig, mesh=None, run_axis: str = "vmap") -> list[Completions]:
    """`generate` for N models in one compiled call (a sweep's runs): `params` leaves where `batched`
    (a matching tree of bools) is True carry a leading run axis, the others are shared by every run
    (a LoRA sweep's base); `prompts[i]` (token-id lists) and `keys[i]` are run i's. Every run's prompts
    are left-padded to one width; run i's rows are `generate`'s with params i, prompts i and key i.
    `run_axis`: vmap (the runs' rows decode together) or map (one run after another, `lax.map`)."""
    padded = [pad_prompts(list(p), config, model_config) for p in prompts]
    width = max(tokens.shape[1] for tokens, _ in padded)
    widen_left = lambda x, value: jnp.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=value)
    tokens_NxBxP = jnp.stack([widen_left(tokens, config.pad_token_id) for tokens, _ in padded])
    mask_NxBxP = jnp.stack([widen_left(mask, 0) for _, mask in padded])
    leaves, treedef = jax.tree.flatten(params)
    flags = treedef.flatten_up_to(batched)
    shared = [None if flag else leaf for leaf, flag in zip(leaves, flags)]
    stacked = [leaf if flag else None for leaf, flag in zip(leaves, flags)]
    out = _generate_runs(
        shared, stacked, tokens_NxBxP, mask_NxBxP, jnp.stack(keys), treedef, config, model_config, mesh, run_axis
    )
    out = sharding.to_host(out)  # one transfer, then each run's rows are NumPy views
    return [jax.tree.map(operator.itemgetter(i), out) for i in range(len(prompts))]


@jax.jit(static_argnames=("treedef", "config", "model_config", "mesh", "run_axis"))
def _generate_runs(shared, stacked, tokens_NxBxP, mask_NxBxP, keys_N, treedef, config, model_config, mesh=None,
                   run_axis="vmap"):
    def one(args):
        stacked_i, tokens_BxP, mask_BxP, key = args
        params = treedef.unflatten([s if s is not None else b for s, b in zip(shared, stacked_i)])
        return _decode(params, tokens_BxP, mask_BxP, key, config, model_config)

    runs = (stacked, tokens_NxBxP, mask_NxBxP, keys_N)
    over_runs = (lambda: jax.vmap(one)(runs)) if run_axis == "vmap" else (lambda: jax.lax.map(one, runs))
    if mesh is None:
        return over_runs()
    with sharding.mesh_context(mesh):
        return over_runs()


def compiled_variants() -> int:
    """How many shapes/configs the jitted generation core has been compiled for in this process."""
    return _generate._cache_size()


# Multi-turn generation: a conversation's turns are sampled one after another into one KV cache per
# row, so each turn extends the cache with its new tokens instead of prefilling the whole history.


@flax.struct.dataclass
class TurnCache:
    """The KV caches of R conversations: row r's tokens fill slots [0, fill_R[r]) of its cache in
    order, with no padding between turns, so a token's slot is also its position."""

    caches: list[Cache]
    fill_R: jax.Array


@flax.struct.dataclass
class Turn:
    """One sampled turn per row: tokens_RxN, their log-probs (as `Completions.logp_RxN`), how many
    (lengths_R, 0 for a row that had nothing to extend), and whether a stop token ended it."""

    tokens_RxN: jax.Array
    logp_RxN: jax.Array
    lengths_R: jax.Array
    stopped_R: jax.Array


def init_turn_cache(model_config: ModelConfig, rows: int, cache_len: int, cache_dtype: str | None = None) -> TurnCache:
    """Empty caches of `cache_len` slots for `rows` conversations."""
    cache = per_layer(init_cache(model_config, rows, cache_len, cache_dtype), model_config.num_layers)
    return TurnCache(caches=cache, fill_R=jnp.zeros((rows,), jnp.int32))


@jax.jit(static_argnames=("config", "model_config", "mesh"))
def _sample_turn(params, turns: TurnCache, block_RxD, block_len_R, limit_R, key, config: SamplingConfig,
                 model_config: ModelConfig, mesh=None):
    if mesh is None:
        return _extend_and_decode(params, turns, block_RxD, block_len_R, limit_R, key, config, model_config)
    with sharding.mesh_context(mesh):
        return _extend_and_decode(params, turns, block_RxD, block_len_R, limit_R, key, config, model_config)


def _extend_and_decode(params, turns: TurnCache, block_RxD, block_len_R, limit_R, key, config, model_config):
    """Write each row's block at its fill, then decode until every row stopped or hit its limit."""
    N, (R, D), S = config.max_new_tokens, block_RxD.shape, turns.caches[0]["k"].shape[1]
    layers = unstack_layers(params, model_config)
    slot_S = jnp.arange(S)
    fill_R = turns.fill_R
    hidden_RxDxE, caches = decode_step(
        params, layers, block_RxD, fill_R[:, None] + jnp.arange(D), slot_S < (fill_R + block_len_R)[:, None],
        turns.caches, fill_R, model_config,
    )
    last_R = jnp.maximum(block_len_R - 1, 0)
    logits_RxV = lm_logits(params, jnp.take_along_axis(hidden_RxDxE, last_R[:, None, None], axis=1)[:, 0], model_config)
    fill_R = fill_R + block_len_R
    row_keys_R = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(R))
    stops = jnp.asarray(config.stop_token_ids, jnp.int32)
    limit_R = jnp.where(block_len_R > 0, jnp.minimum(limit_R, N), 0)

    def emit(state: _DecodeState, logits_RxV):
        state = _emit(state, logits_RxV, row_keys_R, stops, config)
        return state.replace(done_R=state.done_R | (state.length_R >= limit_R))

    state = _DecodeState(
        t=jnp.int32(0), token_R=jnp.zeros((R,), jnp.int32), done_R=limit_R == 0,
        length_R=jnp.zeros((R,), jnp.int32), tokens_RxN=jnp.full((R, N), config.pad_token_id, jnp.int32),
        logp_RxN=jnp.zeros((R, N), jnp.float32), caches=caches,
    )
    state = emit(state, logits_RxV)

    def step(state: _DecodeState) -> _DecodeState:
        # The token sampled at step t-1 goes to slot (and position) fill + t - 1 of its row.
        slot_R = fill_R + state.t - 1
        hidden_Rx1xD, caches = decode_step(
            params, layers, state.token_R[:, None], slot_R[:, None], slot_S <= slot_R[:, None],
            state.caches, slot_R, model_config,
        )
        logits_RxV = lm_logits(params, hidden_Rx1xD[:, 0], model_config)
        return emit(state.replace(caches=caches), logits_RxV)

    state = jax.lax.while_loop(lambda s: (s.t < N) & ~jnp.all(s.done_R), step, state)
    # A turn's last token is not in the cache yet: it opens the next block.
    last_R = state.tokens_RxN[jnp.arange(R), jnp.maximum(state.length_R - 1, 0)]
    stopped_R = (state.length_R > 0) & jnp.isin(last_R, stops)
    turn = Turn(tokens_RxN=state.tokens_RxN, logp_RxN=state.logp_RxN, lengths_R=state.length_R, stopped_R=stopped_R)
    return TurnCache(caches=state.caches, fill_R=fill_R + jnp.maximum(state.length_R - 1, 0)), turn


def sample_turn(params, turns: TurnCache, blocks: list[list[int]], limits, key, config: SamplingConfig,
                model_config: ModelConfig, mesh=None) -> tuple[TurnCache, Turn]:
    """Extend each row's cache with its block of tokens (the prompt, or what came since its last
    turn, led by that turn's last token), then sample one turn of at most min(limit, N) tokens.

    A row whose block is empty samples nothing. Row r draws as `generate`'s row r with the same
    key, so a first turn equals `generate` over the same prompts. The block is padded on the right
    to a bucket; a row's real tokens must fit its cache (the caller's budget).
    """
    block_len_R = np.array([len(b) for b in blocks], np.int32)
    block_RxD, _ = pad_bucketed([list(b) or [config.pad_token_id] for b in blocks], config.bucketing,
                                config.pad_token_id, left=False)
    S = turns.caches[0]["k"].shape[1]
    if int(np.max(sharding.to_host(turns.fill_R) + block_len_R + np.minimum(limits, config.max_new_tokens))) > S:
        raise ValueError(f"sample_turn: a row's tokens would pass its cache of {S} slots; budget the turns.")
    arrays = (jnp.asarray(block_RxD, jnp.int32), jnp.asarray(block_len_R), jnp.asarray(limits, jnp.int32))
    if mesh is not None:
        arrays = sharding.place_batch(arrays, mesh)
    return _sample_turn(params, turns, *arrays, key, config, model_config, mesh)
