"""Run configuration: typed frozen dataclasses, YAML presets, dotted overrides and validation.

A `Config` holds one frozen dataclass per section; every leaf is an int, float, bool, str, enum
(`Literal`), tuple or None, so a config is hashable (a valid static jit argument) and saves to
YAML and loads back equal. `load_config` reads a preset (with optional `base: other.yaml`
inheritance), applies `key.sub=value` overrides and validates, so a mistake surfaces as one
`ConfigError` naming the field and the fix before anything compiles.

Defaults follow the papers and ../shared/ALGORITHMS.md; presets in configs/ select the variants.
"""

import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any, Literal

import yaml

ALGORITHMS = ("sft", "rm", "ppo", "grpo", "dpo")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")  # models.transformer's
ATTENTION_KINDS = ("xla", "cudnn")  # models.transformer's
POLICY_LOSSES = ("ppo", "gspo", "gspo_token", "sapo", "cispo")  # core.losses.POLICY_KINDS
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "full")
KL_PLACEMENTS = ("loss", "reward", "none")
ADV_SCALINGS = ("group", "batch", "none")
STD_KINDS = ("bessel", "population")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "cdpo")
OPTIMIZERS = ("adamw",)
SCHEDULES = ("constant", "linear", "cosine")
PROMPT_OVERFLOW = ("error", "truncate", "skip")
OPERATORS = ("+", "-", "*")
# Built-in synthetic tasks and the algorithms their examples can feed.
SYNTHETIC_TASKS = {"arithmetic": ("sft", "grpo", "ppo"), "preference": ALGORITHMS}


class ConfigError(ValueError):
    """A bad configuration; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """Dimensions of the built-in tiny random decoder (`model.source: tiny`)."""

    vocab_size: int | None = None  # None: the size of the tiny model's tokenizer
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 1024


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The policy's weights and numerics, and the checkpoints of the frozen or extra models."""

    source: str = "tiny"  # an HF folder, a .gguf file, a hub id, or "tiny"
    tiny: TinyModel = dataclasses.field(default_factory=TinyModel)
    dtype: Literal[DTYPES] = "float32"
    param_dtype: Literal[DTYPES] = "float32"
    remat: Literal[REMAT_POLICIES] = "none"
    # cudnn: cuDNN flash attention for training, scoring and prefill (NVIDIA GPU, bf16/fp16 dtype)
    attention: Literal[ATTENTION_KINDS] = "xla"
    ref_path: str | None = None  # None: the initial policy (model.source), i.e. π_SFT
    reward_model_path: str | None = None  # PPO's frozen RM (a run of configs/rm.yaml)
    # None: the policy's backbone with a fresh value head (seed design, verl); TRL and OpenRLHF
    # start the critic from the reward model instead.
    critic_path: str | None = None


@dataclasses.dataclass(frozen=True)
class SyntheticSection:
    """Knobs of the built-in synthetic tasks."""

    num_examples: int = 10000
    digits: int = 2  # arithmetic operands are drawn from [0, 10**digits)
    operators: tuple[Literal[OPERATORS], ...] = ("+",)
    preference_target: str = "a"  # the hidden preference: more of this substring wins


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Where examples come from, their field names, length budgets and batch size."""

    task: str = "arithmetic"  # a built-in task (SYNTHETIC_TASKS), a .jsonl path or hf:<dataset>
    split: str = "train"  # the split of an hf: dataset
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    apply_chat_template: bool = False  # wrap plain-text prompts as one user message
    max_prompt_len: int = 256
    max_completion_len: int = 512  # TRL GRPO
    prompt_overflow: Literal[PROMPT_OVERFLOW] = "error"  # truncate keeps the last tokens
    # Sequences per optimizer step: completions for GRPO (prompts × group_size), pairs for RM/DPO.
    batch_size: int = 64
    eval_size: int = 64  # examples held out for evaluation
    shuffle: bool = True
    synthetic: SyntheticSection = dataclasses.field(default_factory=SyntheticSection)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW and its learning-rate schedule."""

    optimizer: Literal[OPTIMIZERS] = "adamw"
    lr: float = 1e-6  # DeepSeekMath GRPO, DAPO, TRL GRPO
    critic_lr: float = 1e-5  # PPO's separate critic optimizer (verl, OpenRLHF)
    schedule: Literal[SCHEDULES] = "constant"  # decays reach 0 at train.total_steps
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global norm; None turns it off


