"""Each algorithm as a `Phase` the loop can drive: its initial train state, its pure step, how the
batch of step s is built (for RL: sampled and scored), its held-out evaluation, and where the
policy's params sit in its state.

Every builder has the signature `build(config, policy, train_set, eval_set) -> Phase`; the
registry (`run.registry`) names the builder of each algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from jaxrl_llm.algorithms.common import score_tokens
from jaxrl_llm.algorithms.dpo import DPOState, make_dpo_step, pair_loss
from jaxrl_llm.algorithms.grpo import GRPOState, make_grpo_step, uses_reference
from jaxrl_llm.algorithms.ppo import PPOState, make_ppo_step
from jaxrl_llm.algorithms.rm import make_rm_eval, make_rm_step
from jaxrl_llm.algorithms.sft import make_sft_step
from jaxrl_llm.config import Config
from jaxrl_llm.core import sft_loss
from jaxrl_llm.models.load import init_scalar_params_from_lm
from jaxrl_llm.run.examples import pair_batch, sequence_batch, step_rows
from jaxrl_llm.run.keys import INIT, stream_key
from jaxrl_llm.run.policy import Policy, load_scalar, own_copy, reference_params
from jaxrl_llm.run.rollouts import Rollouts, evaluation_rewards, reward_function, reward_model_reward
from jaxrl_llm.state import TrainState, make_optimizer


@dataclasses.dataclass
class Phase:
    """One algorithm's pieces, as the loop drives them."""

    state: Any
    step: Callable  # step(state, batch, key) -> (state, metrics), pure; the loop jits it
    make_batch: Callable[[Any, int], tuple[Any, dict]]  # (state, step) -> (batch, host metrics)
    policy_params: Callable[[Any], Any]
    evaluate: Callable[[Any], dict] | None = None
    model_configs: tuple = ()  # every architecture in the state (PPO: critic, reward model), for placement


def decay_steps(config: Config) -> int:
    """Where the run's linear or cosine decay reaches 0: optim.decay_steps, else train.total_steps."""
    return config.optim.decay_steps or config.train.total_steps


def optimizer(config: Config, lr: float | None = None):
    """AdamW with the run's schedule (`lr`: another peak, as PPO's critic's)."""
    o = config.optim
    return make_optimizer(
        o.lr if lr is None else lr, decay_steps(config), o.schedule, o.warmup_steps, o.weight_decay,
        o.b1, o.b2, o.eps, o.grad_clip,
    )


def sft_phase(config: Config, policy: Policy, train_set: list[dict], eval_set: list[dict]) -> Phase:
    """Masked next-token training on prompt/completion examples."""
    step = make_sft_step(policy.config, num_microbatches=config.train.grad_accum)
    tokenizer = policy.tokenizer

    def make_batch(state, s):
        return sequence_batch(tokenizer, step_rows(train_set, config.data.batch_size, s, config), config), {}

    eval_loss = jax.jit(lambda params, b: sft_loss(
        score_tokens(params, policy.config, b.tokens_BxT, b.mask_BxT), b.completion_mask_BxT
    ))

    def evaluate(state):
        return {"eval/loss": eval_loss(state.params, sequence_batch(tokenizer, eval_set, config))}

    return Phase(TrainState.create(policy.params, optimizer(config)), step, make_batch, lambda st: st.params, evaluate)


def rm_phase(config: Config, policy: Policy, train_set: list[dict], eval_set: list[dict]) -> Phase:
    """Bradley–Terry training of a scalar head on the policy's backbone."""
    key = jax.random.fold_in(stream_key(config.seed, INIT), 1)
    params = init_scalar_params_from_lm(own_copy(policy.params), key, policy.config)
    step = make_rm_step(policy.config, config.rm, config.train.grad_accum)
    evaluate_pairs = jax.jit(make_rm_eval(policy.config))
    tokenizer = policy.tokenizer

    def make_batch(state, s):
        return pair_batch(tokenizer, step_rows(train_set, config.data.batch_size, s, config), config), {}

    def evaluate(state):
        out = evaluate_pairs(state.params, pair_batch(tokenizer, eval_set, config))
        return {"eval/accuracy": out["accuracy"], "eval/margin": out["margin"], "eval/loss": out["loss"]}

    return Phase(TrainState.create(params, optimizer(config)), step, make_batch, lambda st: st.params, evaluate)


