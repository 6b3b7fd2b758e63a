"""Per-token log-probs, entropy and exact KL from logits or, chunked, from final hidden states.

Shapes: B batch, T positions, V vocabulary, D hidden size, C positions per chunk, N chunks.

Alignment: callers pass logits already aligned with the tokens they score, so
`logits_BxTxV[:, t]` scores `tokens_BxT[:, t]` (for a causal LM: the logits of
positions 0..T-2 with the input tokens 1..T-1). Everything is accumulated in float32
whatever the input dtype, and `temperature` divides the logits as the sampler does.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax


def _scaled_f32(logits_BxTxV, temperature):
    return logits_BxTxV.astype(jnp.float32) / temperature


def _logp_of(z_BxTxV, tokens_BxT):
    picked_BxT = jnp.take_along_axis(z_BxTxV, tokens_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked_BxT - jax.nn.logsumexp(z_BxTxV, axis=-1)


def _entropy_of(z_BxTxV):
    lse_BxT = jax.nn.logsumexp(z_BxTxV, axis=-1)
    p_BxTxV = jnp.exp(z_BxTxV - lse_BxT[..., None])
    return lse_BxT - jnp.sum(p_BxTxV * z_BxTxV, axis=-1)


def _kl_of(z_BxTxV, ref_z_BxTxV):
    logp_BxTxV = jax.nn.log_softmax(z_BxTxV, axis=-1)
    ref_logp_BxTxV = jax.nn.log_softmax(ref_z_BxTxV, axis=-1)
    return jnp.sum(jnp.exp(logp_BxTxV) * (logp_BxTxV - ref_logp_BxTxV), axis=-1)


def _head_logits(hidden_BxCxD, lm_head_DxV, temperature):
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", hidden_BxCxD, lm_head_DxV, preferred_element_type=jnp.float32)
    return logits_BxCxV / temperature


# Logits per chunk when the caller sets no chunk size: 2^26 fp32 values (256 MiB). Fewer, larger
# chunks are faster (an SFT step on SmolLM2, batch 4 x 256, was about 10% slower on CPU with
# 128-position chunks than in one piece); the cap bounds the [B, C, V] intermediates.
LOGITS_PER_CHUNK = 2**26


def _positions_per_chunk(chunk_size, B, T, V):
    """C: `chunk_size`, or when None as many positions as keep B·C·V within LOGITS_PER_CHUNK."""
    if chunk_size is None:
        chunk_size = LOGITS_PER_CHUNK // (B * V)
    return max(1, min(chunk_size, T))


def _map_chunks(fn, chunk_size, V, *xs_BxTx):
    """Apply `fn` to C-position slices of every `xs` and stitch its [B, C] outputs back to [B, T].

    Each chunk is rematerialised (`jax.checkpoint`) so neither pass keeps more than one
    chunk's [B, C, V] intermediates. The last chunk is shifted left to stay in bounds
    instead of padding, which would copy the inputs; only its new positions are kept.
    """
    B, T = xs_BxTx[0].shape[:2]
    C = _positions_per_chunk(chunk_size, B, T, V)
    N = -(-T // C)
    tail = T - (N - 1) * C
    starts_N = jnp.minimum(jnp.arange(N) * C, T - C)

    def one_chunk(start):
        return fn(*(lax.dynamic_slice_in_dim(x, start, C, axis=1) for x in xs_BxTx))

    outs_NxBxC = lax.map(jax.checkpoint(one_chunk, prevent_cse=False), starts_N)

    def stitch(y_NxBxC):
        head_BxH = jnp.moveaxis(y_NxBxC[:-1], 0, 1).reshape(B, (N - 1) * C)
        return jnp.concatenate([head_BxH, y_NxBxC[-1][:, C - tail:]], axis=1)

    return jax.tree.map(stitch, outs_NxBxC)


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log π(tokens_t) = z_t[token] − logsumexp(z_t), accumulated in float32."""
    chex.assert_rank([logits_BxTxV, tokens_BxT], [3, 2])
    chex.assert_equal_shape_prefix([logits_BxTxV, tokens_BxT], 2)
    return _logp_of(_scaled_f32(logits_BxTxV, temperature), tokens_BxT)


