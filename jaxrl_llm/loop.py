"""The outer Python loop: data -> jitted step -> metrics -> checkpoint, for every algorithm.

Shapes: B rows, T tokens, P prompts per RL step, G samples per prompt.

Each algorithm is a `Phase`: an initial train state, a jitted `step(state, batch, key)`, a host
function that builds the batch of a given step (for RL it samples and scores a rollout), an
optional evaluation, and how to read the policy params out of the state. `train` runs any phase
with resumable checkpoints, JSONL metrics, a progress bar, an end-of-run export and plot.

Reproducibility: the batch of step s depends only on (seed, s) and its key is
`fold_in(key(seed), s)`, so a resumed run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import checkpoint, data, metrics as metrics_lib, rewards as rewards_lib, sharding, tokenizer as tok
from jaxrl_llm.algorithms.common import (
    learning_rate_schedule,
    make_optimizer,
    rollout_batch,
    scalar_scores,
    score_tokens,
)
from jaxrl_llm.algorithms.dpo import DPOState, make_dpo_step, pair_loss
from jaxrl_llm.algorithms.grpo import GRPOState, make_grpo_step, uses_reference
from jaxrl_llm.algorithms.ppo import PPOState, make_ppo_step
from jaxrl_llm.algorithms.rm import make_rm_eval, make_rm_step
from jaxrl_llm.algorithms.sft import make_sft_step
from jaxrl_llm.config import (
    REWARD_MODEL, Config, ConfigError, config_to_dict, load_config, resume_changes, save_config, validate,
)
from jaxrl_llm.core import sft_loss
from jaxrl_llm.models.hf import export_hf, init_scalar_params_from_lm, load_model, load_scalar_model
from jaxrl_llm.models.transformer import ModelConfig
from jaxrl_llm.sampling import SamplingConfig, generate
from jaxrl_llm.state import TrainState

STEP_STREAM, ROLLOUT_STREAM, RESAMPLE_STREAM, INIT_STREAM = range(4)  # independent key streams of a run
CONSOLE_METRICS = ("loss", "reward/mean", "accuracy", "kl", "eval/accuracy", "eval/reward")


class TrainingError(RuntimeError):
    """A run that cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


@dataclasses.dataclass
class Policy:
    """A model ready to train: architecture, params and tokenizer."""

    config: ModelConfig
    params: Any
    tokenizer: Any


@dataclasses.dataclass
class Phase:
    """One algorithm's pieces, as the loop drives them."""

    state: Any
    step: Callable
    make_batch: Callable[[Any, int], tuple[dict, dict]]
    policy_params: Callable[[Any], Any]
    evaluate: Callable[[Any], dict] | None = None
    model_configs: tuple = ()  # every architecture in the state (PPO: critic, reward model), for placement


@dataclasses.dataclass
class RunResult:
    """What a finished run leaves: its folder, the trained policy and the last metrics."""

    run_dir: str
    policy: Policy
    metrics: dict


# ---------------------------------------------------------------- models and tokens


def run_mesh(config: Config):
    """The run's device mesh (`mesh` section; -1 = the remaining devices)."""
    return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def model_numerics(config: Config) -> dict:
    """The model section's dtype, param_dtype, remat and attention, as ModelConfig fields."""
    m = config.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=m.attention)