@dataclasses.dataclass(frozen=True)
class SamplingSection:
    """Generation knobs; max_new_tokens is data.max_completion_len and n is grpo.group_size."""

    temperature: float = 1.0  # TRL GRPO; log-probs are computed at the same temperature
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    stop_token_ids: tuple[int, ...] = ()  # in addition to the tokenizer's EOS
    # Prompts are left-padded to a bucket so a stream of batches compiles a few shapes: the next
    # power of two >= prompt_bucket_size ("pow2", fewest compiles) or the next multiple of it
    # ("multiple", least padding).
    prompt_bucket: Literal["pow2", "multiple"] = "pow2"
    prompt_bucket_size: int = 16


@dataclasses.dataclass(frozen=True)
class GRPOSection:
    """GRPO and the variants that are switches on it (DAPO, GSPO, SAPO, CISPO, Dr. GRPO)."""

    group_size: int = 8  # G samples per prompt (TRL num_generations)
    loss: Literal[POLICY_LOSSES] = "ppo"
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO clip-higher: 0.28
    dual_clip: float | None = None  # c > 1 caps the loss where A < 0 (verl uses 3.0)
    gspo_eps_low: float = 3e-4  # GSPO paper's sequence-ratio range
    gspo_eps_high: float = 4e-4
    sapo_tau_pos: float = 1.0  # SAPO paper
    sapo_tau_neg: float = 1.05
    cispo_eps_max: float = 5.0  # TRL's recommendation
    aggregation: Literal[AGGREGATIONS] = "seq_mean_token_mean"  # DeepSeekMath; DAPO: token_mean
    adv_scaling: Literal[ADV_SCALINGS] = "group"  # Dr. GRPO: none
    std: Literal[STD_KINDS] = "bessel"  # TRL, verl, OpenRLHF; the seed design writes population
    std_eps: float = 1e-4  # TRL
    kl_coef: float = 0.04  # β of DeepSeekMath; TRL now defaults to 0, verl recommends 0.001
    kl_estimator: Literal[KL_ESTIMATORS] = "k3"  # DeepSeekMath
    # loss: β·KL in the loss (DeepSeekMath); reward: subtracted from each answer's reward before
    # the group baseline (seed design); none: no reference model.
    kl_placement: Literal[KL_PLACEMENTS] = "loss"
    num_iterations: int = 1  # μ policy updates per batch (TRL)
    num_minibatches: int = 1
    dynamic_sampling: bool = False  # DAPO: keep groups whose rewards are not all equal
    dynamic_sampling_max_tries: int = 10  # verl max_num_gen_batches
    overlong_shaping: bool = False  # DAPO soft overlong punishment
    overlong_buffer: int = 128  # L_cache; DAPO uses 4096 of 20480 tokens, about a fifth
    overlong_filtering: bool = False  # DAPO: truncated answers are masked out of the loss
    reward_functions: tuple[str, ...] = ("arithmetic_exact",)  # registry names or module:function
    reward_weights: tuple[float, ...] | None = None  # None: all 1.0


@dataclasses.dataclass(frozen=True)
class PPOSection:
    """PPO with a learned critic and a frozen reward model."""

    epochs: int = 4  # TRL, OpenAI; verl uses 1
    num_minibatches: int = 1  # TRL
    eps: float = 0.2
    value_clip: float | None = 0.2  # ε_v (TRL, OpenAI; verl and OpenRLHF 0.5); None: plain ½(V − R)²
    vf_coef: float = 0.1  # TRL, OpenAI
    gamma: float = 1.0  # TRL, OpenAI
    lam: float = 0.95  # TRL, OpenAI; verl and OpenRLHF use 1.0
    kl_coef: float = 0.05  # TRL
    kl_estimator: Literal[KL_ESTIMATORS] = "full"  # the seed design's exact per-step KL; TRL: k1
    adaptive_kl: bool = False  # Ziegler et al. 2019 controller
    kl_target: float = 6.0  # nats, sequence-summed (Ziegler et al. 2019)
    kl_horizon: int = 10000  # Ziegler et al. 2019
    whiten_advantages: bool = True
    entropy_coef: float = 0.0  # off in TRL, verl and OpenRLHF
    missing_stop_penalty: float | None = None  # subtracted from the score without EOS (TRL)
    reward_clip: float | None = 10.0  # |RM score| cap (OpenRLHF)