def entropy(logits_BxTxV: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Token entropy H_t = logsumexp(z_t) − Σ_v softmax(z_t)_v·z_{t,v}, accumulated in float32."""
    chex.assert_rank(logits_BxTxV, 3)
    return _entropy_of(_scaled_f32(logits_BxTxV, temperature))


def full_kl(
    logits_BxTxV: jax.Array, ref_logits_BxTxV: jax.Array, chunk_size: int | None = None, temperature: float = 1.0
) -> jax.Array:
    """Exact KL(π_θ(·|s_t) ‖ π_ref(·|s_t)) = Σ_v p_v·(log p_v − log q_v) per position (verl `full`), chunked."""
    chex.assert_rank([logits_BxTxV, ref_logits_BxTxV], 3)
    chex.assert_equal_shape([logits_BxTxV, ref_logits_BxTxV])

    def kl_chunk(z_BxCxV, ref_z_BxCxV):
        return _kl_of(_scaled_f32(z_BxCxV, temperature), _scaled_f32(ref_z_BxCxV, temperature))

    return _map_chunks(kl_chunk, chunk_size, logits_BxTxV.shape[-1], logits_BxTxV, ref_logits_BxTxV)


def chunked_token_logprobs(
    hidden_BxTxD: jax.Array, lm_head_DxV: jax.Array, tokens_BxT: jax.Array, chunk_size: int | None = None,
    with_entropy: bool = False, temperature: float = 1.0,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """token_logprobs(hidden @ lm_head, tokens) (and entropy) without materialising [B, T, V]: peak B·C·V floats.

    `hidden_BxTxD` are the final-normed hidden states aligned with `tokens_BxT` (see module
    docstring); differentiable w.r.t. hidden and lm_head, each chunk recomputed in the backward.
    Returns logp_BxT, or (logp_BxT, entropy_BxT) when `with_entropy`.
    """
    chex.assert_rank([hidden_BxTxD, lm_head_DxV, tokens_BxT], [3, 2, 2])
    chex.assert_equal_shape_prefix([hidden_BxTxD, tokens_BxT], 2)

    def logp_chunk(h_BxCxD, tokens_BxC):
        z_BxCxV = _head_logits(h_BxCxD, lm_head_DxV, temperature)
        logp_BxC = _logp_of(z_BxCxV, tokens_BxC)
        return (logp_BxC, _entropy_of(z_BxCxV)) if with_entropy else logp_BxC

    return _map_chunks(logp_chunk, chunk_size, lm_head_DxV.shape[1], hidden_BxTxD, tokens_BxT)


def chunked_full_kl(
    hidden_BxTxD: jax.Array, lm_head_DxV: jax.Array, ref_hidden_BxTxD: jax.Array, ref_lm_head_DxV: jax.Array,
    chunk_size: int | None = None, temperature: float = 1.0,
) -> jax.Array:
    """full_kl(hidden @ lm_head, ref_hidden @ ref_lm_head) without materialising either [B, T, V] logits."""
    chex.assert_rank([hidden_BxTxD, lm_head_DxV, ref_hidden_BxTxD, ref_lm_head_DxV], [3, 2, 3, 2])
    chex.assert_equal_shape_prefix([hidden_BxTxD, ref_hidden_BxTxD], 2)

    def kl_chunk(h_BxCxD, ref_h_BxCxD):
        return _kl_of(
            _head_logits(h_BxCxD, lm_head_DxV, temperature),
            _head_logits(ref_h_BxCxD, ref_lm_head_DxV, temperature),
        )

    return _map_chunks(kl_chunk, chunk_size, lm_head_DxV.shape[1], hidden_BxTxD, ref_hidden_BxTxD)