def load_policy(config: Config, source: str | None = None) -> Policy:
    """The starting model, its params sharded on the run's mesh: the built-in tiny decoder with a
    character tokenizer, or a loaded one."""
    source = source or config.model.source
    mesh = run_mesh(config)
    model = config.model
    if source == "tiny":
        tokenizer = tok.char_tokenizer()
        tiny = model.tiny
        if tiny.vocab_size and tiny.vocab_size < len(tokenizer):
            raise ConfigError(
                f"model.tiny.vocab_size ({tiny.vocab_size}) is smaller than the character tokenizer's "
                f"{len(tokenizer)} tokens; raise it or leave it unset (null) to match the tokenizer."
            )
        model_config = ModelConfig(
            vocab_size=tiny.vocab_size or len(tokenizer), hidden_size=tiny.hidden_size,
            intermediate_size=tiny.intermediate_size, num_layers=tiny.num_layers,
            num_heads=tiny.num_heads, num_kv_heads=tiny.num_kv_heads, head_dim=tiny.head_dim,
            max_position_embeddings=tiny.max_position_embeddings, tie_word_embeddings=True,
            **model_numerics(config),
        )
        params = sharding.init_sharded(model_config, stream_key(config.seed, INIT_STREAM), mesh)
        return Policy(model_config, params, tokenizer)
    loaded = load_model(source, mesh=mesh, **model_numerics(config))
    if loaded.tokenizer is None:
        raise TrainingError(f"{source} has no tokenizer; training needs one to encode prompts.")
    return Policy(loaded.config, loaded.params, loaded.tokenizer)


def completion_ids(tokenizer, text: str) -> list[int]:
    """A completion's ids, ended with EOS so the model learns to stop."""
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


def sampling_config(config: Config, tokenizer, n: int, greedy: bool = False) -> SamplingConfig:
    """Sampler settings of a run: EOS and the configured extra stop ids end an answer."""
    s = config.sampling
    return SamplingConfig(
        max_new_tokens=config.data.max_completion_len, temperature=0.0 if greedy else s.temperature,
        top_k=s.top_k, top_p=s.top_p, n=n, pad_token_id=tokenizer.pad_token_id,
        stop_token_ids=tuple(dict.fromkeys((tokenizer.eos_token_id, *s.stop_token_ids))),
        bucket=s.prompt_bucket, bucket_size=s.prompt_bucket_size,
    )


def sequence_batch(tokenizer, examples: list[dict], config: Config, completion_field="completion") -> dict:
    """tokens/mask/completion_mask of [left-padded prompt | right-padded completion + EOS]."""
    d = config.data
    tokens, mask, completion = data.pad_prompt_completion(
        [e["prompt_ids"] for e in examples],
        [completion_ids(tokenizer, e[completion_field]) for e in examples],
        d.max_prompt_len, d.max_completion_len, tokenizer.pad_token_id,
    )
    return {"tokens": tokens, "mask": mask.astype(np.int32), "completion_mask": completion.astype(np.int32)}


def pair_batch(tokenizer, examples: list[dict], config: Config) -> dict:
    """chosen_* and rejected_* sequence batches padded to one common width."""
    chosen = sequence_batch(tokenizer, examples, config, "chosen")
    rejected = sequence_batch(tokenizer, examples, config, "rejected")
    width = max(chosen["tokens"].shape[1], rejected["tokens"].shape[1])
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))
    return {f"{name}_{key}": pad(value) for name, batch in (("chosen", chosen), ("rejected", rejected))
            for key, value in batch.items()}


def stream_key(seed: int, stream: int) -> jax.Array:
    """The base key of one purpose (steps, rollouts, resampling, inits), so no two purposes share keys."""
    return jax.random.fold_in(jax.random.key(seed), stream)


def _own_copy(tree):
    """A copy with its own buffers: the jitted step donates its state, so no two leaves may share one."""
    return jax.tree.map(jnp.copy, tree)


def reference_params(config: Config, policy: Policy):
    """The frozen reference: model.ref_path when set, else a copy of the starting policy (π_SFT)."""
    if config.model.ref_path:
        return load_policy(config, config.model.ref_path).params
    return _own_copy(policy.params)


def _rows(examples: list[dict], count: int, step: int, seed: int, shuffle: bool) -> list[dict]:
    return [examples[i] for i in data.batch_indices(len(examples), count, step, seed, shuffle)]


# ---------------------------------------------------------------- phases


