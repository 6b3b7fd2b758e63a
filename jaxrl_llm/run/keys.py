"""A run's random keys: one independent stream per purpose, each a function of the seed alone.

The key of step s of a stream is `fold_in(stream_key(seed, stream), s)`, so a resumed run draws
exactly what an uninterrupted one draws.
"""

from __future__ import annotations

import jax

STEP, ROLLOUT, RESAMPLE, INIT = range(4)  # the streams: update steps, rollouts, DAPO resampling, inits


def stream_key(seed: int, stream: int) -> jax.Array:
    """The base key of one purpose, so no two purposes share keys."""
    return jax.random.fold_in(jax.random.key(seed), stream)