def dpo_phase(config: Config, policy: Policy, train_set: list[dict], eval_set: list[dict]) -> Phase:
    """DPO against the frozen reference (the starting policy unless model.ref_path is set)."""
    step = make_dpo_step(policy.config, config.dpo, config.train.grad_accum)
    tokenizer = policy.tokenizer

    def make_batch(state, s):
        return pair_batch(tokenizer, step_rows(train_set, config.data.batch_size, s, config), config), {}

    def eval_metrics(params, ref_params, batch):
        loss_B, out = pair_loss(params, ref_params, policy.config, batch, config.dpo)
        return {"eval/loss": loss_B.mean(), "eval/accuracy": out["rewards/accuracies"],
                "eval/margin": out["rewards/margins"]}

    eval_jit = jax.jit(eval_metrics)

    def evaluate(state):
        return eval_jit(state.policy.params, state.ref_params, pair_batch(tokenizer, eval_set, config))

    policy_state = TrainState.create(policy.params, optimizer(config))
    state = DPOState(policy=policy_state, ref_params=reference_params(config, policy))
    return Phase(state, step, make_batch, lambda st: st.policy.params, evaluate)


def grpo_phase(config: Config, policy: Policy, train_set: list[dict], eval_set: list[dict]) -> Phase:
    """GRPO and its variants on prompts scored by reward functions."""
    g = config.grpo
    ref = reference_params(config, policy) if uses_reference(g) else None
    step = make_grpo_step(policy.config, g, config.train.grad_accum, config.data.max_completion_len)
    reward = reward_function(config, policy, g.reward_functions, g.reward_weights)
    rollouts = Rollouts(config, policy, train_set, g.group_size, reward, dynamic=g.dynamic_sampling)
    state = GRPOState(policy=TrainState.create(policy.params, optimizer(config)), ref_params=ref)
    return Phase(
        state, step, lambda st, s: rollouts.batch(st.policy.params, s), lambda st: st.policy.params,
        lambda st: rollouts.evaluate(st.policy.params, eval_set),
    )


def ppo_phase(config: Config, policy: Policy, train_set: list[dict], eval_set: list[dict]) -> Phase:
    """PPO with actor, critic, frozen reference and frozen reward model (seed design)."""
    key = jax.random.fold_in(stream_key(config.seed, INIT), 3)
    reward_model, rm_reward = reward_model_reward(config, policy)
    if config.model.critic_path:
        critic = load_scalar(config, config.model.critic_path, key)
        critic_config, critic_params = critic.config, critic.params
    else:
        critic_config = policy.config
        critic_params = init_scalar_params_from_lm(own_copy(policy.params), key, policy.config)
    step = make_ppo_step(
        policy.config, config.ppo, config.train.grad_accum, critic_config=critic_config,
        reward_config=reward_model.config,
    )
    rollouts = Rollouts(config, policy, train_set, 1, None)
    names, weights = evaluation_rewards(config, train_set[0])
    evaluator = Rollouts(config, policy, train_set, 1, reward_function(config, policy, names, weights, rm_reward))
    actor = TrainState.create(policy.params, optimizer(config))
    critic_state = TrainState.create(critic_params, optimizer(config, lr=config.optim.critic_lr))
    state = PPOState.create(
        actor, critic_state, reference_params(config, policy), own_copy(reward_model.params), config.ppo.kl_coef
    )
    return Phase(
        state, step, lambda st, s: rollouts.batch(st.actor.params, s), lambda st: st.actor.params,
        lambda st: evaluator.evaluate(st.actor.params, eval_set),
        (policy.config, critic_config, reward_model.config),
    )