def _optimizer(config: Config, lr: float | None = None, total_steps: int | None = None):
    o = config.optim
    return make_optimizer(
        o.lr if lr is None else lr, total_steps or config.train.total_steps, o.schedule, o.warmup_steps,
        o.weight_decay, o.b1, o.b2, o.eps, o.grad_clip,
    )


def sft_phase(config: Config, policy: Policy, train_set, eval_set) -> Phase:
    """Masked next-token training on prompt/completion examples."""
    step = make_sft_step(policy.config, num_microbatches=config.train.grad_accum)
    d = config.data

    def make_batch(state, s):
        return sequence_batch(policy.tokenizer, _rows(train_set, d.batch_size, s, config.seed, d.shuffle), config), {}

    eval_loss = jax.jit(lambda params, b: sft_loss(
        score_tokens(params, policy.config, b["tokens"], b["mask"]), b["completion_mask"]
    ))

    def evaluate(state):
        return {"eval/loss": eval_loss(state.params, sequence_batch(policy.tokenizer, eval_set, config))}

    state = TrainState.create(policy.params, _optimizer(config))
    return Phase(state, step, make_batch, lambda st: st.params, evaluate)


def rm_phase(config: Config, policy: Policy, train_set, eval_set) -> Phase:
    """Bradley–Terry training of a scalar head on the policy's backbone."""
    key = jax.random.fold_in(stream_key(config.seed, INIT_STREAM), 1)
    params = init_scalar_params_from_lm(_own_copy(policy.params), key, policy.config)
    step = make_rm_step(policy.config, config.train.grad_accum, config.rm.margin, config.rm.center_coef)
    evaluate_pairs = jax.jit(make_rm_eval(policy.config))
    d = config.data

    def make_batch(state, s):
        return pair_batch(policy.tokenizer, _rows(train_set, d.batch_size, s, config.seed, d.shuffle), config), {}

    def evaluate(state):
        out = evaluate_pairs(state.params, pair_batch(policy.tokenizer, eval_set, config))
        return {"eval/accuracy": out["accuracy"], "eval/margin": out["margin"], "eval/loss": out["loss"]}

    state = TrainState.create(params, _optimizer(config))
    return Phase(state, step, make_batch, lambda st: st.params, evaluate)


def dpo_phase(config: Config, policy: Policy, train_set, eval_set) -> Phase:
    """DPO against the frozen reference (the starting policy unless model.ref_path is set)."""
    ref = reference_params(config, policy)
    dpo = config.dpo
    step = make_dpo_step(policy.config, dpo.beta, dpo.loss, dpo.label_smoothing, config.train.grad_accum)
    d = config.data

    def make_batch(state, s):
        return pair_batch(policy.tokenizer, _rows(train_set, d.batch_size, s, config.seed, d.shuffle), config), {}

    def eval_metrics(params, ref_params, b):
        loss_B, out = pair_loss(params, ref_params, policy.config, b, dpo.beta, dpo.loss, dpo.label_smoothing)
        return {"eval/loss": loss_B.mean(), "eval/accuracy": out["rewards/accuracies"],
                "eval/margin": out["rewards/margins"]}

    eval_jit = jax.jit(eval_metrics)

    def evaluate(state):
        return eval_jit(state.policy.params, state.ref_params, pair_batch(policy.tokenizer, eval_set, config))

    state = DPOState(policy=TrainState.create(policy.params, _optimizer(config)), ref_params=ref)
    return Phase(state, step, make_batch, lambda st: st.policy.params, evaluate)


