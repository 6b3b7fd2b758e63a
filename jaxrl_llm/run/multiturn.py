"""Multi-turn runs (`env` section): the run's environment factory, rollouts whose answers are whole
trajectories (model turns scored, environment turns context only), and the SFT batches of reference
tool-use conversations for a warm start.

Shapes: R trajectories, P prompt tokens, W = env.max_tokens tokens after the prompt.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import jax
import numpy as np

from jaxrl_llm.algorithms.batches import SequenceBatch
from jaxrl_llm.config import Config
from jaxrl_llm.envs.base import ToolEnvironment
from jaxrl_llm.envs.calculator import BUILTIN_TOOLS
from jaxrl_llm.envs.episodes import (
    DONE,
    Episode,
    EpisodeLimits,
    ReplaySampler,
    TurnSampler,
    episode_metrics,
    run_episodes,
    start_episodes,
)
from jaxrl_llm.envs.tools import ToolRunner, detect_format, format_tool_calls, import_object, lists_tools
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.padding import pad, pad_bucketed
from jaxrl_llm.run.examples import bucketing
from jaxrl_llm.run.policy import Policy, run_mesh
from jaxrl_llm.run.rollouts import Rollouts
from jaxrl_llm.sampling import Completions, SamplingConfig


def limits(config: Config) -> EpisodeLimits:
    return EpisodeLimits(config.env.max_turns, config.env.max_tokens, config.data.max_prompt_len)


def tool_format(config: Config, tokenizer) -> str:
    """env.tool_format, or the one the chat template implies."""
    if config.env.tool_format != "auto":
        return config.env.tool_format
    return detect_format(tokenizer.chat_template)


class EnvFactory:
    """Makes one environment per trajectory; holds the thread pools of tool calls and env steps."""

    def __init__(self, config: Config, tokenizer):
        env = config.env
        self.pool = concurrent.futures.ThreadPoolExecutor(env.workers, thread_name_prefix="jaxrl-env")
        if env.kind == "tools":
            tools = {name: BUILTIN_TOOLS[name] if name in BUILTIN_TOOLS else import_object(name, "env.tools entry")
                     for name in env.tools}
            tools = {getattr(fn, "__name__", name): fn for name, fn in tools.items()}
            self.format = tool_format(config, tokenizer)
            self.runner = ToolRunner(tools, env.tool_timeout, env.workers)
            lists = lists_tools(tokenizer.chat_template)
            ToolEnvironment(tools, self.runner, self.format, lists)  # schemas checked before anything compiles
            self.make = lambda: ToolEnvironment(tools, self.runner, self.format, lists)
        else:
            self.format, self.runner = None, None
            self.make = import_object(env.kind, "env.kind")
            if not callable(self.make):
                raise ConfigError(f"env.kind {env.kind!r} must name an environment class (module:Class).")

    def __call__(self):
        return self.make()


def episode_completions(episodes: list[Episode], config: Config, pad_id: int, temperature: float) -> Completions:
    """Trajectories as the sampler's output: prompts left-padded to a bucket, the rest right-padded to
    env.max_tokens (one shape for every batch), the model's tokens marked in `sampled_mask_RxN`."""
    W = config.env.max_tokens
    prompt_RxP, prompt_mask_RxP = pad_bucketed([e.prompt_ids for e in episodes], bucketing(config), pad_id,
                                               cap=config.data.max_prompt_len)
    tokens_RxW, mask_RxW = pad([e.tokens for e in episodes], W, pad_id, left=False)
    sampled_RxW, _ = pad([[int(s) for s in e.sampled] for e in episodes], W, 0, left=False)
    logp_RxW = np.zeros((len(episodes), W), np.float32)
    for r, e in enumerate(episodes):
        logp_RxW[r, :len(e.logps)] = e.logps
    return Completions(
        tokens_RxN=tokens_RxW.astype(np.int32), logp_RxN=logp_RxW, mask_RxN=mask_RxW.astype(np.int32),
        lengths_R=np.array([len(e.tokens) for e in episodes], np.int32),
        truncated_R=np.array([e.ended != DONE for e in episodes]),
        prompt_tokens_RxP=prompt_RxP.astype(np.int32), prompt_mask_RxP=prompt_mask_RxP.astype(np.int32),
        logp_temperature=temperature, sampled_mask_RxN=sampled_RxW.astype(np.int32),
    )


