"""Every jitted program compiles once per shape bucket: after a run's first step (and the evaluation
before it), later steps and evaluations compile nothing, for each algorithm and for a vmapped sweep;
repeated sampler calls in one bucket compile nothing."""

import json
import os

import jax
import numpy as np
import pytest

from jaxrl_llm.compiles import CompileCounter
from jaxrl_llm.config import load_config
from jaxrl_llm.config.sweeps import load_sweep
from jaxrl_llm.models.load import export_hf, init_scalar_params_from_lm
from jaxrl_llm.run import train, train_sweep
from jaxrl_llm.run.policy import load_policy
from jaxrl_llm.sampling import SamplingConfig, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.head_dim=8", "data.synthetic.num_examples=200", "data.eval_size=8", "data.batch_size=8",
    "train.total_steps=4", "train.eval_every=2", "data.max_completion_len=8",
]
RL = ["train.sft_warmup_steps=0", "grpo.group_size=4"]
CASES = {
    "sft": [], "rm": ["model.source=tiny"], "dpo": ["model.source=tiny"], "grpo": RL,
    # DAPO's dynamic sampling draws a varying number of rounds per step, each in the same bucket.
    "dapo": [*RL, "grpo.dynamic_sampling_max_tries=3", "grpo.overlong_buffer=2"],
    "ppo": ["model.source=tiny", "ppo.epochs=1"],
}


def compile_counts(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as file:
        return [json.loads(line)["time/compiles"] for line in file]


@pytest.mark.parametrize("preset", list(CASES))
def test_a_run_compiles_nothing_after_its_first_step(tmp_path, preset):
    extra = list(CASES[preset])
    if preset == "ppo":  # a random tiny reward model
        policy = load_policy(load_config(None, TINY))
        export_hf(init_scalar_params_from_lm(policy.params, jax.random.key(1), policy.config), tmp_path / "rm",
                  policy.config, policy.tokenizer)
        extra.append(f"model.reward_model_path={tmp_path / 'rm'}")
    config = load_config(os.path.join(ROOT, "configs", f"{preset}.yaml"),
                         [*TINY, f"run_dir={tmp_path / 'run'}", *extra])
    result = train(config, quiet=True)
    counts = compile_counts(result.run_dir)
    assert len(counts) == 4 and counts[0] > 0
    assert counts == [counts[0]] * 4, counts  # steps 1-3 and the evaluation after step 1 compiled nothing
    assert result.metrics["time/compiles"] >= counts[-1] and result.metrics["time/compile_s"] > 0


def test_repeated_sampler_calls_in_one_bucket_compile_nothing():
    policy = load_policy(load_config(None, TINY))
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10]]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, n=2)
    generate(policy.params, prompts, jax.random.key(0), sampling, policy.config)
    with CompileCounter() as compiles:
        for seed in range(1, 4):
            out = generate(policy.params, [p[::-1] for p in prompts], jax.random.key(seed), sampling, policy.config)
            np.asarray(out.tokens_RxN)
    assert compiles.count == 0, compiles.programs


def test_a_vmapped_sweep_compiles_nothing_after_its_first_step(tmp_path):
    sweep = load_sweep(os.path.join(ROOT, "configs", "grpo.yaml"),
                       [*TINY, *RL, f"run_dir={tmp_path}", "sweep.seed=[0,1]", "sweep.optim.lr=[1e-5,3e-5]"])
    result = train_sweep(sweep, quiet=True)
    assert len(result.runs) == 4
    for run in result.runs:
        counts = compile_counts(run.run_dir)
        # Step 0 samples each run alone (the run axis does not exist before the state is stacked around
        # the traced step); step 1 compiles the vmapped sampler. Nothing compiles after that.
        assert len(counts) == 4 and 0 < counts[0] < counts[1]
        assert counts[1:] == [counts[1]] * 3, counts
        assert run.metrics["time/compiles"] >= counts[-1] and run.metrics["time/compile_s"] > 0
