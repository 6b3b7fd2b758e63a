"""The RL math: pure functions over arrays, no model, no I/O."""

from jaxrl_llm.core.advantages import (
    adaptive_kl_update,
    gae,
    group_advantages,
    ppo_token_rewards,
    reinforce_plus_plus_baseline,
    rloo_advantages,
    whiten,
)
from jaxrl_llm.core.logprobs import (
    chunked_full_kl,
    chunked_token_logprobs,
    entropy,
    full_kl,
    token_logprobs,
)
from jaxrl_llm.core.losses import (
    aggregate,
    dpo_loss,
    entropy_bonus,
    kl_estimate,
    loss_normalizer,
    overlong_penalty,
    policy_loss,
    reward_model_loss,
    sft_loss,
    value_loss,
)

__all__ = [
    "adaptive_kl_update",
    "aggregate",
    "chunked_full_kl",
    "chunked_token_logprobs",
    "dpo_loss",
    "entropy",
    "entropy_bonus",
    "full_kl",
    "gae",
    "group_advantages",
    "kl_estimate",
    "loss_normalizer",
    "overlong_penalty",
    "policy_loss",
    "ppo_token_rewards",
    "reinforce_plus_plus_baseline",
    "reward_model_loss",
    "rloo_advantages",
    "sft_loss",
    "token_logprobs",
    "value_loss",
    "whiten",
]
