"""The main job learns where a user sees it: `python train.py` (SFT warm start, then GRPO), as it is but
for the HF export, raises the reward of the answers it samples while training (what the progress bar
and metrics.jsonl show) and its greedy held-out accuracy, with a fixed seed."""

import json
import os

from jaxrl_llm.config import load_config
from jaxrl_llm.run import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_default_job_raises_sampled_reward_and_greedy_accuracy(tmp_path):
    overrides = [f"run_dir={tmp_path}", "train.export_hf=false"]
    config = load_config(os.path.join(ROOT, "configs", "default.yaml"), overrides)
    result = train(config, quiet=True)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as file:
        rewards = [json.loads(line)["reward/mean"] for line in file]
    fifth = len(rewards) // 5
    first, last = sum(rewards[:fifth]) / fifth, sum(rewards[-fifth:]) / fifth
    # Measured (seed 0 here; seeds 1 and 2 in the closing note of issue 16): 0.357 -> 0.628 sampled,
    # 0.609 -> 0.977 greedy.
    assert last >= first + 0.2, (first, last)
    before, after = result.metrics["before/eval/accuracy"], result.metrics["eval/accuracy"]
    assert after >= before + 0.2, (before, after)
