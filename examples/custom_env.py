"""A custom multi-turn environment through the library: the model guesses a number from 1 to 20 and
hears "higher" or "lower" until it is right or out of turns. The tiny random model first learns the
game from reference conversations (a bisection), then GRPO trains on whole conversations with the
environment's reward as the only reward. A few minutes on a laptop CPU:
    python examples/custom_env.py
"""

import json
import os
import re
import tempfile

from jaxrl_llm.config import load_config
from jaxrl_llm.run import train


class GuessNumber:
    """One instance per trajectory: `reset` opens the conversation, `step` answers each reply."""

    def reset(self, example: dict) -> list[dict]:
        self.secret, self.guesses = example["secret"], 0
        return [{"role": "user", "content": example["prompt"]}]

    def step(self, messages: list[dict], assistant_text: str) -> tuple[list[dict], float, bool]:
        self.guesses += 1
        number = re.search(r"\d+", assistant_text)
        if number is None:
            return [{"role": "user", "content": "Say a number."}], 0.0, False
        guess = int(number.group())
        if guess == self.secret:
            return [], 1.0 / self.guesses, True  # sooner is better
        return [{"role": "user", "content": "higher" if guess < self.secret else "lower"}], 0.0, False


def bisection(secret: int, low: int = 1, high: int = 20) -> list[str]:
    """The reference replies: guess the middle, halve the range."""
    guesses = []
    while True:
        guesses.append(str((low + high) // 2))
        if int(guesses[-1]) == secret:
            return guesses
        low, high = (int(guesses[-1]) + 1, high) if int(guesses[-1]) < secret else (low, int(guesses[-1]) - 1)


if __name__ == "__main__":
    folder = tempfile.mkdtemp()
    data = os.path.join(folder, "secrets.jsonl")
    with open(data, "w") as file:
        for i in range(400):
            secret = 1 + i % 20
            *replies, completion = bisection(secret)  # the reference conversation's model turns
            example = {"prompt": "Guess my number from 1 to 20.", "secret": secret, "replies": replies,
                       "completion": completion}
            file.write(json.dumps(example) + "\n")
    config = load_config(None, [
        f"data.task={data}", "data.max_prompt_len=48", "data.max_completion_len=8", "data.batch_size=32",
        "data.eval_size=20", "env.kind=__main__:GuessNumber", "env.max_turns=5", "env.max_tokens=96",
        "grpo.reward_functions=[]", "train.sft_warmup_steps=150", "train.sft_warmup_lr=3e-3",
        "train.total_steps=20", "train.eval_every=10", "optim.lr=1e-3", f"run_dir={os.path.join(folder, 'run')}",
    ])
    result = train(config)
    print("held-out reward:", result.metrics.get("eval/reward"), "turns:", result.metrics.get("eval/turns"))
