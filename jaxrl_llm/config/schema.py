"""The shape of a run's configuration: one frozen dataclass per section, and the choices of each field.

Every leaf is an int, float, bool, str, enum (`Literal`), tuple or None, so a config is hashable (a
valid static jit argument) and saves to YAML and loads back equal. Each choice tuple and each
default of the math is defined once, where the code that implements it lives (`core`, `models`,
`padding`, `data`, `state`), and read from there. Which algorithms exist, and which section each
one reads, is the run layer's registry (`run.registry`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxrl_llm.core import advantages, correction, losses
from jaxrl_llm.data import OPERATORS, PROMPT_OVERFLOW
from jaxrl_llm.metrics import TRACKERS
from jaxrl_llm.models import precision, quantize
from jaxrl_llm.models.transformer import ATTENTION_KINDS, DTYPES, REMAT_POLICIES
from jaxrl_llm.padding import BUCKETS
from jaxrl_llm.state import SCHEDULES

KL_ESTIMATORS = (*losses.KL_KINDS, "full")  # full: the exact KL over the vocabulary
KL_PLACEMENTS = ("loss", "reward", "none")
TOOL_FORMATS = ("auto", "hermes", "llama3_json", "chatml_json")  # auto and envs.tools.TOOL_FORMATS


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
class LoraSection:
    """LoRA adapters (Hu et al. 2021; PEFT's fields) and the frozen base's storage (QLoRA)."""

    rank: int = 0  # 0: full fine-tuning; r > 0 trains adapters of rank r only
    alpha: float = 16.0  # the update is scaled by alpha / rank (PEFT lora_alpha)
    dropout: float = 0.0  # on the adapters' input in training forwards (PEFT lora_dropout)
    # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, "all-linear", or regular
    # expressions matched against those names (PEFT target_modules)
    targets: tuple[str, ...] = ("all-linear",)
    rslora: bool = False  # scale alpha / sqrt(rank) (rsLoRA, PEFT use_rslora)
    quantize: Literal[quantize.KINDS] | None = None  # int8 / nf4: the frozen base, dequantised per matmul
    init_from: str | None = None  # a PEFT adapter folder (adapter_config.json) to start from


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The policy's weights and numerics, and the checkpoints of the frozen or extra models."""

    source: str = "tiny"  # an HF folder, a .gguf file, a hub id, smollm2 or tiny
    tiny: TinyModel = dataclasses.field(default_factory=TinyModel)
    dtype: Literal[DTYPES] = "float32"
    param_dtype: Literal[DTYPES] = "float32"
    remat: Literal[REMAT_POLICIES] = "none"
    # cudnn: cuDNN flash attention for training, scoring and prefill (NVIDIA GPU, bf16/fp16 dtype);
    # auto: cudnn where both hold, else xla (the einsums, any backend and dtype)
    attention: Literal[ATTENTION_KINDS] = "auto"
    ref_path: str | None = None  # None: the initial policy (model.source), i.e. π_SFT
    reward_model_path: str | None = None  # PPO's frozen RM (a run of configs/rm.yaml)
    # None: the policy's backbone with a fresh value head (seed design, verl); TRL and OpenRLHF
    # start the critic from the reward model instead.
    critic_path: str | None = None
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)


@dataclasses.dataclass(frozen=True)
class SyntheticSection:
    """Knobs of the built-in synthetic tasks."""

    num_examples: int = 10000
    digits: int = 2  # arithmetic operands are drawn from [0, 10**digits)
    operators: tuple[Literal[OPERATORS], ...] = ("+",)
    preference_target: str = "a"  # the hidden preference: more of this substring wins


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Where examples come from, their field names, length budgets, padding and batch size."""

    task: str = "arithmetic"  # a built-in task (data.TASK_FIELDS), a .jsonl path or hf:<dataset>
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
    # Every batch (training sequences, pairs, rollout prompts) is padded to a bucket so a stream of
    # batches compiles a few shapes: the next power of two >= bucket_size ("pow2", fewest compiles)
    # or the next multiple of it ("multiple", least padding).
    bucket: Literal[BUCKETS] = "pow2"
    bucket_size: int = 16
    # Sequences per optimizer step: completions for GRPO (prompts × group_size), pairs for RM/DPO.
    batch_size: int = 64
    eval_size: int = 64  # examples held out for evaluation
    shuffle: bool = True
    synthetic: SyntheticSection = dataclasses.field(default_factory=SyntheticSection)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW and its learning-rate schedule."""

    optimizer: Literal["adamw"] = "adamw"
    lr: float = 1e-6  # DeepSeekMath GRPO, DAPO, TRL GRPO
    critic_lr: float = 1e-5  # PPO's separate critic optimizer (verl, OpenRLHF)
    schedule: Literal[SCHEDULES] = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None  # where linear / cosine decay reaches 0; None: train.total_steps
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global norm; None turns it off


@dataclasses.dataclass(frozen=True)
class SamplingSection:
    """Generation knobs; max_new_tokens is data.max_completion_len and n is grpo.group_size."""

    temperature: float = 1.0  # TRL GRPO; rollouts are scored at the temperature they were sampled at
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    stop_token_ids: tuple[int, ...] = ()  # in addition to the tokenizer's EOS
    ignore_eos: bool = False  # sample max_completion_len tokens whatever comes (benchmarks; vLLM's name)
    # The rollout copy of the policy, made once per training step: float32 samples with the trained
    # params as they are; bfloat16 casts them; int8 stores the projection kernels as int8 with one
    # scale per output channel (the rest bf16). Both decode in bf16 with fp32 accumulation.
    weights_dtype: Literal[precision.ROLLOUT_DTYPES] = "float32"
    # > 0: continuous batching, this many rows decoding at a time, each finished row's slot refilled
    # with the next prompt waiting (same completions); 0: every row of a call in one static batch.
    slots: int = 0
    # Generate step t+1's rollouts (on a worker thread) while step t trains, from params at most
    # `staleness` steps old; the batch carries the stale sampler's log-probs, which rollout_correction
    # corrects for. Off: every rollout samples the params it then trains (synchronous).
    overlap: bool = False
    staleness: int = 1