@dataclasses.dataclass(frozen=True)
class DPOSection:
    """Direct preference optimization against a frozen reference."""

    beta: float = 0.1  # DPO paper, TRL
    loss: Literal[DPO_LOSSES] = "sigmoid"
    label_smoothing: float = 0.0  # ε of robust DPO and cDPO


@dataclasses.dataclass(frozen=True)
class RMSection:
    """Bradley–Terry reward-model training."""

    margin: float = 0.0
    center_coef: float = 0.0  # TRL recommends 0.01 when used


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Length of the run, accumulation, logging, evaluation and checkpoints."""

    total_steps: int = 1000
    grad_accum: int = 1  # microbatches per minibatch
    log_every: int = 1
    eval_every: int = 100  # 0: never
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 3
    resume: bool = False
    export_hf: bool = False  # write the final policy to RUN_DIR/hf
    tensorboard: bool = False
    # SFT steps on the task's reference completions before an RL algorithm starts, so a random
    # tiny model can earn reward (default.yaml).
    sft_warmup_steps: int = 0
    sft_warmup_lr: float | None = None  # None: optim.lr


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh sizes (-1 takes the remaining devices) and, for multi-host runs, how to reach
    the coordinator (unset: single process, or JAX's auto-detection under SLURM, MPI or a TPU pod)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run."""

    algorithm: Literal[ALGORITHMS] = "grpo"
    seed: int = 0
    run_dir: str = "runs/default"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    grpo: GRPOSection = dataclasses.field(default_factory=GRPOSection)
    ppo: PPOSection = dataclasses.field(default_factory=PPOSection)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
    rm: RMSection = dataclasses.field(default_factory=RMSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)


# YAML 1.1 reads 1e-6 (no dot) as a string; read it as a float, as YAML 1.2 does.
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads exponent floats without a dot (1e-6) as floats."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings `_Loader` would read as floats."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))

_SCALAR_NAMES = {
    int: ("an int", "ints"), float: ("a float", "floats"), bool: ("a bool", "bools"), str: ("a string", "strings")
}


def _describe(tp, plural=False) -> str:
    """What a type hint accepts, in words: 'an int', 'a list of floats or null', ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return ("values from " if plural else "one of ") + ", ".join(map(str, args))
    if origin is tuple:
        return "a list of " + _describe(args[0], plural=True)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args if arg is not type(None)) + " or null"
    if dataclasses.is_dataclass(tp):
        return "a mapping of its fields"
    return _SCALAR_NAMES[tp][plural]


def _suggest(word: str, candidates) -> str:
    """'; did you mean X?' for the closest candidate, or '.'."""
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else "."


def _all_paths(cls, prefix="") -> list[str]:
    """Every dotted field path of a section class."""
    paths = []
    for field in dataclasses.fields(cls):
        path = prefix + field.name
        paths.append(path)
        if dataclasses.is_dataclass(field.type):
            paths += _all_paths(field.type, path + ".")
    return paths


def _unknown_key(path: str, names: list[str], prefix: str) -> ConfigError:
    """The error for an unknown key, with the closest sibling or a same-named key elsewhere."""
    leaf = path[len(prefix):]
    close = difflib.get_close_matches(leaf, names, n=1)
    elsewhere = [p for p in _all_paths(Config) if p.rsplit(".", 1)[-1] == leaf]
    if close:
        hint = f"did you mean {prefix + close[0]!r}?"
    elif elsewhere:
        hint = f"did you mean {elsewhere[0]!r}?"
    else:
        hint = f"valid keys{' of ' + prefix[:-1] if prefix else ''}: {', '.join(names)}."
    return ConfigError(f"unknown key {path!r}, {hint}")


def _coerce(tp, value, path: str, expected=None):
    """`value` checked against type hint `tp`: sections built, lists made tuples, ints widened to floats."""
    expected = expected or tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _build(tp, value, path + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(inner, value, path, expected)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ConfigError(f"{path} must be {_describe(tp)}, got {value!r}{_suggest(str(value), args)}")
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_coerce(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in _SCALAR_NAMES and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path} must be {_describe(expected)}, got {value!r}.")


def _build(cls, values: dict, prefix: str):
    """A section instance from a mapping; missing keys take their defaults."""
    names = [field.name for field in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise _unknown_key(f"{prefix}{key}", names, prefix)
    hints = typing.get_type_hints(cls)
    return cls(**{key: _coerce(hints[key], value, prefix + key) for key, value in values.items()})


def config_from_dict(values: dict) -> Config:
    """A Config from nested dicts, rejecting unknown keys, wrong types and bad enum values."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {values!r}.")
    return _build(Config, values, "")


