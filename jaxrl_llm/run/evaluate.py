"""Held-out evaluation of any policy: a run folder (its latest checkpoint, else its hf/ export), an HF
folder, a .gguf file or a packaged model, on the task and split of a run's config."""

from __future__ import annotations

import dataclasses
import os

import orbax.checkpoint as ocp

from jaxrl_llm import checkpoint
from jaxrl_llm.config import Config, load_config
from jaxrl_llm.errors import ConfigError, TrainingError
from jaxrl_llm.models import lora, peft
from jaxrl_llm.models.load import lm_backbone
from jaxrl_llm.run.examples import prepare_examples
from jaxrl_llm.run.multiturn import rollouts_of
from jaxrl_llm.run.policy import Policy, load_policy, load_scalar, lora_base
from jaxrl_llm.run.registry import algorithm, check
from jaxrl_llm.run.rollouts import evaluation_rewards, reward_function


def is_run_dir(path: str) -> bool:
    """Whether `path` is a train.py run folder (it holds config.yaml)."""
    return os.path.isfile(os.path.join(path, "config.yaml"))


def load_trained_policy(config: Config, source: str, adapter: str | None = None) -> Policy:
    """The policy to evaluate: a run folder's latest checkpoint (in the architecture of the run's own
    config.yaml; a LoRA run's adapters on the base it trained them on) or hf/ export, or any model
    source; `adapter`, a PEFT adapter folder, is put on top."""
    policy = _trained_policy(config, source)
    if adapter is None:
        return policy
    settings, _ = peft.read_adapter_config(adapter)
    model_config = policy.config.replace(lora=settings)
    params = lora.merge_jit(policy.params, policy.config)
    return Policy(model_config, lora.combine(params, peft.load_adapter(adapter, model_config)), policy.tokenizer)


def _trained_policy(config: Config, source: str) -> Policy:
    if not is_run_dir(source):
        return load_policy(config, source)
    manager = checkpoint.checkpoint_manager(os.path.join(source, "checkpoints"))
    if manager.latest_step() is None:
        hf = os.path.join(source, "hf")
        if not os.path.isdir(hf):
            raise TrainingError(f"{source} holds neither checkpoints/ nor hf/; train it first.")
        return load_policy(config, hf)
    policy, _ = run_models(source)
    if "head" in policy.params:
        raise TrainingError(f"{source} is a reward/value model run; evaluate a policy (sft, grpo, ppo, dpo run).")
    return policy


def run_models(run_dir: str, step: int | None = None) -> tuple[Policy, Policy | None]:
    """(the trained model, the PPO critic or None) of a run folder's checkpoint at `step` (default its
    latest), in the architecture of the run's own config.yaml: a LoRA run's adapters on the base it
    trained them on, a reward model with its head."""
    manager = checkpoint.checkpoint_manager(os.path.join(run_dir, "checkpoints"))
    steps = manager.all_steps()
    if not steps or (step is not None and step not in steps):
        raise TrainingError(f"{run_dir} has no checkpoint of step {step}; it has steps {sorted(steps)}."
                            if steps else f"{run_dir} holds no checkpoints; train it first.")
    step = max(steps) if step is None else step
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    trained = state.get("policy") or state.get("actor") or state  # GRPO/DPO, PPO, SFT/RM states
    own = load_config(os.path.join(run_dir, "config.yaml"))  # the run's own architecture and tokenizer
    warm = os.path.join(run_dir, "sft_warmup")
    start = _trained_policy(own, warm) if own.model.lora.rank and is_run_dir(warm) else load_policy(own)
    params = trained["params"]
    base = lora_base(own, start) if start.config.lora is not None else None
    if base is not None:
        params = lora.combine(base, params)
    critic = None
    if "critic" in state:
        critic_params = state["critic"]["params"]
        if own.model.critic_path:
            loaded = load_scalar(own, own.model.critic_path)
            critic_config, trunk = loaded.config.replace(lora=start.config.lora), loaded.params["model"]
        else:  # grown from the policy's base, as `run.phases.ppo_phase` does
            critic_config, trunk = start.config, base
        if critic_config.lora is not None:  # the checkpoint holds the adapters and head, not the frozen trunk
            critic_params = lora.combine({"model": lm_backbone(trunk)}, critic_params)
        critic = Policy(critic_config, critic_params, start.tokenizer)
    return dataclasses.replace(start, params=params), critic


def evaluate(
    config: Config, source: str, samples: int = 3, temperature: float = 0.0, n: int = 1, adapter: str | None = None
) -> dict:
    """Held-out metrics of `source` on `config`'s task, with `samples` prompt/answer pairs; greedy
    answers, or `n` per prompt sampled at `temperature`. The answers are scored by the algorithm's
    reward functions if it has some, else by what the examples and a reward model allow."""
    if config.data.eval_size < 1:
        raise ConfigError("data.eval_size is 0, so no held-out examples to evaluate on; set data.eval_size=64, say.")
    if temperature < 0 or (temperature > 0 and n < 1):
        raise ConfigError(f"--temperature must be >= 0 and --n >= 1, got {temperature} and {n}.")
    entry = algorithm(config)
    config = check(dataclasses.replace(config, train=dataclasses.replace(config.train, sft_warmup_steps=0)))
    policy = load_trained_policy(config, source, adapter)
    check(config, policy.config.max_position_embeddings)
    _, eval_set = prepare_examples(config, policy.tokenizer, ("prompt",))
    section = getattr(config, entry.section) if entry.section else None
    if hasattr(section, "reward_functions"):
        names, weights = section.reward_functions, section.reward_weights
    else:
        names, weights = evaluation_rewards(config, eval_set[0])
    rollouts = rollouts_of(config)(config, policy, eval_set, 1, reward_function(config, policy, names, weights))
    metrics, answers = rollouts.evaluate_answers(policy.params, eval_set, temperature, n)
    answers = answers[:: n if temperature > 0 else 1]  # one answer per prompt to show
    shown = [
        {"prompt": example["prompt"] if isinstance(example["prompt"], str) else example["prompt"][-1]["content"],
         "answer": answer, **({"expected": example["answer"]} if "answer" in example else {})}
        for example, answer in zip(eval_set[:samples], answers)
    ]
    decoding = f"sampled, T={temperature}, {n} per prompt" if temperature > 0 else "greedy"
    return {"source": source, "task": config.data.task, "examples": len(eval_set), "decoding": decoding, **metrics,
            "samples": shown}