class Rollouts:
    """Samples G answers per prompt, decodes them and scores them with the reward functions
    (none: the step scores them, as PPO's reward model does)."""

    def __init__(self, config: Config, policy: Policy, examples: list[dict], group_size: int, reward_fn):
        self.config, self.policy, self.examples, self.group_size = config, policy, examples, group_size
        self.reward_fn = reward_fn
        self.sampling = sampling_config(config, policy.tokenizer, group_size)

    def sample(self, params, prompts: list[dict], key, sampling: SamplingConfig | None = None):
        """Completions, rewards [R] and per-function rewards of `prompts` (rows i·G + j)."""
        sampling = sampling or self.sampling
        out = generate(
            params, [e["prompt_ids"] for e in prompts], key, sampling, self.policy.config, run_mesh(self.config)
        )
        host = sharding.to_host(out)
        texts = tok.decode(self.policy.tokenizer, host.tokens_RxN, host.mask_RxN)
        if self.reward_fn is None:  # the step scores the rollout itself (PPO's reward model)
            return out, None, {}, texts
        rows = [e for e in prompts for _ in range(sampling.n)]
        fields = {name: [row.get(name) for row in rows] for name in rows[0] if name != "prompt"}
        total_R, parts = self.reward_fn([row["prompt"] for row in rows], texts, **fields)
        return out, total_R, parts, texts

    def batch(self, params, step: int) -> tuple[dict, dict]:
        """A rollout of the step's prompts; with dynamic sampling, groups whose rewards all tie are
        replaced by fresh prompts' groups, up to `dynamic_sampling_max_tries` rounds (DAPO)."""
        cfg, d = self.config, self.config.data
        P = d.batch_size // self.group_size
        key = jax.random.fold_in(stream_key(self.config.seed, ROLLOUT_STREAM), step)
        start = time.perf_counter()
        prompts = _rows(self.examples, P, step, cfg.seed, d.shuffle)
        out, total_R, parts, _ = self.sample(params, prompts, key)
        host = {f"reward/{name}": float(np.mean(v)) for name, v in parts.items()}
        dynamic = cfg.algorithm == "grpo" and cfg.grpo.dynamic_sampling
        if dynamic:
            out, total_R, tries = self._dynamic(params, prompts, out, total_R, step)
            host["dynamic_sampling/tries"] = tries
        host["time/generation"] = time.perf_counter() - start
        host["tokens/generated"] = float(sharding.to_host(out.lengths_R).sum())
        return dict(rollout_batch(out, total_R)), host

    def _dynamic(self, params, prompts, out, total_R, step):
        G = self.group_size
        informative = lambda r: np.flatnonzero(r.reshape(-1, G).std(axis=1) > 0)
        keep = [(out, total_R, i) for i in informative(np.asarray(total_R))]
        tries = 1
        while len(keep) < len(prompts) and tries < self.config.grpo.dynamic_sampling_max_tries:
            round_key = jax.random.fold_in(jax.random.fold_in(stream_key(self.config.seed, RESAMPLE_STREAM), step), tries)
            pick_key, sample_key = jax.random.split(round_key)
            picks = jax.random.choice(pick_key, len(self.examples), (len(prompts),), replace=False)
            more = [self.examples[int(i)] for i in picks]
            extra_out, extra_R, _, _ = self.sample(params, more, sample_key)
            keep += [(extra_out, extra_R, i) for i in informative(np.asarray(extra_R))]
            tries += 1
        # Too few informative groups after every try: fill with the first round's tied (zero-advantage)
        # groups, never one already kept.
        kept_first = {i for o, _, i in keep if o is out}
        keep += [(out, total_R, i) for i in range(len(prompts)) if i not in kept_first][: max(0, len(prompts) - len(keep))]
        keep = keep[: len(prompts)]
        rows = lambda i: slice(i * G, (i + 1) * G)
        pick = lambda field: jnp.concatenate([getattr(o, field)[rows(i)] for o, _, i in keep])
        width = max(o.prompt_tokens_RxP.shape[1] for o, _, _ in keep)
        left = lambda x: jnp.pad(x, ((0, 0), (width - x.shape[1], 0)))
        merged = out.replace(
            **{f: pick(f) for f in ("tokens_RxN", "logp_RxN", "mask_RxN", "lengths_R", "truncated_R")},
            prompt_tokens_RxP=jnp.concatenate([left(o.prompt_tokens_RxP[rows(i)]) for o, _, i in keep]),
            prompt_mask_RxP=jnp.concatenate([left(o.prompt_mask_RxP[rows(i)]) for o, _, i in keep]),
        )
        return merged, np.concatenate([np.asarray(r)[rows(i)] for _, r, i in keep]), tries

    def evaluate(self, params, eval_set: list[dict]) -> dict:
        """Greedy answers to the held-out prompts: mean reward, exact-answer accuracy, length."""
        return self.evaluate_answers(params, eval_set)[0]

    def evaluate_answers(
        self, params, eval_set: list[dict], temperature: float = 0.0, n: int = 1
    ) -> tuple[dict, list[str]]:
        """`evaluate`'s metrics and the answers themselves; greedy unless `temperature` > 0 (then `n`
        samples per prompt, rows i·n + j, from a fixed key)."""
        sampling = dataclasses.replace(self.sampling, temperature=temperature, n=n if temperature > 0 else 1)
        out, total_R, parts, texts = self.sample(params, eval_set, jax.random.key(0), sampling)
        result = {"eval/reward": float(np.mean(total_R)), "eval/response_length": float(np.mean(sharding.to_host(out.lengths_R)))}
        result.update({f"eval/{name}": float(np.mean(v)) for name, v in parts.items()})
        if "arithmetic_exact" in parts:
            result["eval/accuracy"] = float(np.mean(parts["arithmetic_exact"] > 0))
        return result, texts