@dataclasses.dataclass(frozen=True)
class RolloutCorrectionSection(correction.Correction):
    """The rollout/trainer mismatch (logged every RL step) and its correction (`core.correction`):
    TIS weights min(ρ, is_cap) per token or sequence (Yao et al. 2025); MIS drops tokens or
    sequences whose ratio leaves [mask_low, mask_high] (verl's rollout correction). Off by default."""

    is_level: Literal[correction.LEVELS] = "none"
    mask_level: Literal[correction.MASK_LEVELS] = "none"


@dataclasses.dataclass(frozen=True)
class GRPOSection:
    """GRPO and the variants that are switches on it (DAPO, GSPO, SAPO, CISPO, Dr. GRPO, RLOO,
    REINFORCE++-baseline)."""

    group_size: int = 8  # G samples per prompt (TRL num_generations)
    # grpo: (r − mean_group)/std (adv_scaling, std, std_eps); rloo: r − mean of the others;
    # reinforce_plus_plus_baseline: r − mean_group, whitened over the batch's tokens
    advantage: Literal[advantages.ESTIMATORS] = "grpo"
    loss: Literal[losses.POLICY_KINDS] = "ppo"
    eps_low: float = losses.PPO_CLIP
    eps_high: float = losses.PPO_CLIP  # DAPO clip-higher: 0.28
    dual_clip: float | None = None  # c > 1 caps the loss where A < 0 (verl uses 3.0)
    gspo_eps_low: float = losses.GSPO_CLIP[0]
    gspo_eps_high: float = losses.GSPO_CLIP[1]
    sapo_tau_pos: float = losses.SAPO_TAU[0]
    sapo_tau_neg: float = losses.SAPO_TAU[1]
    cispo_eps_max: float = losses.CISPO_EPS_MAX
    aggregation: Literal[losses.AGGREGATIONS] = "seq_mean_token_mean"  # DeepSeekMath; DAPO: token_mean
    adv_scaling: Literal[advantages.SCALES] = "group"  # Dr. GRPO: none
    std: Literal[advantages.STDS] = "bessel"  # TRL, verl, OpenRLHF; the seed design writes population
    std_eps: float = advantages.GROUP_STD_EPS
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
    eps: float = losses.PPO_CLIP
    value_clip: float | None = losses.VALUE_CLIP  # None: plain ½(V − R)²
    vf_coef: float = 0.1  # TRL, OpenAI
    gamma: float = advantages.GAE_GAMMA
    lam: float = advantages.GAE_LAMBDA
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

    beta: float = losses.DPO_BETA
    loss: Literal[losses.DPO_KINDS] = "sigmoid"
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
    export_hf: bool = True  # the final model to RUN_DIR/hf (PPO's critic to RUN_DIR/critic_hf)
    log_compiles: bool = False  # log each XLA compile and the cache miss behind it (as JAX_LOG_COMPILES=1)
    # SFT steps on the task's reference completions before an RL algorithm starts, so a random
    # tiny model can earn reward (default.yaml); at a constant learning rate after optim.warmup_steps.
    sft_warmup_steps: int = 0
    sft_warmup_lr: float | None = None  # None: optim.lr
    sft_warmup_batch_size: int | None = None  # None: data.batch_size


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    """Where each step's metrics, the config and the final plot go (process 0 only). RUN_DIR/metrics.jsonl
    is always written, listed or not: resume, plots and summaries read it."""

    trackers: tuple[Literal[TRACKERS], ...] = ("jsonl",)
    project: str = "jaxrl_llm"  # the W&B / trackio project
    name: str | None = None  # the tracker's run name; None: the run_dir's folder name


@dataclasses.dataclass(frozen=True)
class EnvSection:
    """Multi-turn rollouts for GRPO and PPO (`jaxrl_llm.envs`); `env: module:Class` is short for
    `env: {kind: module:Class}`. kind none: one answer per prompt; tools: the model may call `tools`
    (built-in names such as `calculator`, or module:function) until it answers; module:Class: an
    environment class, one instance per trajectory."""

    SHORTHAND = "kind"  # the field a plain string sets

    kind: str = "none"
    tools: tuple[str, ...] = ()
    max_turns: int = 4  # model turns per trajectory
    # Tokens after the prompt, the model's and the environment's; a turn is at most data.max_completion_len.
    max_tokens: int = 512
    tool_format: Literal[TOOL_FORMATS] = "auto"  # auto: from the chat template (jaxrl_llm.envs.tools)
    # PPO: each environment step's reward at the end of the turn it answers (GAE credits the turns
    # apart); off: their sum at the trajectory's last token. GRPO always sums them.
    per_turn_rewards: bool = False
    tool_timeout: float = 10.0  # seconds per call
    workers: int = 32  # threads running environment steps and tool calls

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


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
    """A whole run; `algorithm` names an entry of `run.registry.ALGORITHMS`."""

    algorithm: str = "grpo"
    seed: int = 0
    run_dir: str = "runs/default"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    rollout_correction: RolloutCorrectionSection = dataclasses.field(default_factory=RolloutCorrectionSection)
    grpo: GRPOSection = dataclasses.field(default_factory=GRPOSection)
    ppo: PPOSection = dataclasses.field(default_factory=PPOSection)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
    rm: RMSection = dataclasses.field(default_factory=RMSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    env: EnvSection = dataclasses.field(default_factory=EnvSection)
