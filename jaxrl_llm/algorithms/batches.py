"""The batches training steps take: typed records whose field names carry their shapes.

Shapes: B sequences (or preference pairs), T tokens, R rollout rows (prompts × samples), P prompt
length, N completion length.

Rows are [left-padded prompt | right-padded completion]; `mask` is 1 on real tokens and
`completion_mask` on the tokens a loss sees. Position t of a log-prob array scores token t given
tokens < t, so position 0 scores nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_llm.sampling import Completions


@struct.dataclass
class SequenceBatch:
    """Prompt + completion sequences (SFT)."""

    tokens_BxT: jax.Array
    mask_BxT: jax.Array
    completion_mask_BxT: jax.Array

    def num_tokens(self) -> jax.Array:
        """Real tokens, prompt and completion."""
        return jnp.sum(self.mask_BxT)


@struct.dataclass
class PairBatch:
    """Preference pairs, the preferred and the other answer to the same prompt, at one common width (RM, DPO)."""

    chosen: SequenceBatch
    rejected: SequenceBatch

    def stacked(self) -> SequenceBatch:
        """Chosen rows, then rejected rows [2B, T]: one forward pass scores both answers."""
        return jax.tree.map(lambda c, r: jnp.concatenate([c, r]), self.chosen, self.rejected)

    def num_tokens(self) -> jax.Array:
        return self.chosen.num_tokens() + self.rejected.num_tokens()


@struct.dataclass
class RolloutBatch:
    """Sampled answers with what an RL step needs: the prompt width (no loss sees a prompt token, so
    log-probs are computed from position P on), host-scored rewards, truncation flags, and the
    temperature the answers were sampled at, which the step scores them at (static under jit)."""

    tokens_RxT: jax.Array
    mask_RxT: jax.Array
    completion_mask_RxT: jax.Array
    prompt_mask_RxP: jax.Array
    rewards_R: jax.Array
    truncated_R: jax.Array
    temperature: float = struct.field(pytree_node=False, default=1.0)
    # Rewards at given tokens (an environment's per-turn rewards at each turn's last token), which PPO
    # adds to its per-token rewards; None: the whole reward is rewards_R.
    token_rewards_RxT: jax.Array | None = None
    # The sampler's log-probs of the tokens (0 off the completion), which the rollout correction and
    # the mismatch metrics compare with the trainer's; None: not recorded (a batch built by hand).
    rollout_logp_RxT: jax.Array | None = None

    @classmethod
    def from_completions(cls, completions: Completions, rewards_R: jax.Array | None = None) -> "RolloutBatch":
        """The batch of a sampler output; `rewards_R` None (zeros) when the step scores the answers
        itself, as PPO's reward model does. The loss sees the sampled tokens only (a multi-turn
        trajectory's environment turns are context)."""
        c = completions
        completion_mask_RxN = jnp.asarray(c.mask_RxN if c.sampled_mask_RxN is None else c.sampled_mask_RxN, jnp.int32)
        mask_RxN = jnp.asarray(c.mask_RxN, jnp.int32)
        prompt_mask_RxP = jnp.asarray(c.prompt_mask_RxP, jnp.int32)
        R = completion_mask_RxN.shape[0]
        return cls(
            tokens_RxT=jnp.concatenate([jnp.asarray(c.prompt_tokens_RxP), jnp.asarray(c.tokens_RxN)], axis=1),
            mask_RxT=jnp.concatenate([prompt_mask_RxP, mask_RxN], axis=1),
            completion_mask_RxT=jnp.concatenate([jnp.zeros_like(prompt_mask_RxP), completion_mask_RxN], axis=1),
            prompt_mask_RxP=prompt_mask_RxP,
            rewards_R=jnp.zeros((R,), jnp.float32) if rewards_R is None else jnp.asarray(rewards_R, jnp.float32),
            truncated_R=jnp.asarray(c.truncated_R),
            temperature=c.logp_temperature,
            rollout_logp_RxT=jnp.concatenate(
                [jnp.zeros(prompt_mask_RxP.shape, jnp.float32), jnp.asarray(c.logp_RxN, jnp.float32)], axis=1
            ),
        )

    @property
    def prompt_width(self) -> int:
        """P: the first position whose log-prob a step needs."""
        return self.prompt_mask_RxP.shape[1]

    def num_tokens(self) -> jax.Array:
        return jnp.sum(self.mask_RxT)