def reward_model_function(config: Config, policy: Policy):
    """(reward model, reward function scoring prompt + completion with it at the last token)."""
    reward_model = load_scalar_model(
        config.model.reward_model_path, mesh=run_mesh(config), **model_numerics(config)
    )
    score = jax.jit(lambda params, tokens, mask: scalar_scores(params, reward_model.config, tokens, mask)[1])

    def rm_reward(prompts, completions, prompt_ids, **fields):
        # The prompt ids the policy saw (truncated by data.prompt_overflow, if at all), then the
        # answer with EOS: scored at EOS, as the reward model was trained (`pair_batch`).
        ids = [list(p) + completion_ids(policy.tokenizer, c) for p, c in zip(prompt_ids, completions)]
        width = data.bucket_length(max(map(len, ids)), config.data.max_prompt_len + config.data.max_completion_len + 1)
        tokens, mask = data.left_pad(ids, width, policy.tokenizer.pad_token_id)
        return np.asarray(score(reward_model.params, tokens, mask.astype(np.int32)))

    return reward_model, rm_reward


def reward_function(config: Config, policy: Policy):
    """The weighted sum of GRPO's reward functions (`reward_model` scores with model.reward_model_path)."""
    registry = rewards_lib.REGISTRY
    if REWARD_MODEL in config.grpo.reward_functions:
        registry = {**registry, REWARD_MODEL: reward_model_function(config, policy)[1]}
    return rewards_lib.combine(config.grpo.reward_functions, config.grpo.reward_weights, registry)


def grpo_phase(config: Config, policy: Policy, train_set, eval_set) -> Phase:
    """GRPO and its variants on prompts scored by reward functions."""
    g = config.grpo
    ref = reference_params(config, policy) if uses_reference(g) else None
    step = make_grpo_step(
        policy.config, g, config.sampling.temperature, config.train.grad_accum, config.data.max_completion_len
    )
    rollouts = Rollouts(config, policy, train_set, g.group_size, reward_function(config, policy))
    state = GRPOState(policy=TrainState.create(policy.params, _optimizer(config)), ref_params=ref)
    return Phase(
        state, step, lambda st, s: rollouts.batch(st.policy.params, s), lambda st: st.policy.params,
        lambda st: rollouts.evaluate(st.policy.params, eval_set),
    )


