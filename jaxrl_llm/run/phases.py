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

from jaxrl_llm.algorithms.common import reference_of, score_tokens
from jaxrl_llm.algorithms.dpo import DPOState, make_dpo_step, pair_loss
from jaxrl_llm.algorithms.grpo import GRPOState, make_grpo_step, uses_reference
from jaxrl_llm.algorithms.ppo import PPOState, make_ppo_step
from jaxrl_llm.algorithms.rm import make_rm_eval, make_rm_step
from jaxrl_llm.algorithms.sft import make_sft_step
from jaxrl_llm.config import Config
from jaxrl_llm.core import sft_loss
from jaxrl_llm.models import lora
from jaxrl_llm.run import multiturn
from jaxrl_llm.run.examples import pair_batch, sequence_batch, step_rows
from jaxrl_llm.run.keys import INIT, stream_key
from jaxrl_llm.run.multiturn import rollouts_of
from jaxrl_llm.run.policy import Policy, load_scalar, lora_parts, own_copy, reference_params, scalar_parts
from jaxrl_llm.run.rollouts import evaluation_rewards, reward_function, reward_model_reward
from jaxrl_llm.state import TrainState, make_optimizer


@dataclasses.dataclass
class Phase:
    """One algorithm's pieces, as the loop drives them."""

    state: Any
    step: Callable  # step(state, batch, key) -> (state, metrics), pure; the loop jits it
    make_batch: Callable[[Any, int], tuple[Any, dict]]  # (state, step) -> (batch, host metrics)
    policy_params: Callable[[Any], Any]  # the trained model's whole params (with LoRA: base + adapters)
    evaluate: Callable[[Any], dict] | None = None
    model_configs: tuple = ()  # every architecture in the state (PPO: critic, reward model), for placement
    # The step and each TrainState's optimizer (in tree order; None: the one policy's `optimizer`) under
    # another config of the same structure: a sweep traces them with each run's numbers as arrays.
    step_of: Callable[[Config], Callable] | None = None
    optimizers_of: Callable[[Config], list] | None = None
    rollouts: Any = None  # what samples the batches of an RL phase (`run.rollouts.Rollouts`)
    critic: Callable[[Any], Policy] | None = None  # PPO: the trained critic, exported beside the policy


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


def policy_state(config: Config, policy: Policy) -> TrainState:
    """The policy's train state: all its params, or with LoRA its adapters over the frozen base."""
    trained, frozen = lora_parts(config, policy, jax.random.fold_in(stream_key(config.seed, INIT), 4))
    return TrainState.create(trained, optimizer(config), frozen)


def sft_phase(config: Config, policy: Policy, train_set: list[dict], eval_set: list[dict]) -> Phase:
    """Masked next-token training on prompt/completion examples."""
    step_of = lambda c: make_sft_step(policy.config, num_microbatches=c.train.grad_accum)
    tokenizer = policy.tokenizer

    # With an environment the references are tool-use conversations whose loss sees the model's turns.
    envs = multiturn.EnvFactory(config, tokenizer) if config.env.enabled else None

    def batch_of(examples):
        if envs is None:
            return sequence_batch(tokenizer, examples, config)
        return multiturn.conversation_batch(config, policy, envs, examples)

    def make_batch(state, s):
        return batch_of(step_rows(train_set, config.data.batch_size, s, config)), {}

    eval_loss = jax.jit(lambda params, b: sft_loss(
        score_tokens(params, policy.config, b.tokens_BxT, b.mask_BxT), b.completion_mask_BxT
    ))

    eval_batch = []  # built at the first evaluation, then reused

    def evaluate(state):
        eval_batch[:] = eval_batch or [batch_of(eval_set)]
        return {"eval/loss": eval_loss(state.model_params(), eval_batch[0])}

    return Phase(
        policy_state(config, policy), step_of(config), make_batch, lambda st: st.model_params(), evaluate,
        step_of=step_of,
    )


def rm_phase(config: Config, policy: Policy, train_set: list[dict], eval_set: list[dict]) -> Phase:
    """Bradley–Terry training of a scalar head on the policy's backbone."""
    key = jax.random.fold_in(stream_key(config.seed, INIT), 1)
    trained, frozen = scalar_parts(policy.params, policy.config, key)
    step_of = lambda c: make_rm_step(policy.config, c.rm, c.train.grad_accum)
    evaluate_pairs = jax.jit(make_rm_eval(policy.config))
    tokenizer = policy.tokenizer

    def make_batch(state, s):
        return pair_batch(tokenizer, step_rows(train_set, config.data.batch_size, s, config), config), {}

    def evaluate(state):
        out = evaluate_pairs(state.model_params(), pair_batch(tokenizer, eval_set, config))
        return {"eval/accuracy": out["accuracy"], "eval/margin": out["margin"], "eval/loss": out["loss"]}

    state = TrainState.create(trained, optimizer(config), frozen)
    return Phase(
        state, step_of(config), make_batch, lambda st: st.model_params(), evaluate,
        step_of=step_of,
    )


