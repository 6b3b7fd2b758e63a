"""Multi-turn runs on the tiny model: reference conversations for SFT mask all but the model's turns,
GRPO and PPO train on trajectories through the run layer, and a resumed run equals the straight one."""

import os

import numpy as np
import pytest
from test_train import TINY

from jaxrl_llm.config import load_config
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.run.evaluate import evaluate
from jaxrl_llm.run.examples import prepare_examples
from jaxrl_llm.run.loop import train
from jaxrl_llm.run.multiturn import EnvFactory, conversation_batch
from jaxrl_llm.run.policy import load_policy

pytestmark = pytest.mark.usefixtures("xla_disk_cache")  # see conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = [*TINY, "data.batch_size=8", "grpo.group_size=4", "train.sft_warmup_steps=2", "train.sft_warmup_batch_size=4",
         "train.eval_every=2", "train.checkpoint_every=1", "data.eval_size=4", "train.export_hf=false"]


def calculator_config(run_dir, *overrides):
    return load_config(os.path.join(ROOT, "configs", "calculator.yaml"), [*SHORT, f"run_dir={run_dir}", *overrides])


def metric_rows(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as file:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "tokens_per_s"))}
                for line in file]


def test_reference_conversations_train_only_the_model_turns(tmp_path):
    config = calculator_config(tmp_path / "run")
    policy = load_policy(config)
    train_set, _ = prepare_examples(config, policy.tokenizer, ("prompt", "completion"))
    batch = conversation_batch(config, policy, EnvFactory(config, policy.tokenizer), train_set[:3])
    tokenizer = policy.tokenizer
    for row, example in enumerate(train_set[:3]):
        tokens, mask, loss = (np.asarray(x[row]) for x in (batch.tokens_BxT, batch.mask_BxT, batch.completion_mask_BxT))
        a, b = example["tool_calls"][0]["arguments"]["expression"].split(" * ")
        call = '<tool_call>[{"name": "calculator", "arguments": {"expression": "%s * %s"}}]</tool_call>' % (a, b)
        # The loss sees the call and the answer, each with its <eos>; the tool's result is context only.
        trained = tokenizer.decode(tokens[loss == 1], skip_special_tokens=False)
        assert trained == f"{call}<eos>{example['completion']}<eos>"
        context = tokenizer.decode(tokens[(mask == 1) & (loss == 0)], skip_special_tokens=False)
        assert context.endswith(f"<eos>assistant: tool: {int(a) * int(b)}<eos>assistant: ")
        assert loss.sum() > 0 and np.all(mask[loss == 1] == 1)


def test_grpo_on_trajectories_resumes_exactly(tmp_path):
    train(calculator_config(tmp_path / "straight", "train.total_steps=2"), quiet=True)
    rows = metric_rows(tmp_path / "straight")
    for name in ("env/turns", "env/tool_calls", "env/tool_error_rate", "env/generated_tokens", "env/context_tokens",
                 "env/truncated_turns", "env/truncated_tokens", "reward/arithmetic_exact"):
        assert name in rows[-1], name
    assert "eval/tool_calls" in rows[-1] and "eval/accuracy" in rows[-1]
    # The total reward is the reward functions' plus the environment's (0 for a tool environment).
    assert rows[-1]["eval/reward"] == pytest.approx(rows[-1]["eval/arithmetic_exact"] + rows[-1]["eval/step_reward"])
    # `python -m jaxrl_llm.eval RUN_DIR` plays the held-out prompts through the environment too.
    report = evaluate(calculator_config(tmp_path / "straight"), str(tmp_path / "straight"))
    assert report["eval/accuracy"] == pytest.approx(rows[-1]["eval/accuracy"])
    assert report["eval/turns"] == pytest.approx(rows[-1]["eval/turns"])
    train(calculator_config(tmp_path / "resumed", "train.total_steps=1"), quiet=True)
    train(calculator_config(tmp_path / "resumed", "train.total_steps=2", "train.resume=true"), quiet=True)
    got, want = metric_rows(tmp_path / "resumed"), rows
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)