def ppo_phase(config: Config, policy: Policy, train_set, eval_set) -> Phase:
    """PPO with actor, critic, frozen reference and frozen reward model (seed design)."""
    p = config.ppo
    key = jax.random.fold_in(stream_key(config.seed, INIT_STREAM), 3)
    reward_model, rm_reward = reward_model_function(config, policy)
    if config.model.critic_path:
        critic = load_scalar_model(
            config.model.critic_path, key, mesh=run_mesh(config), **model_numerics(config)
        )
        critic_config, critic_params = critic.config, critic.params
    else:
        critic_config = policy.config
        critic_params = init_scalar_params_from_lm(_own_copy(policy.params), key, policy.config)
    ref = reference_params(config, policy)
    step = make_ppo_step(
        policy.config, p, config.sampling.temperature, config.train.grad_accum,
        critic_config=critic_config, reward_config=reward_model.config,
    )
    registry = {**rewards_lib.REGISTRY, REWARD_MODEL: rm_reward}
    eval_names = (REWARD_MODEL, "preference_score") if "preference_target" in train_set[0] else (REWARD_MODEL,)
    rollouts = Rollouts(config, policy, train_set, 1, None)
    evaluator = Rollouts(config, policy, train_set, 1, rewards_lib.combine(list(eval_names), None, registry))
    actor = TrainState.create(policy.params, _optimizer(config))
    critic_state = TrainState.create(critic_params, _optimizer(config, lr=config.optim.critic_lr))
    state = PPOState.create(actor, critic_state, ref, _own_copy(reward_model.params), p.kl_coef)
    return Phase(
        state, step, lambda st, s: rollouts.batch(st.actor.params, s), lambda st: st.actor.params,
        lambda st: evaluator.evaluate(st.actor.params, eval_set),
        (policy.config, critic_config, reward_model.config),
    )


PHASES = {"sft": sft_phase, "rm": rm_phase, "dpo": dpo_phase, "grpo": grpo_phase, "ppo": ppo_phase}


# ---------------------------------------------------------------- the loop


def prepare_examples(config: Config, tokenizer) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples with prompt ids fitted to the budget."""
    d = config.data
    examples = data.load_examples(d, config.algorithm, config.seed)
    examples = data.tokenize_prompts(
        examples, lambda prompt: tok.prompt_ids(tokenizer, prompt), d.max_prompt_len, d.prompt_overflow
    )
    return data.split_eval(examples, d.eval_size, config.seed)


def _finite_or_raise(step: int, row: dict) -> None:
    bad = [name for name, value in row.items() if not math.isfinite(value)]
    if bad:
        raise TrainingError(
            f"step {step}: non-finite {', '.join(bad)}; stopping before saving, so the last checkpoint "
            "stays good. Lower optim.lr, raise optim.grad_clip's strictness, or check the data."
        )


def _tokens(batch: dict) -> float:
    """Real tokens a step processed (prompt + completion; both answers of a pair)."""
    masks = [value for name, value in batch.items() if name.endswith("mask") and "completion" not in name]
    return float(sum(jnp.sum(mask) for mask in masks))  # a device sum: masks may span hosts


def _progress(total: int, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, dynamic_ncols=True, mininterval=1.0, leave=True)


def train(config: Config, policy: Policy | None = None, quiet: bool = False) -> RunResult:
    """Run `config` to the end (resuming when asked), leaving metrics, checkpoints, plot and export."""
    m = config.mesh
    sharding.initialize_distributed(m.coordinator_address, m.num_processes, m.process_id)
    mesh = run_mesh(config)  # raises if the mesh does not fit the devices
    os.makedirs(config.run_dir, exist_ok=True)
    if policy is None:
        policy = load_policy(config)
    # The batch must split over the resolved data × fsdp (a -1 is only known now).
    resolved = dataclasses.replace(m, data=mesh.shape["data"], fsdp=mesh.shape["fsdp"], tensor=mesh.shape["tensor"])
    validate(dataclasses.replace(config, mesh=resolved), policy.config.max_position_embeddings)
    _check_stop_ids(config, policy.config.vocab_size)
    if config.algorithm in ("grpo", "ppo") and config.train.sft_warmup_steps > 0:
        policy = sft_warmup(config, policy, quiet)
    config_path = os.path.join(config.run_dir, "config.yaml")
    if config.train.resume and os.path.exists(config_path):
        _warn_of_changes(config_path, config)
    if jax.process_index() == 0:
        save_config(config, config_path)
    train_set, eval_set = prepare_examples(config, policy.tokenizer)
    phase = PHASES[config.algorithm](config, policy, train_set, eval_set)
    if not eval_set:  # data.eval_size=0 holds nothing out, so there is nothing to evaluate on
        phase = dataclasses.replace(phase, evaluate=None)
    return run_phase(config, phase, policy, quiet)


def _warn_of_changes(saved_path: str, config: Config) -> None:
    """Warn when a resumed run's config differs from the one it was started with (seed, data, lr...)."""
    try:
        changes = resume_changes(load_config(saved_path), config)
    except ConfigError:  # written by another version: nothing to compare field by field
        return
    if changes:
        warnings.warn(
            f"resuming {config.run_dir} with a config that differs from its saved config.yaml in "
            f"{'; '.join(changes)}. The continued run follows the new values (data order, updates), so it "
            "will not match a run made in one go; start a new run_dir to keep runs comparable.",
            stacklevel=2,
        )


