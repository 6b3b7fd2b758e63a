"""Rollouts: G sampled answers per prompt, decoded and scored by reward functions on the host, with
DAPO's dynamic sampling; greedy or sampled evaluation on held-out prompts; the reward functions a
run scores with (the reward model among them).

Shapes: P prompts, G samples per prompt, R = P·G rows (sample j of prompt i at row i·G + j),
N new tokens, T tokens.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from jaxrl_llm import rewards as rewards_lib
from jaxrl_llm import sharding
from jaxrl_llm import tokenizer as tok
from jaxrl_llm.algorithms.batches import RolloutBatch
from jaxrl_llm.algorithms.common import scalar_scores
from jaxrl_llm.config import Config
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.models.precision import rollout_config, rollout_weights
from jaxrl_llm.padding import pad_bucketed, widen
from jaxrl_llm.rewards import REWARD_MODEL
from jaxrl_llm.run.examples import bucketing, completion_ids, step_rows
from jaxrl_llm.run.keys import RESAMPLE, ROLLOUT, stream_key
from jaxrl_llm.run.policy import Policy, load_scalar, run_mesh
from jaxrl_llm.sampling import Completions, SamplingConfig, generate


def sampling_config(config: Config, tokenizer, n: int) -> SamplingConfig:
    """Sampler settings of a run: EOS and the configured extra stop ids end an answer (unless
    `sampling.ignore_eos`), prompts padded by the run's bucketing."""
    s = config.sampling
    stops = () if s.ignore_eos else tuple(dict.fromkeys((tokenizer.eos_token_id, *s.stop_token_ids)))
    return SamplingConfig(
        max_new_tokens=config.data.max_completion_len, temperature=s.temperature,
        top_k=s.top_k, top_p=s.top_p, n=n, pad_token_id=tokenizer.pad_token_id, stop_token_ids=stops,
        bucketing=bucketing(config), slots=s.slots,
    )