def config_to_dict(config) -> dict:
    """Nested dicts and lists (YAML-ready) of a Config or one of its sections."""
    if dataclasses.is_dataclass(config):
        return {field.name: config_to_dict(getattr(config, field.name)) for field in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [config_to_dict(item) for item in config]
    return config


# What a resumed run may change without changing what it computes (besides how long it runs).
RESUMABLE = ("run_dir", "mesh.", "train.total_steps", "train.resume", "train.eval_every", "train.log_every",
             "train.checkpoint_every", "train.tensorboard", "train.export_hf")


def _flat(values: dict, prefix: str = "") -> dict:
    """{"a.b": value} of nested sections."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_changes(saved: Config, config: Config) -> list[str]:
    """`field: saved -> now` for the fields a resumed run changes that alter what it computes
    (other algorithms' sections and RESUMABLE fields aside)."""
    others = tuple(f"{name}." for name in ALGORITHMS if name != config.algorithm)
    old, new = _flat(config_to_dict(saved)), _flat(config_to_dict(config))
    return [
        f"{name}: {old.get(name)!r} -> {new.get(name)!r}" for name in sorted(old.keys() | new.keys())
        if old.get(name) != new.get(name) and not name.startswith(RESUMABLE + others)
    ]


def save_config(config: Config, path: str) -> None:
    """Write a config as YAML that `load_config` reads back equal."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        yaml.dump(config_to_dict(config), file, Dumper=_Dumper, sort_keys=False)


def _merge(base: dict, child: dict) -> dict:
    """`child` laid over `base`, section by section; lists and scalars are replaced."""
    merged = dict(base)
    for key, value in child.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged


def _read_preset(path: str, seen: tuple[str, ...] = ()) -> dict:
    """A preset's mapping with its `base:` chain (paths relative to the preset) merged under it."""
    if os.path.abspath(path) in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself.")
    try:
        with open(path, encoding="utf-8") as file:
            values = yaml.load(file, _Loader)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path!r} not found; presets live in configs/ (e.g. configs/grpo.yaml)."
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(values).__name__}.")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be the path of another preset, got {base!r}.")
    base_path = os.path.join(os.path.dirname(path), base)
    return _merge(_read_preset(base_path, seen + (os.path.abspath(path),)), values)