def _check_stop_ids(config: Config, vocab_size: int) -> None:
    """sampling.stop_token_ids are ids of this model's vocabulary (checked before any training)."""
    bad = [t for t in config.sampling.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(
            f"sampling.stop_token_ids {bad} are not token ids of this model (0 to {vocab_size - 1}); "
            "a stop token outside the vocabulary could never end an answer."
        )


def sft_warmup(config: Config, policy: Policy, quiet: bool) -> Policy:
    """The SFT warm start of an RL run, in RUN_DIR/sft_warmup (resumed or reused when present)."""
    t = config.train
    warm = dataclasses.replace(
        config, algorithm="sft", run_dir=os.path.join(config.run_dir, "sft_warmup"),
        optim=dataclasses.replace(config.optim, lr=t.sft_warmup_lr or config.optim.lr),
        train=dataclasses.replace(
            t, total_steps=t.sft_warmup_steps, sft_warmup_steps=0, export_hf=False, resume=True,
            checkpoint_every=t.sft_warmup_steps,
        ),
    )
    if not quiet:
        print(f"SFT warm start: {t.sft_warmup_steps} steps in {warm.run_dir}")
    return train(warm, policy, quiet).policy


def run_phase(config: Config, phase: Phase, policy: Policy, quiet: bool = False) -> RunResult:
    """The step loop of one phase: resume, step, log, evaluate, checkpoint, and finish."""
    t = config.train
    manager = checkpoint.checkpoint_manager(os.path.join(config.run_dir, "checkpoints"), t.keep_checkpoints)
    mesh = run_mesh(config)
    shardings = sharding.tree_shardings(phase.state, mesh, phase.model_configs or (policy.config,))
    state, start = sharding.place(phase.state, shardings), 0
    if t.resume:
        restored = checkpoint.restore_latest(manager, state)
        if restored is not None:
            last_saved, state, _ = restored
            start = last_saved + 1
    elif manager.latest_step() is not None:
        raise TrainingError(
            f"{manager.directory} already holds checkpoints (latest step {manager.latest_step()}); set "
            "train.resume=true to continue that run, or choose another run_dir."
        )
    before = {}
    if phase.evaluate and t.eval_every and start == 0:
        before = {f"before/{k}": v for k, v in phase.evaluate(state).items()}
    step_fn = sharding.jit_step(phase.step, mesh, shardings)
    o = config.optim
    lr_at = learning_rate_schedule(o.lr, t.total_steps, o.schedule, o.warmup_steps)
    main = jax.process_index() == 0  # one writer per run, however many processes
    writer = metrics_lib.MetricsWriter(config.run_dir, t.tensorboard, start) if main else None
    base_key = stream_key(config.seed, STEP_STREAM)
    bar = None if quiet else _progress(t.total_steps, start)
    row, done = {}, start - 1  # `done`: the last step whose update is in `state`
    meta = lambda s: {"step": s, "algorithm": config.algorithm, "config": config_to_dict(config)}
    try:
        for step in range(start, t.total_steps):
            batch, host = phase.make_batch(state, step)
            began = time.perf_counter()
            state, out = step_fn(state, batch, jax.random.fold_in(base_key, step))
            done = step
            out = jax.device_get(out)
            host["time/train"] = time.perf_counter() - began
            host["lr"] = float(lr_at(step))
            host["tokens_per_s"] = _tokens(batch) / (host["time/train"] + host.get("time/generation", 0.0))
            if phase.evaluate and t.eval_every and (step + 1) % t.eval_every == 0:
                host.update(phase.evaluate(state))
            evaluated = any(name.startswith("eval/") for name in host)
            row = {name: float(np.asarray(value)) for name, value in {**out, **host}.items()}
            _finite_or_raise(step, row)
            if step % t.log_every == 0 or evaluated or step == t.total_steps - 1:
                if writer is not None:
                    writer.write(step, row)
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
                checkpoint.save(manager, step, state, meta(step))
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{row[k]:.3g}" for k in CONSOLE_METRICS if k in row}, refresh=False)
    except KeyboardInterrupt:
        if done >= start and manager.latest_step() != done:
            checkpoint.save(manager, done, state, meta(done))
        print(f"\ninterrupted: step {done} is saved in {manager.directory}; resume with train.resume=true")
        raise
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    if done >= start and manager.latest_step() != done:
        checkpoint.save(manager, done, state, meta(done))
    if phase.evaluate and start < t.total_steps:
        row.update(phase.evaluate(state))
    if start >= t.total_steps:  # finished before (a resumed run, a reused warm start): keep its summary
        row = _saved_summary(config.run_dir)
    row.update(before)
    trained = dataclasses.replace(policy, params=phase.policy_params(state))
    finish(config, trained, row, quiet)
    return RunResult(config.run_dir, trained, row)


def _saved_summary(run_dir: str) -> dict:
    """RUN_DIR/summary.json of an earlier run, or {}."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def finish(config: Config, policy: Policy, last: dict, quiet: bool) -> None:
    """Export to RUN_DIR/hf if asked, draw RUN_DIR/metrics.png, write and print the summary
    (files are written by process 0 of a multi-host run)."""
    params = sharding.to_host(policy.params) if config.train.export_hf else None  # every process joins
    if jax.process_index() != 0:
        return
    if config.train.export_hf:
        export_hf(params, os.path.join(config.run_dir, "hf"), policy.config, policy.tokenizer)
    summary = {k: float(v) for k, v in last.items()}
    with open(os.path.join(config.run_dir, "summary.json"), "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=2)
    try:  # after summary.json, whose before-training evaluation starts the eval curves
        metrics_lib.plot_runs([config.run_dir], os.path.join(config.run_dir, "metrics.png"))
    except ValueError:
        pass  # nothing plottable was logged (e.g. zero steps run)
    if not quiet:
        print(f"\n{config.algorithm} run in {config.run_dir}")
        for name in sorted(summary):
            if name.startswith(("eval/", "reward/mean", "loss", "kl")):
                was = summary.get(f"before/{name}")
                print(f"  {name:28s} {summary[name]:.4g}" + ("" if was is None else f"   (before: {was:.4g})"))