class Rollouts:
    """Samples G answers per prompt, decodes them and scores them with `reward_fn` (None: the step
    scores them, as PPO's reward model does); `dynamic` turns on DAPO's dynamic sampling."""

    def __init__(self, config: Config, policy: Policy, examples: list[dict], group_size: int, reward_fn,
                 dynamic: bool = False):
        self.config, self.policy, self.examples, self.group_size = config, policy, examples, group_size
        self.reward_fn, self.dynamic = reward_fn, dynamic
        self.sampling = sampling_config(config, policy.tokenizer, group_size)
        self.weights_dtype = config.sampling.weights_dtype
        self.rollout_config = rollout_config(policy.config, self.weights_dtype)

    def rollout_weights(self, params):
        """The params a step's rollouts sample with (`models.precision`): made once per step."""
        return rollout_weights(params, self.policy.config, self.weights_dtype)

    def sample(self, params, prompts: list[dict], key, sampling: SamplingConfig | None = None, rollout: bool = False):
        """(completions, rewards [R] or None, per-function rewards, texts) of `prompts` (rows i·n + j);
        `rollout`: `params` are the step's `rollout_weights`, else the policy's own."""
        sampling = sampling or self.sampling
        model_config = self.rollout_config if rollout else self.policy.config
        out = generate(params, [e["prompt_ids"] for e in prompts], key, sampling, model_config, run_mesh(self.config))
        return (out, *self.scored(prompts, out, sampling.n))

    def scored(self, prompts: list[dict], out: Completions, n: int):
        """(rewards [R] or None, per-function rewards, texts) of `prompts`' sampled answers, n each."""
        host = sharding.to_host(out)
        texts = tok.decode(self.policy.tokenizer, host.tokens_RxN, host.mask_RxN)
        if self.reward_fn is None:
            return None, {}, texts
        total_R, parts = self.score([e for e in prompts for _ in range(n)], texts)
        return total_R, parts, texts

    def score(self, rows: list[dict], texts: list[str]):
        """(total_R, per-function rewards) of answers `texts` to the examples `rows`, one per row."""
        fields = {name: [row.get(name) for row in rows] for name in rows[0] if name != "prompt"}
        return self.reward_fn([row["prompt"] for row in rows], texts, **fields)

    def step_prompts(self, step: int) -> tuple[list[dict], jax.Array]:
        """(prompts, sampling key) of step `step`: functions of (seed, step) alone."""
        P = self.config.data.batch_size // self.group_size
        key = jax.random.fold_in(stream_key(self.config.seed, ROLLOUT), step)
        return step_rows(self.examples, P, step, self.config), key

    def batch(self, params, step: int) -> tuple[RolloutBatch, dict]:
        """The rollout of step `step`'s prompts and its host metrics (reward parts, generation time)."""
        start = time.perf_counter()
        prompts, key = self.step_prompts(step)
        rollout_params = self.rollout_weights(params)
        out, total_R, parts, _ = self.sample(rollout_params, prompts, key, rollout=True)
        return self.finish(lambda: rollout_params, prompts, out, total_R, parts, step, start)

    def finish(self, params_of, prompts, out: Completions, total_R, parts: dict, step: int, start: float):
        """`batch`'s result from the first round's samples; DAPO's further rounds sample with the
        rollout weights `params_of()`."""
        host = {f"reward/{name}": float(np.mean(v)) for name, v in parts.items()}
        if self.dynamic:
            out, total_R, host["dynamic_sampling/tries"] = self._dynamic(params_of(), prompts, out, total_R, step)
        host["time/generation"] = time.perf_counter() - start
        sampled = out.lengths_R if out.sampled_mask_RxN is None else out.sampled_mask_RxN
        host["tokens/generated"] = float(np.sum(sharding.to_host(sampled)))
        return RolloutBatch.from_completions(out, total_R), host

    def _dynamic(self, params, prompts, out, total_R, step):
        """DAPO's dynamic sampling: groups whose rewards all tie are replaced by fresh prompts' groups,
        up to `grpo.dynamic_sampling_max_tries` rounds; what is still missing is filled with the first
        round's tied (zero-advantage) groups, never one already kept."""
        G = self.group_size
        informative = lambda r: np.flatnonzero(np.asarray(r).reshape(-1, G).std(axis=1) > 0)
        keep = [(out, total_R, i) for i in informative(total_R)]
        tries = 1
        while len(keep) < len(prompts) and tries < self.config.grpo.dynamic_sampling_max_tries:
            round_key = jax.random.fold_in(jax.random.fold_in(stream_key(self.config.seed, RESAMPLE), step), tries)
            pick_key, sample_key = jax.random.split(round_key)
            picks = jax.random.choice(pick_key, len(self.examples), (len(prompts),), replace=False)
            extra_out, extra_R, _, _ = self.sample(
                params, [self.examples[int(i)] for i in picks], sample_key, rollout=True
            )
            keep += [(extra_out, extra_R, i) for i in informative(extra_R)]
            tries += 1
        kept_first = {i for o, _, i in keep if o is out}
        tied = [(out, total_R, i) for i in range(len(prompts)) if i not in kept_first]
        keep += tied[: max(0, len(prompts) - len(keep))]
        keep = [(sharding.to_host(o), np.asarray(r), i) for o, r, i in keep[: len(prompts)]]
        rows = lambda i: slice(i * G, (i + 1) * G)
        width = max(o.prompt_tokens_RxP.shape[1] for o, _, _ in keep)
        pick = lambda field: np.concatenate([getattr(o, field)[rows(i)] for o, _, i in keep])
        prompt = lambda field, value: np.concatenate(
            [widen(getattr(o, field)[rows(i)], width, left=True, value=value) for o, _, i in keep]
        )
        fields = ["tokens_RxN", "logp_RxN", "mask_RxN", "lengths_R", "truncated_R"]
        fields += ["sampled_mask_RxN"] if out.sampled_mask_RxN is not None else []
        merged = Completions(
            **{f: pick(f) for f in fields},
            prompt_tokens_RxP=prompt("prompt_tokens_RxP", self.sampling.pad_token_id),
            prompt_mask_RxP=prompt("prompt_mask_RxP", 0), logp_temperature=out.logp_temperature,
        )
        return merged, np.concatenate([r[rows(i)] for _, r, i in keep]), tries

    def evaluate(self, params, eval_set: list[dict]) -> dict:
        """Greedy answers to the held-out prompts: mean reward, exact-answer accuracy, length."""
        return self.evaluate_answers(params, eval_set)[0]

    def evaluate_answers(
        self, params, eval_set: list[dict], temperature: float = 0.0, n: int = 1
    ) -> tuple[dict, list[str]]:
        """`evaluate`'s metrics and the answers themselves; greedy unless `temperature` > 0 (then `n`
        samples per prompt, rows i·n + j, from a fixed key)."""
        n = n if temperature > 0 else 1
        # Slots hold whole prompts (n samples each): at least n of them when continuous batching is on.
        slots = self.sampling.slots and max(self.sampling.slots, n)
        sampling = dataclasses.replace(self.sampling, temperature=temperature, n=n, slots=slots)
        out, total_R, parts, texts = self.sample(params, eval_set, jax.random.key(0), sampling)
        result = {
            "eval/reward": float(np.mean(total_R)),
            "eval/response_length": float(np.mean(sharding.to_host(out.lengths_R))),
        }
        result.update({f"eval/{name}": float(np.mean(v)) for name, v in parts.items()})
        exact = [name for name in ("arithmetic_exact", "math_answer") if name in parts]
        if exact:  # the share of answers a verifier accepts
            result["eval/accuracy"] = float(np.mean(parts[exact[0]] > 0))
        return result, texts


