"""The run layer's guards: what it refuses before training, and rollout details that are easy to get wrong."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import tokenizer as tok
from jaxrl_llm.config import ConfigError, load_config
from jaxrl_llm.models.load import export_hf, init_scalar_params_from_lm
from jaxrl_llm.run import rollouts
from jaxrl_llm.run.loop import train
from jaxrl_llm.run.policy import load_policy
from jaxrl_llm.sampling import Completions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preset(name, *overrides):
    return load_config(os.path.join(ROOT, "configs", f"{name}.yaml"), list(overrides))


def test_tiny_vocab_smaller_than_the_tokenizer_is_refused():
    with pytest.raises(ConfigError, match=r"model.tiny.vocab_size \(50\) is smaller than the character tokenizer"):
        load_policy(preset("sft", "model.tiny.vocab_size=50"))


def test_stop_ids_outside_the_vocabulary_are_refused_before_the_warm_start(tmp_path):
    config = preset("default", f"run_dir={tmp_path}", "sampling.stop_token_ids=[5, 100000]")
    with pytest.raises(ConfigError, match=r"sampling.stop_token_ids \[100000\] are not token ids of this model"):
        train(config, quiet=True)
    assert not (tmp_path / "sft_warmup").exists()


def fake_completions(R: int, tag: int) -> Completions:
    """R rows whose prompt token 0 is the row's index (to see which rows a batch holds)."""
    return Completions(
        tokens_RxN=jnp.full((R, 3), tag), logp_RxN=jnp.zeros((R, 3)), mask_RxN=jnp.ones((R, 3), jnp.int32),
        lengths_R=jnp.full((R,), 3), truncated_R=jnp.zeros((R,), bool),
        prompt_tokens_RxP=jnp.broadcast_to(jnp.arange(R)[:, None], (R, 4)).astype(jnp.int32),
        prompt_mask_RxP=jnp.ones((R, 4), jnp.int32),
    )


def test_dynamic_sampling_fills_with_tied_groups_never_a_kept_one_twice():
    G, P = 2, 4
    sampler = rollouts.Rollouts.__new__(rollouts.Rollouts)  # only `_dynamic`'s fields; no model needed
    sampler.config = preset("dapo", "grpo.dynamic_sampling_max_tries=2")
    sampler.group_size, sampler.examples = G, [{"prompt": "x", "prompt_ids": [1]}] * 100
    sampler.sampling = rollouts.SamplingConfig(pad_token_id=0)
    # Every later round ties, so the fill has to come from the first round.
    sampler.sample = lambda params, prompts, key, sampling=None, rollout=False: (
        fake_completions(P * G, 9), np.zeros(P * G), {}, None
    )
    first_R = np.array([0, 1, 0, 0, 1, 0, 0, 0], np.float32)  # groups 0 and 2 informative
    merged, rewards_R, tries = sampler._dynamic(None, [None] * P, fake_completions(P * G, 0), first_R, step=0)
    groups = np.asarray(merged.prompt_tokens_RxP[:, 0]).reshape(P, G)[:, 0] // G
    assert tries == 2 and sorted(groups) == [0, 1, 2, 3]
    np.testing.assert_array_equal(rewards_R.reshape(P, G)[np.argsort(groups)], first_R.reshape(P, G))


def test_reward_model_scores_the_prompt_ids_the_policy_saw(tmp_path):
    config = preset(
        "default", "data.max_prompt_len=16", "data.max_completion_len=6", "data.prompt_overflow=truncate",
    )
    policy = load_policy(config)
    params = init_scalar_params_from_lm(policy.params, jax.random.key(1), policy.config)
    export_hf(params, tmp_path, policy.config, policy.tokenizer)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, reward_model_path=str(tmp_path)))
    _, rm_reward = rollouts.reward_model_reward(config, policy)
    long = "Please compute this for me: what is 17 + 25 exactly?"
    ids = tok.prompt_ids(policy.tokenizer, long)[-16:]  # what truncation leaves the policy
    assert len(tok.prompt_ids(policy.tokenizer, long)) > 16
    scored = rm_reward([long], ["42"], prompt_ids=[ids])
    np.testing.assert_array_equal(scored, rm_reward(["unrelated"], ["42"], prompt_ids=[ids]))
    assert scored.shape == (1,) and np.isfinite(scored).all()


def test_a_failed_hf_export_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from jaxrl_llm.models import load

    policy = load_policy(preset("default"))
    export_hf(policy.params, tmp_path, policy.config, policy.tokenizer)
    before = {name: (tmp_path / name).read_bytes() for name in ("model.safetensors", "config.json")}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(load, "config_to_hf", fail)  # fails after the new weights are written
    changed = jax.tree.map(lambda p: p + 1.0, policy.params)
    with pytest.raises(OSError, match="disk full"):
        export_hf(changed, tmp_path, policy.config, policy.tokenizer)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not list(tmp_path.glob(".*.partial"))