def test_dapo_dynamic_sampling_and_overlong_shaping_apply_to_trajectories(tmp_path):
    train(calculator_config(tmp_path / "dapo", "train.total_steps=1", "grpo.dynamic_sampling=true",
                            "grpo.dynamic_sampling_max_tries=2", "grpo.overlong_shaping=true",
                            "grpo.overlong_buffer=32", "train.eval_every=0"), quiet=True)
    (row,) = metric_rows(tmp_path / "dapo")
    assert 1 <= row["dynamic_sampling/tries"] <= 2
    assert "reward/overlong" in row and row["reward/overlong"] <= 0
    # The lengths shaping sees are the model's tokens, within the trajectory budget env.max_tokens.
    assert 0 < row["response_length/mean"] <= 160


class EchoEnv:
    """Two user turns; a reply earns 1 for each 'a' it holds (a custom environment for PPO)."""

    def reset(self, example):
        self.turn = 0
        return [{"role": "user", "content": example["prompt"] if isinstance(example["prompt"], str) else "Say a."}]

    def step(self, messages, assistant_text):
        self.turn += 1
        return [{"role": "user", "content": "Again."}], float(assistant_text.count("a")), self.turn == 2


@pytest.mark.parametrize("per_turn", [False, True])
def test_ppo_with_an_environment_class_scores_by_its_rewards(tmp_path, per_turn):
    config = load_config(os.path.join(ROOT, "configs", "ppo.yaml"), [
        *TINY, f"run_dir={tmp_path / 'ppo'}", "model.source=tiny", "model.reward_model_path=null",
        f"env.per_turn_rewards={str(per_turn).lower()}",
        "env.kind=test_env_runs:EchoEnv", "env.max_turns=3", "env.max_tokens=64", "data.max_completion_len=24",
        "data.max_prompt_len=64", "train.sft_warmup_steps=15", "train.sft_warmup_lr=3e-3",
        "data.batch_size=4", "data.eval_size=4", "ppo.num_minibatches=1", "ppo.epochs=1", "train.total_steps=2",
        "train.eval_every=0", "train.export_hf=false",
    ])
    train(config, quiet=True)
    rows = metric_rows(tmp_path / "ppo")
    # After a warm start on reference conversations (its answer, then an empty one) replies end in
    # <eos> and get their second turn; the score is the environment's reward.
    assert all(1 < row["env/turns"] <= 2 for row in rows), [row["env/turns"] for row in rows]
    step_rewards = [row["env/step_reward"] for row in rows]
    if per_turn:  # each turn's reward at its own last token: none in the score, all in the summed rewards
        assert [row["score/mean"] for row in rows] == [0.0, 0.0]
        assert [row["reward/mean"] - row["reward/non_score"] for row in rows] == pytest.approx([0.0, 0.0], abs=1e-6)
        assert [row["reward/mean"] for row in rows] == pytest.approx(step_rewards, abs=1e-3)
    else:
        assert [row["score/mean"] for row in rows] == pytest.approx(step_rewards)


def test_env_errors_name_the_field():
    with pytest.raises(ConfigError, match="env.kind=tools needs env.tools"):
        load_config(None, ["env.kind=tools"])
    with pytest.raises(ConfigError, match="needs algorithm grpo or ppo"):
        load_config(None, ["algorithm=dpo", "env.kind=tools", "env.tools=[calculator]"])
    with pytest.raises(ConfigError, match="GRPO's advantages are per trajectory"):
        load_config(None, ["env.kind=tools", "env.tools=[calculator]", "env.per_turn_rewards=true"])
    with pytest.raises(ConfigError, match="env.max_tokens = "):
        load_config(None, ["env.kind=tools", "env.tools=[calculator]", "env.max_tokens=5000"])