def reward_model_reward(config: Config, policy: Policy):
    """(reward model, reward function scoring prompt + completion with it at the last token)."""
    reward_model = load_scalar(config, config.model.reward_model_path)
    score = jax.jit(lambda params, tokens, mask: scalar_scores(params, reward_model.config, tokens, mask)[1])
    d = config.data

    def rm_reward(prompts, completions, prompt_ids, **fields):
        # The prompt ids the policy saw (truncated by data.prompt_overflow, if at all), then the
        # answer with EOS: scored at EOS, as the reward model was trained (`examples.pair_batch`).
        ids = [list(p) + completion_ids(policy.tokenizer, c) for p, c in zip(prompt_ids, completions)]
        cap = d.max_prompt_len + d.max_completion_len + 1
        tokens, mask = pad_bucketed(ids, bucketing(config), policy.tokenizer.pad_token_id, left=True, cap=cap)
        return np.asarray(score(reward_model.params, tokens, mask.astype(np.int32)))

    return reward_model, rm_reward


def reward_function(config: Config, policy: Policy, names, weights=None, rm_reward=None):
    """The weighted sum of the named reward functions; `reward_model` scores with `rm_reward`, or with
    model.reward_model_path loaded here."""
    registry = rewards_lib.REGISTRY
    if REWARD_MODEL in names:
        registry = {**registry, REWARD_MODEL: rm_reward or reward_model_reward(config, policy)[1]}
    return rewards_lib.combine(names, weights, registry)


def evaluation_rewards(config: Config, example: dict) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
    """(names, weights) of what held-out answers are scored with when the algorithm names no reward
    functions: the truth the examples carry (`answer`: the exact answer; `preference_target`: the
    hidden preference) and, when model.reward_model_path is set, the reward model, whose score is
    then the reward, the truth beside it at weight 0."""
    truth = tuple(name for field, name in (("answer", "arithmetic_exact"), ("preference_target", "preference_score"))
                  if field in example)
    if config.model.reward_model_path is not None:
        return (REWARD_MODEL, *truth), (1.0,) + (0.0,) * len(truth)
    if not truth:
        raise ConfigError(
            "nothing to score held-out answers with: the examples have no `answer` or `preference_target` "
            "field; set model.reward_model_path, or data.eval_size=0 to train without evaluating."
        )
    return truth, None
