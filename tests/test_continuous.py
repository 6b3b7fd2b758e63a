"""Continuous batching (`sampling.generate_continuous`): the completions of static batching, under the
same key rule, whatever the slot count; a run with `sampling.slots` trains on the same samples."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxrl_llm.config import load_config
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.models.transformer import ModelConfig, init_params
from jaxrl_llm.run import check, train
from jaxrl_llm.sampling import SamplingConfig, generate, generate_continuous

pytestmark = pytest.mark.usefixtures("xla_disk_cache")  # see conftest.py

CONFIG = ModelConfig(
    vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    max_position_embeddings=128,
)
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(1, 32, RNG.integers(1, 9)).tolist() for _ in range(11)]  # ragged, 1-8 tokens


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


@pytest.mark.parametrize("n,slots,warpers", [
    (1, 4, dict(temperature=1.0)),
    (3, 6, dict(temperature=0.8, top_k=10)),
    (2, 5, dict(temperature=0.0)),  # greedy; 5 slots hold two prompts' pairs and one idles
    (1, 3, dict(temperature=1.2, top_p=0.9)),
    (1, 8, dict(temperature=1.0)),  # 8 slots admit 2 prompts per prefill; the 11th comes alone
    (2, 16, dict(temperature=0.9, top_k=8)),  # 2 prompts (4 rows) per prefill
])
def test_the_completions_of_static_batching(params, n, slots, warpers):
    # Stop ids 3, 7, 11 end rows after 1 to 12 tokens (several at the cap): slots free at uneven times.
    static = SamplingConfig(max_new_tokens=12, n=n, stop_token_ids=(3, 7, 11), **warpers)
    want = generate(params, PROMPTS, jax.random.key(5), static, CONFIG)
    got = generate_continuous(params, PROMPTS, jax.random.key(5), dataclasses.replace(static, slots=slots), CONFIG)
    lengths = np.asarray(want.lengths_R)
    assert lengths.min() < 4 and lengths.max() == 12 and len(set(lengths.tolist())) >= 3  # a long tail to refill
    for field in ("tokens_RxN", "mask_RxN", "lengths_R", "truncated_R", "prompt_tokens_RxP", "prompt_mask_RxP"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    # The same math in another order (a per-prompt prefill, slots at their own fill): fp32 rounding.
    np.testing.assert_allclose(got.logp_RxN, want.logp_RxN, atol=2e-6)
    assert got.logp_temperature == want.logp_temperature


def test_generate_refills_slots_only_when_rows_outnumber_them(params):
    config = SamplingConfig(max_new_tokens=6, n=2, stop_token_ids=(3,))
    static = generate(params, PROMPTS[:3], jax.random.key(1), config, CONFIG)
    for slots in (2, 6, 64):  # fewer slots than the 6 rows: continuous; as many or more: one static batch
        out = generate(params, PROMPTS[:3], jax.random.key(1), dataclasses.replace(config, slots=slots), CONFIG)
        np.testing.assert_array_equal(out.tokens_RxN, static.tokens_RxN)
    with pytest.raises(ValueError, match="slots must be 0"):
        SamplingConfig(n=4, slots=2)


def _metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"reward/mean"' in line]


def test_a_run_with_slots_trains_on_the_same_samples(tmp_path):
    overrides = ["train.total_steps=2", "train.sft_warmup_steps=1", "train.eval_every=0", "data.eval_size=0"]
    runs = {}
    for name, slots in (("static", 0), ("slots", 8)):  # 8 slots for the step's 4 prompts × 4 samples
        config = load_config("configs/default.yaml", [f"run_dir={tmp_path / name}", f"sampling.slots={slots}",
                                                      "grpo.group_size=4", "data.batch_size=16", *overrides])
        train(config, quiet=True)
        runs[name] = _metrics(tmp_path / name)
    assert len(runs["static"]) == 2
    for static, slots in zip(runs["static"], runs["slots"]):
        for name in ("reward/mean", "response_length/mean", "tokens/generated"):
            assert static[name] == slots[name], name
        np.testing.assert_allclose(slots["loss"], static["loss"], rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="sampling.slots"):
        check(load_config("configs/default.yaml", ["sampling.slots=2", "grpo.group_size=4", "data.batch_size=16"]))


def answer_length(prompts, completions, **fields):
    """A reward that differs within every group, so each step moves the policy."""
    return np.array([len(c) for c in completions], np.float32)


def test_overlap_with_staleness_0_is_the_synchronous_run_and_1_trains_one_step_off(tmp_path):
    overrides = ["train.total_steps=2", "train.sft_warmup_steps=1", "train.eval_every=0", "data.eval_size=0",
                 "grpo.reward_functions=[tests.test_continuous:answer_length]", "optim.warmup_steps=0"]
    runs = {}
    for name, extra in (("sync", []), ("overlap0", ["sampling.overlap=true", "sampling.staleness=0"]),
                        ("overlap1", ["sampling.overlap=true", "sampling.staleness=1",
                                      "rollout_correction.is_level=token"])):
        train(load_config("configs/default.yaml", [f"run_dir={tmp_path / name}", *overrides, *extra]), quiet=True)
        runs[name] = _metrics(tmp_path / name)
    drop = lambda row: {k: v for k, v in row.items() if not k.startswith(("time/", "tokens_per_s", "rollout/"))}
    assert [drop(r) for r in runs["overlap0"]] == [drop(r) for r in runs["sync"]]  # bit for bit
    assert [r["rollout/staleness"] for r in runs["overlap0"]] == [0, 0]
    # Staleness 1: step 0 samples the starting params as the synchronous run does; step 1 samples the
    # params one update old, so the sampler's log-probs no longer match the trainer's.
    assert [r["rollout/staleness"] for r in runs["overlap1"]] == [0, 1]
    assert runs["overlap1"][0]["reward/mean"] == runs["sync"][0]["reward/mean"]
    assert runs["overlap1"][0]["mismatch/abs_logp_diff"] < 1e-5
    for row in runs["overlap1"][1:]:
        assert row["mismatch/abs_logp_diff"] > 1e-4 and row["correction/is_weight_mean"] != 1.0