def _apply_override(values: dict, override: str) -> dict:
    """`values` with one `key.sub=value` override set; the value is parsed as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like key.sub=value (e.g. optim.lr=1e-6).")
    try:
        value = yaml.load(text, _Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {error}") from None
    parts = key.strip().split(".")
    if _is_text_field(parts) and value is not None and not isinstance(value, str):
        value = text.strip()  # run_dir=2024 means the text, not the number
    return _merge(values, _nest(parts, value))


def _is_text_field(parts: list[str]) -> bool:
    """Whether a dotted path names a str (or str-or-null) field of Config."""
    cls = Config
    for part in parts:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return False
        cls = hints[part]
    return cls in (str, str | None)


def _nest(parts: list[str], value) -> dict:
    """{'a': {'b': value}} from ['a', 'b']."""
    for part in reversed(parts):
        value = {part: value}
    return value


def load_config(path: str | None = None, overrides=(), max_positions: int | None = None) -> Config:
    """A validated Config from a YAML preset (or the defaults) and `key.sub=value` overrides."""
    values = _read_preset(path) if path else {}
    for override in overrides:
        values = _apply_override(values, override)
    return validate(config_from_dict(values), max_positions)


def _get(config, path: str):
    """The value at a dotted path."""
    for part in path.split("."):
        config = getattr(config, part)
    return config


_POSITIVE = (
    "model.tiny.vocab_size", "model.tiny.hidden_size", "model.tiny.intermediate_size", "model.tiny.num_layers",
    "model.tiny.num_heads", "model.tiny.num_kv_heads", "model.tiny.head_dim", "model.tiny.max_position_embeddings",
    "data.max_prompt_len", "data.max_completion_len", "data.batch_size", "data.synthetic.num_examples",
    "data.synthetic.digits", "optim.lr", "optim.critic_lr", "optim.eps", "optim.grad_clip", "sampling.temperature",
    "sampling.prompt_bucket_size", "grpo.std_eps", "grpo.sapo_tau_pos", "grpo.sapo_tau_neg", "grpo.cispo_eps_max",
    "grpo.num_iterations", "grpo.num_minibatches", "grpo.dynamic_sampling_max_tries", "grpo.overlong_buffer",
    "ppo.epochs",
    "ppo.num_minibatches", "ppo.value_clip", "ppo.kl_target", "ppo.kl_horizon", "ppo.reward_clip", "dpo.beta",
    "train.total_steps", "train.grad_accum", "train.log_every", "train.keep_checkpoints", "train.sft_warmup_lr",
)
_NON_NEGATIVE = (
    "seed", "data.eval_size", "optim.warmup_steps", "optim.weight_decay", "sampling.top_k", "grpo.eps_high",
    "grpo.gspo_eps_high", "grpo.kl_coef", "ppo.vf_coef", "ppo.kl_coef", "ppo.entropy_coef", "ppo.missing_stop_penalty",
    "rm.margin", "rm.center_coef", "train.eval_every", "train.checkpoint_every", "train.sft_warmup_steps",
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
    (("dpo.label_smoothing",), lambda v: 0 <= v < 0.5, "must be in [0, 0.5)", "robust DPO divides by 1 - 2ε"),
)


def _check_ranges(config: Config) -> None:
    """Impossible values: negative rates and sizes, probabilities outside their interval."""
    for paths, test, requirement, why in _RULES:
        for path in paths:
            value = _get(config, path)
            if value is not None and not test(value):
                raise ConfigError(f"{path} {requirement}, got {value!r}" + (f"; {why}." if why else "."))


def _check_batch(config: Config) -> None:
    """The batch splits evenly into groups, minibatches, microbatches and data-parallel shards."""
    batch, algorithm = config.data.batch_size, config.algorithm
    if algorithm == "grpo" and batch % config.grpo.group_size:
        group = config.grpo.group_size
        raise ConfigError(
            f"data.batch_size ({batch}) must be a multiple of grpo.group_size ({group}): it counts completions, "
            f"group_size per prompt; set data.batch_size={_round_up(batch, group)}."
        )
    section = algorithm if algorithm in ("grpo", "ppo") else None
    minibatches = _get(config, f"{section}.num_minibatches") if section else 1
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


def _round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= value."""
    return -(-value // multiple) * multiple


def _check_lengths(config: Config, max_positions: int | None) -> None:
    """Prompt plus completion fit the model's positions; the overlong buffer fits the completion."""
    data = config.data
    if max_positions is None and config.model.source == "tiny":
        max_positions = config.model.tiny.max_position_embeddings
    total = data.max_prompt_len + data.max_completion_len
    if max_positions is not None and total > max_positions:
        raise ConfigError(
            f"data.max_prompt_len + data.max_completion_len = {total} exceeds the model's {max_positions} "
            f"positions; lower them so they sum to at most {max_positions}."
        )
    grpo = config.grpo
    if config.algorithm == "grpo" and grpo.overlong_shaping and grpo.overlong_buffer >= data.max_completion_len:
        raise ConfigError(
            f"grpo.overlong_buffer ({grpo.overlong_buffer}) must be below data.max_completion_len "
            f"({data.max_completion_len}): the penalty ramps over the last overlong_buffer tokens; DAPO uses a fifth."
        )


def _check_model(config: Config) -> None:
    """The tiny model's heads group evenly; cuDNN attention computes in half precision; PPO has a
    reward model to score rollouts."""
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
    if config.algorithm == "ppo" and config.model.reward_model_path is None:
        raise ConfigError(
            "model.reward_model_path is required for ppo: the frozen reward model scores each rollout; "
            "train one with configs/rm.yaml and set model.reward_model_path to its run."
        )


def _check_data(config: Config) -> None:
    """The task names a known source that can feed this algorithm, with room for a training split."""
    data, algorithm = config.data, config.algorithm
    if data.task in SYNTHETIC_TASKS:
        if algorithm not in SYNTHETIC_TASKS[data.task]:
            raise ConfigError(
                f"data.task {data.task!r} has no preference pairs, which {algorithm} needs; use data.task=preference "
                "or a .jsonl file with prompt, chosen and rejected fields."
            )
        if data.eval_size >= data.synthetic.num_examples:
            raise ConfigError(
                f"data.eval_size ({data.eval_size}) leaves no training examples out of data.synthetic.num_examples "
                f"({data.synthetic.num_examples}); lower data.eval_size."
            )
    elif not (data.task.startswith("hf:") or data.task.endswith(".jsonl")):
        raise ConfigError(
            f"data.task {data.task!r} is not a built-in task ({', '.join(SYNTHETIC_TASKS)}), a .jsonl path or "
            f"hf:<dataset>{_suggest(data.task, SYNTHETIC_TASKS)}"
        )


REWARD_MODEL = "reward_model"  # the reward function that scores with model.reward_model_path


def _check_policy_loss(config: Config) -> None:
    """Switches of one policy loss are not set for another, where they would be ignored."""
    g = config.grpo
    if g.dual_clip is not None and g.loss != "ppo":
        raise ConfigError(
            f"grpo.dual_clip applies to grpo.loss=ppo only; grpo.loss={g.loss} ignores it. Set "
            "grpo.dual_clip=null, or grpo.loss=ppo."
        )


def _check_rewards(config: Config) -> None:
    """GRPO's reward functions resolve and their weights line up."""
    grpo = config.grpo
    if config.algorithm != "grpo":
        return
    if not grpo.reward_functions:
        raise ConfigError("grpo.reward_functions is empty; name at least one, e.g. [arithmetic_exact].")
    if grpo.reward_weights is not None and len(grpo.reward_weights) != len(grpo.reward_functions):
        raise ConfigError(
            f"grpo.reward_weights has {len(grpo.reward_weights)} entries for {len(grpo.reward_functions)} "
            "grpo.reward_functions; give one weight per function or null for all 1.0."
        )
    from jaxrl_llm import rewards  # rewards imports data, which imports this module

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
        except rewards.RewardError as error:
            raise ConfigError(f"grpo.reward_functions[{i}]: {error}") from None


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


def validate(config: Config, max_positions: int | None = None) -> Config:
    """The config, type-checked and checked for impossible or inconsistent values; raises ConfigError.

    `max_positions` is the model's position limit when known (the tiny model's is in the config).
    """
    config = config_from_dict(config_to_dict(config))  # type checks for configs built in Python
    _check_ranges(config)
    _check_batch(config)
    _check_mesh(config)
    _check_lengths(config, max_positions)
    _check_model(config)
    _check_data(config)
    _check_rewards(config)
    _check_policy_loss(config)
    return config