class EnvRollouts(Rollouts):
    """Rollouts whose answers are trajectories: G per prompt (rows i·G + j), all advanced turn by turn;
    a trajectory's reward is its environment's summed reward plus the reward functions on its last reply
    (with env.per_turn_rewards, PPO's batch carries each step's reward at its turn's last token instead)."""

    def __init__(self, config: Config, policy: Policy, examples: list[dict], group_size: int, reward_fn,
                 dynamic: bool = False):
        super().__init__(config, policy, examples, group_size, reward_fn, dynamic)
        self.envs = EnvFactory(config, policy.tokenizer)
        self.limits = limits(config)
        self.last_metrics, self.last_episodes = {}, []

    def sample(self, params, prompts: list[dict], key, sampling: SamplingConfig | None = None, rollout: bool = False):
        sampling = sampling or self.sampling
        model_config = self.rollout_config if rollout else self.policy.config
        rows = [e for e in prompts for _ in range(sampling.n)]
        tokenizer = self.policy.tokenizer
        episodes = start_episodes(rows, self.envs, tokenizer, self.limits)
        # One trajectory per row: row r draws as `generate`'s row r (n = 1 over the repeated prompts).
        cache_len = self.limits.max_prompt_len + self.limits.max_tokens + 1
        sampler = TurnSampler(params, dataclasses.replace(sampling, n=1), model_config, len(rows), cache_len,
                              run_mesh(self.config))
        run_episodes(sampler, episodes, tokenizer, self.limits, key, self.envs.pool)
        out = episode_completions(episodes, self.config, tokenizer.pad_token_id, sampling.temperature or 1.0)
        texts = [e.final_text for e in episodes]
        # Per-turn rewards go to the batch's tokens instead (`batch`), not into the trajectory's reward.
        env_R = np.array([0.0 if self.config.env.per_turn_rewards else e.reward for e in episodes], np.float32)
        self.last_metrics, self.last_episodes = episode_metrics(episodes), episodes
        if self.reward_fn is None:
            return out, env_R, {}, texts
        total_R, parts = self.score(rows, texts)
        return out, np.asarray(total_R, np.float32) + env_R, parts, texts

    def batch(self, params, step: int):
        batch, host = super().batch(params, step)
        if self.config.env.per_turn_rewards:  # PPO (config.checks), whose batch is the last sample
            token_rewards_RxT = np.zeros(batch.tokens_RxT.shape, np.float32)
            for r, episode in enumerate(self.last_episodes):
                for t, reward in episode.turn_rewards:
                    token_rewards_RxT[r, batch.prompt_width + t] += reward
            batch = batch.replace(token_rewards_RxT=token_rewards_RxT)
        return batch, {**host, **self.last_metrics}

    def evaluate_answers(self, params, eval_set: list[dict], temperature: float = 0.0, n: int = 1):
        metrics, texts = super().evaluate_answers(params, eval_set, temperature, n)
        return {**metrics, **{f"eval/{k.removeprefix('env/')}": v for k, v in self.last_metrics.items()}}, texts


def rollouts_of(config: Config) -> type[Rollouts]:
    """Single answers, or with an environment (`env` section) whole multi-turn trajectories."""
    return EnvRollouts if config.env.enabled else Rollouts


def conversation_batch(config: Config, policy: Policy, envs: EnvFactory, examples: list[dict]) -> SequenceBatch:
    """The reference conversations of `examples` as SFT sequences whose loss sees the model's turns
    only. An example's model turns are its `replies` (texts, in order) or a call of its `tool_calls`,
    then its `completion`; the environment answers each turn, as in a rollout (tools really run)."""
    tokenizer = policy.tokenizer
    replies = [_reference_replies(e, envs.format) for e in examples]
    stop_id = tokenizer.eos_token_id
    episodes = start_episodes(examples, envs, tokenizer, limits(config))
    run_episodes(ReplaySampler(tokenizer, replies, stop_id), episodes, tokenizer, limits(config),
                 jax.random.key(0), envs.pool)
    out = episode_completions(episodes, config, tokenizer.pad_token_id, 1.0)
    return SequenceBatch(
        tokens_BxT=np.concatenate([out.prompt_tokens_RxP, out.tokens_RxN], axis=1),
        mask_BxT=np.concatenate([out.prompt_mask_RxP, out.mask_RxN], axis=1),
        completion_mask_BxT=np.concatenate([np.zeros_like(out.prompt_mask_RxP), out.sampled_mask_RxN], axis=1),
    )


def _reference_replies(example: dict, tool_format: str | None) -> list[str]:
    """The example's `replies`, or a call of its `tool_calls` (neither: it answers at once), then its `completion`."""
    if "replies" in example:
        return list(example["replies"]) + [example["completion"]]
    calls = example.get("tool_calls") or []
    return [format_tool_calls(calls, tool_format)] * bool(calls) + [example["completion"]]
