"""Every rule a configuration must satisfy, each raising one `ConfigError` that names the field and
the fix, before anything compiles.

`check_common` runs the rules that hold for every run; the run layer's registry adds the ones that
belong to the chosen algorithm (`check_batch`, `check_task_fields`, `check_rewards`,
`check_reward_model`) and, once the model is loaded, `check_model_facts`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

from jaxrl_llm import metrics, rewards
from jaxrl_llm.config.schema import Config
from jaxrl_llm.data import TASK_FIELDS
from jaxrl_llm.errors import ConfigError, RewardError, did_you_mean
from jaxrl_llm.models.transformer import PROJECTIONS, LoraConfig
from jaxrl_llm.rewards import REWARD_MODEL

_POSITIVE = (
    "model.tiny.vocab_size", "model.tiny.hidden_size", "model.tiny.intermediate_size", "model.tiny.num_layers",
    "model.tiny.num_heads", "model.tiny.num_kv_heads", "model.tiny.head_dim", "model.tiny.max_position_embeddings",
    "data.max_prompt_len", "data.max_completion_len", "data.batch_size", "data.bucket_size",
    "data.synthetic.num_examples", "data.synthetic.digits", "optim.lr", "optim.critic_lr", "optim.eps",
    "optim.grad_clip", "sampling.temperature", "grpo.std_eps", "grpo.sapo_tau_pos", "grpo.sapo_tau_neg",
    "grpo.cispo_eps_max", "grpo.num_iterations", "grpo.num_minibatches", "grpo.dynamic_sampling_max_tries",
    "grpo.overlong_buffer", "ppo.epochs", "ppo.num_minibatches", "ppo.value_clip", "ppo.kl_target",
    "ppo.kl_horizon", "ppo.reward_clip", "dpo.beta", "train.total_steps", "train.grad_accum", "train.log_every",
    "train.keep_checkpoints", "train.sft_warmup_lr", "train.sft_warmup_batch_size", "optim.decay_steps",
    "model.lora.alpha", "env.max_turns", "env.max_tokens", "env.tool_timeout", "env.workers",
)
_NON_NEGATIVE = (
    "seed", "data.eval_size", "optim.warmup_steps", "optim.weight_decay", "sampling.top_k", "grpo.eps_high",
    "grpo.gspo_eps_high", "grpo.kl_coef", "ppo.vf_coef", "ppo.kl_coef", "ppo.entropy_coef", "ppo.missing_stop_penalty",
    "rm.margin", "rm.center_coef", "sampling.slots", "sampling.staleness", "train.eval_every", "train.checkpoint_every",
    "train.sft_warmup_steps", "model.lora.rank",
)
# (fields, test, requirement, why); a None value (a feature turned off) passes.
_RULES = (
    (_POSITIVE, lambda v: v > 0, "must be > 0", ""),
    (_NON_NEGATIVE, lambda v: v >= 0, "must be >= 0", ""),
    (("optim.b1", "optim.b2"), lambda v: 0 <= v < 1, "must be in [0, 1)", ""),
    (("sampling.top_p",), lambda v: 0 < v <= 1, "must be in (0, 1]", "1.0 turns nucleus sampling off"),
    (("grpo.eps_low", "grpo.gspo_eps_low", "ppo.eps"), lambda v: 0 <= v < 1, "must be in [0, 1)",
     "the ratio's lower clip bound is 1 - eps"),
    (("grpo.dual_clip",), lambda v: v > 1, "must be > 1", "verl uses 3.0; null turns dual clipping off"),
    (("grpo.group_size",), lambda v: v >= 2, "must be >= 2", "the baseline is the mean of the prompt's group"),
    (("ppo.gamma", "ppo.lam"), lambda v: 0 <= v <= 1, "must be in [0, 1]", ""),
    (("rollout_correction.is_cap", "rollout_correction.mask_high"), lambda v: v >= 1, "must be >= 1",
     "a ratio of 1 (no mismatch) must pass untouched"),
    (("rollout_correction.mask_low",), lambda v: 0 <= v <= 1, "must be in [0, 1]", "verl uses 1/mask_high"),
    (("dpo.label_smoothing",), lambda v: 0 <= v < 0.5, "must be in [0, 0.5)", "robust DPO divides by 1 - 2ε"),
    (("model.lora.dropout",), lambda v: 0 <= v < 1, "must be in [0, 1)", "PEFT's lora_dropout"),
)


def _get(config, path: str):
    """The value at a dotted path."""
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _leaves(section, prefix: str = ""):
    """(dotted path, value) of every leaf of a config or section."""
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", value


def _round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= value."""
    return -(-value // multiple) * multiple


def _check_finite(config: Config) -> None:
    """No float is inf or nan (YAML reads .inf, and 1e400 overflows to it)."""
    for path, value in _leaves(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path} must be a finite number, got {value!r}.")
        if isinstance(value, tuple) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ConfigError(f"{path} must hold finite numbers, got {list(value)!r}.")


def _check_ranges(config: Config) -> None:
    """Impossible values: negative rates and sizes, probabilities outside their interval."""
    for paths, test, requirement, why in _RULES:
        for path in paths:
            value = _get(config, path)
            if value is not None and not test(value):
                raise ConfigError(f"{path} {requirement}, got {value!r}" + (f"; {why}." if why else "."))


def _check_mesh(config: Config) -> None:
    """Mesh sizes are positive, with at most one -1; multi-host fields come together."""
    m = config.mesh
    sizes = {"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name} must be a positive size or -1 (the remaining devices), got {size}.")
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1 (the remaining devices).")
    distributed = (m.coordinator_address, m.num_processes, m.process_id)
    if any(v is not None for v in distributed) and any(v is None for v in distributed):
        raise ConfigError(
            "a multi-host run needs mesh.coordinator_address, mesh.num_processes and mesh.process_id "
            "together (or none of them, to let JAX detect the cluster)."
        )
    if m.num_processes is not None and not 0 <= m.process_id < m.num_processes:
        raise ConfigError(f"mesh.process_id must be in [0, mesh.num_processes={m.num_processes}), got {m.process_id}.")


def _check_lengths(config: Config, max_positions: int | None) -> None:
    """Prompt plus completion fit the model's positions; the overlong buffer fits the completion."""
    data = config.data
    if max_positions is None and config.model.source == "tiny":
        max_positions = config.model.tiny.max_position_embeddings
    # A multi-turn trajectory's answer is everything after the prompt: env.max_tokens.
    answer = "env.max_tokens" if config.env.enabled else "data.max_completion_len"
    answer_len = config.env.max_tokens if config.env.enabled else data.max_completion_len
    total = data.max_prompt_len + answer_len
    if max_positions is not None and total > max_positions:
        raise ConfigError(
            f"data.max_prompt_len + {answer} = {total} exceeds the model's {max_positions} "
            f"positions; lower them so they sum to at most {max_positions}."
        )
    grpo = config.grpo
    if grpo.overlong_shaping and grpo.overlong_buffer >= answer_len:
        raise ConfigError(
            f"grpo.overlong_buffer ({grpo.overlong_buffer}) must be below {answer} ({answer_len}): the "
            "penalty ramps over the last overlong_buffer tokens; DAPO uses a fifth."
        )


def _check_model(config: Config) -> None:
    """The tiny model's heads group evenly; cuDNN attention computes in half precision."""
    tiny = config.model.tiny
    if config.model.attention == "cudnn" and config.model.dtype == "float32":
        raise ConfigError(
            "model.attention=cudnn needs half-precision compute: set model.dtype=bfloat16 (keep "
            "model.param_dtype=float32 for fp32 master weights), or use model.attention=xla."
        )
    if config.model.source == "tiny" and tiny.num_heads % tiny.num_kv_heads:
        raise ConfigError(
            f"model.tiny.num_heads ({tiny.num_heads}) must be a multiple of model.tiny.num_kv_heads "
            f"({tiny.num_kv_heads})."
        )


def _check_lora(config: Config) -> None:
    """LoRA's targets name projections; its other fields need a rank; the adapters' start exists."""
    lora = config.model.lora
    if lora.rank == 0:
        changed = [name for name in ("quantize", "init_from") if getattr(lora, name) is not None]
        if changed:
            raise ConfigError(
                f"model.lora.{changed[0]} needs LoRA: set model.lora.rank (e.g. 16) to train adapters on the "
                "frozen base, or unset it for full fine-tuning."
            )
        return
    as_model = LoraConfig(lora.rank, lora.alpha, lora.dropout, lora.targets, lora.rslora)
    for target in lora.targets:
        try:
            re.compile(target)
        except re.error as error:
            raise ConfigError(f"model.lora.targets: {target!r} is not a valid pattern ({error}).") from None
    if not any(as_model.targets_module(name) for name in PROJECTIONS):
        raise ConfigError(
            f"model.lora.targets {list(lora.targets)} match none of the projections {', '.join(PROJECTIONS)}; "
            "name some of them, use 'all-linear', or a pattern such as '(q|v)_proj'."
        )
    if lora.init_from is not None and not os.path.isfile(os.path.join(lora.init_from, "adapter_config.json")):
        raise ConfigError(
            f"model.lora.init_from: {lora.init_from!r} holds no adapter_config.json; pass a PEFT adapter folder "
            "(one saved by peft's save_pretrained, or a run's RUN_DIR/adapter)."
        )


def _check_env(config: Config) -> None:
    """Multi-turn rollouts: for GRPO, PPO and SFT; tools only with kind tools, and then at least one."""
    env = config.env
    if env.enabled and config.algorithm not in ("sft", "grpo", "ppo"):
        raise ConfigError(
            f"env.kind={env.kind!r} needs algorithm grpo or ppo (multi-turn rollouts) or sft (reference "
            f"conversations), not {config.algorithm!r}; set env.kind=none."
        )
    if env.kind == "tools" and not env.tools:
        raise ConfigError("env.kind=tools needs env.tools: built-in names (calculator) or module:function paths.")
    if env.tools and env.kind != "tools":
        raise ConfigError(f"env.tools is set but env.kind is {env.kind!r}; set env.kind=tools to use them.")
    if env.per_turn_rewards and config.algorithm == "grpo":
        raise ConfigError(
            "env.per_turn_rewards places rewards at each turn's end for PPO's GAE; GRPO's advantages are per "
            "trajectory (it sums the rewards): set env.per_turn_rewards=false."
        )
    if env.kind not in ("none", "tools") and ":" not in env.kind and "." not in env.kind:
        raise ConfigError(f"env.kind must be none, tools or an environment class as module:Class, got {env.kind!r}.")


def _check_data_source(config: Config) -> None:
    """data.task names a built-in task (with room for a training split), a .jsonl path or hf:<dataset>."""
    data = config.data
    if data.task in TASK_FIELDS:
        if data.eval_size >= data.synthetic.num_examples:
            raise ConfigError(
                f"data.eval_size ({data.eval_size}) leaves no training examples out of data.synthetic.num_examples "
                f"({data.synthetic.num_examples}); lower data.eval_size."
            )
    elif not (data.task.startswith("hf:") or data.task.endswith(".jsonl")):
        raise ConfigError(
            f"data.task {data.task!r} is not a built-in task ({', '.join(TASK_FIELDS)}), a .jsonl path or "
            f"hf:<dataset>{did_you_mean(data.task, TASK_FIELDS)}"
        )


def _check_policy_loss(config: Config) -> None:
    """Switches of one policy loss are not set for another, where they would be ignored."""
    g = config.grpo
    if g.dual_clip is not None and g.loss != "ppo":
        raise ConfigError(
            f"grpo.dual_clip applies to grpo.loss=ppo only; grpo.loss={g.loss} ignores it. Set "
            "grpo.dual_clip=null, or grpo.loss=ppo."
        )


def check_common(config: Config, max_positions: int | None = None) -> None:
    """Every rule that holds whatever the algorithm; raises ConfigError.

    `max_positions` is the model's position limit when known (the tiny model's is in the config).
    """
    _check_finite(config)
    _check_ranges(config)
    _check_mesh(config)
    _check_lengths(config, max_positions)
    _check_model(config)
    _check_lora(config)
    _check_env(config)
    _check_data_source(config)
    _check_policy_loss(config)
    _check_trackers(config)


def _check_trackers(config: Config) -> None:
    """Each tracker listed once, and its package installed (before anything compiles)."""
    trackers = config.logging.trackers
    if len(set(trackers)) != len(trackers):
        raise ConfigError(f"logging.trackers {list(trackers)} lists one twice; list each once.")
    missing = list(filter(None, map(metrics.tracker_missing, trackers)))
    if missing:
        raise ConfigError(missing[0] + " (or drop it from logging.trackers)")


# ---------------------------------------------------------------- rules of one algorithm (run.registry)


def check_batch(config: Config, section: str | None) -> None:
    """The batch splits evenly into groups, minibatches, microbatches and data-parallel shards;
    `section` is the algorithm's config section (its group_size and num_minibatches, if any)."""
    settings = getattr(config, section) if section else None
    batch = config.data.batch_size
    group = getattr(settings, "group_size", 1)
    if batch % group:
        raise ConfigError(
            f"data.batch_size ({batch}) must be a multiple of {section}.group_size ({group}): it counts completions, "
            f"group_size per prompt; set data.batch_size={_round_up(batch, group)}."
        )
    if 0 < config.sampling.slots < group:
        raise ConfigError(
            f"sampling.slots ({config.sampling.slots}) must be 0 (static batching) or at least {section}.group_size "
            f"({group}): a prompt's samples are admitted together; set sampling.slots={group} or more."
        )
    minibatches = getattr(settings, "num_minibatches", 1)
    if batch % minibatches:
        raise ConfigError(
            f"data.batch_size ({batch}) must be a multiple of {section}.num_minibatches ({minibatches}); "
            f"set data.batch_size={_round_up(batch, minibatches)}."
        )
    minibatch, accum = batch // minibatches, config.train.grad_accum
    if minibatch % accum:
        raise ConfigError(
            f"train.grad_accum ({accum}) must divide the minibatch of {minibatch} sequences "
            f"(data.batch_size / num_minibatches); pick a divisor of {minibatch}."
        )
    shards = config.mesh.data * config.mesh.fsdp
    if shards > 0 and (minibatch // accum) % shards:
        raise ConfigError(
            f"the microbatch of {minibatch // accum} sequences must split over mesh.data × mesh.fsdp = {shards} "
            f"devices; change data.batch_size, train.grad_accum or the mesh."
        )


def check_task_fields(config: Config, required: tuple[str, ...]) -> None:
    """A built-in task carries the example fields the algorithm needs."""
    task = config.data.task
    missing = [name for name in required if task in TASK_FIELDS and name not in TASK_FIELDS[task]]
    if missing:
        can = [name for name, fields in TASK_FIELDS.items() if set(required) <= set(fields)]
        raise ConfigError(
            f"data.task {task!r} has no {', '.join(missing)} fields, which {config.algorithm} needs; use "
            f"data.task={can[0] if can else '<a .jsonl file>'} or a .jsonl file with {', '.join(required)} fields."
        )


def check_rewards(config: Config) -> None:
    """GRPO's reward functions resolve, are distinct, and their weights line up; there is at least one
    unless an environment class gives the rewards."""
    grpo = config.grpo
    if not grpo.reward_functions and config.env.kind in ("none", "tools"):
        raise ConfigError("grpo.reward_functions is empty; name at least one, e.g. [arithmetic_exact].")
    if grpo.reward_weights is not None and len(grpo.reward_weights) != len(grpo.reward_functions):
        raise ConfigError(
            f"grpo.reward_weights has {len(grpo.reward_weights)} entries for {len(grpo.reward_functions)} "
            "grpo.reward_functions; give one weight per function or null for all 1.0."
        )
    twice = sorted({name for name in grpo.reward_functions if grpo.reward_functions.count(name) > 1})
    if twice:
        raise ConfigError(
            f"grpo.reward_functions lists {', '.join(twice)} more than once; list it once with a larger "
            "grpo.reward_weights entry."
        )
    for i, name in enumerate(grpo.reward_functions):
        if name == REWARD_MODEL:
            if config.model.reward_model_path is None:
                raise ConfigError(
                    f"grpo.reward_functions[{i}] is {REWARD_MODEL!r}: set model.reward_model_path to a "
                    "reward model (a run of configs/rm.yaml, e.g. runs/rm/hf)."
                )
            continue
        try:
            rewards.resolve(name)
        except RewardError as error:
            raise ConfigError(f"grpo.reward_functions[{i}]: {error}") from None
        if name == "math_answer":
            _check_math_answer(config, i)


def _check_math_answer(config: Config, i: int) -> None:
    """math-verify is installed, and scores on the main thread, where its timeout works."""
    try:
        rewards.require_math_verify()
    except RewardError as error:
        raise ConfigError(f"grpo.reward_functions[{i}]: {error}") from None
    if config.sampling.overlap:
        # Overlapped rollouts are scored on a worker thread, where math-verify's signal-based timeout is off,
        # and one answer such as \boxed{9^{9^{9}}} can keep sympy busy for good.
        raise ConfigError(f"grpo.reward_functions[{i}] is math_answer, whose timeout needs the main thread, and "
                          "sampling.overlap=true scores rollouts on a worker thread; set sampling.overlap=false.")


def check_reward_model(config: Config) -> None:
    """A frozen reward model is set (PPO scores every rollout with it), unless an environment class
    gives the rewards."""
    if config.model.reward_model_path is None and config.env.kind in ("none", "tools"):
        raise ConfigError(
            f"model.reward_model_path is required for {config.algorithm}: the frozen reward model scores each "
            "rollout; train one with configs/rm.yaml and set model.reward_model_path to its run."
        )


def check_model_facts(config: Config, vocab_size: int, max_positions: int, samples: bool) -> None:
    """What needs the loaded model and the devices: the lengths fit its positions, cuDNN attention
    has a GPU and, for an algorithm that samples, every stop id is one of its tokens."""
    _check_lengths(config, max_positions)
    if config.model.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(
            f"model.attention=cudnn runs on an NVIDIA GPU only; this machine's JAX backend is "
            f"{jax.default_backend()!r}. Use model.attention=xla here."
        )
    bad = [t for t in config.sampling.stop_token_ids if not 0 <= t < vocab_size]
    if samples and bad:
        raise ConfigError(
            f"sampling.stop_token_ids {bad} are not token ids of this model (0 to {vocab_size - 1}); "
            "a stop token outside the vocabulary could never end an answer."
        )