def dpo_phase(config: Config, policy: Policy, train_set: list[dict], eval_set: list[dict]) -> Phase:
    """DPO against the frozen reference (the starting policy unless model.ref_path is set)."""
    step_of = lambda c: make_dpo_step(policy.config, c.dpo, c.train.grad_accum)
    tokenizer = policy.tokenizer

    def make_batch(state, s):
        return pair_batch(tokenizer, step_rows(train_set, config.data.batch_size, s, config), config), {}

    def eval_metrics(params, ref_params, batch):
        loss_B, out = pair_loss(params, ref_params, policy.config, batch, config.dpo)
        return {"eval/loss": loss_B.mean(), "eval/accuracy": out["rewards/accuracies"],
                "eval/margin": out["rewards/margins"]}

    eval_jit = jax.jit(eval_metrics)

    def evaluate(state):
        ref = reference_of(state.ref_params, state.policy)
        return eval_jit(state.policy.model_params(), ref, pair_batch(tokenizer, eval_set, config))

    state = DPOState(policy=policy_state(config, policy), ref_params=reference_params(config, policy))
    return Phase(
        state, step_of(config), make_batch, lambda st: st.policy.model_params(), evaluate,
        step_of=step_of,
    )


def grpo_phase(config: Config, policy: Policy, train_set: list[dict], eval_set: list[dict]) -> Phase:
    """GRPO and its variants on prompts scored by reward functions."""
    g = config.grpo
    ref = reference_params(config, policy) if uses_reference(g) else None
    answer_len = config.env.max_tokens if config.env.enabled else config.data.max_completion_len
    step_of = lambda c: make_grpo_step(
        policy.config, c.grpo, c.train.grad_accum, answer_len, correction=c.rollout_correction
    )
    # None: an environment class's own rewards are the whole reward (config.checks).
    reward = reward_function(config, policy, g.reward_functions, g.reward_weights) if g.reward_functions else None
    rollouts = rollouts_of(config)(config, policy, train_set, g.group_size, reward, dynamic=g.dynamic_sampling)
    state = GRPOState(policy=policy_state(config, policy), ref_params=ref)
    return Phase(
        state, step_of(config), lambda st, s: rollouts.batch(st.policy.model_params(), s),
        lambda st: st.policy.model_params(),
        lambda st: rollouts.evaluate(st.policy.model_params(), eval_set),
        step_of=step_of, rollouts=rollouts,
    )


def ppo_phase(config: Config, policy: Policy, train_set: list[dict], eval_set: list[dict]) -> Phase:
    """PPO with actor, critic, frozen reference and frozen reward model (seed design)."""
    key = jax.random.fold_in(stream_key(config.seed, INIT), 3)
    # Without a reward model an environment class scores the trajectories (config.checks).
    reward_model, rm_reward = reward_model_reward(config, policy) if config.model.reward_model_path else (None, None)
    actor = policy_state(config, policy)
    if config.model.critic_path:
        critic = load_scalar(config, config.model.critic_path, key)
        critic_config = critic.config.replace(lora=policy.config.lora)
        critic_trained, critic_frozen = critic.params, None
        if critic_config.lora is not None:  # the critic's own trunk under adapters, its head trained
            adapters = lora.init_adapters(critic_config, jax.random.fold_in(key, 1))
            critic_trained = {"model": adapters, "head": critic.params["head"]}
            critic_frozen = {"model": critic.params["model"]}
    else:
        critic_config = policy.config
        critic_trained, critic_frozen = scalar_parts(
            actor.params if actor.frozen is None else actor.frozen, policy.config, key
        )
    reward_config = reward_model.config if reward_model else None
    step_of = lambda c: make_ppo_step(
        policy.config, c.ppo, c.train.grad_accum, critic_config=critic_config, reward_config=reward_config,
        correction=c.rollout_correction,
    )
    rollouts = rollouts_of(config)(config, policy, train_set, 1, None)
    evaluator = rollouts
    if reward_model or any(field in train_set[0] for field in ("answer", "preference_target")):
        names, weights = evaluation_rewards(config, train_set[0])
        evaluation = reward_function(config, policy, names, weights, rm_reward)
        evaluator = rollouts_of(config)(config, policy, train_set, 1, evaluation)
    critic_state = TrainState.create(critic_trained, optimizer(config, lr=config.optim.critic_lr), critic_frozen)
    reward_params = own_copy(reward_model.params) if reward_model else None
    state = PPOState.create(actor, critic_state, reference_params(config, policy), reward_params, config.ppo.kl_coef)
    return Phase(
        state, step_of(config), lambda st, s: rollouts.batch(st.actor.model_params(), s),
        lambda st: st.actor.model_params(),
        lambda st: evaluator.evaluate(st.actor.model_params(), eval_set),
        tuple(c for c in (policy.config, critic_config, reward_config) if c is not None),
        step_of=step_of, optimizers_of=lambda c: [optimizer(c), optimizer(c, lr=c.optim.critic_lr)],
        rollouts=rollouts, critic=lambda st: Policy(critic_config, st.critic.model_params(), policy.tokenizer),
    )
