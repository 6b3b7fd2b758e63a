"""Config: presets, dotted overrides, YAML round trip, and validation messages that name the field and the fix."""

import dataclasses
import glob
import os

import pytest

from jaxrl_llm import config as cfg
from jaxrl_llm.config import ConfigError, load_config
from jaxrl_llm.run.registry import check

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
PRESETS = ("default", "sft", "rm", "ppo", "grpo", "dapo", "gspo", "sapo", "dr_grpo", "dpo")


def preset(name):
    return os.path.join(CONFIGS, f"{name}.yaml")


def error_of(*overrides, path=None, max_positions=None) -> str:
    """The message of the first rule a run with this config breaks (the common ones, then its algorithm's)."""
    with pytest.raises(ConfigError) as info:
        check(load_config(path, list(overrides)), max_positions)
    return str(info.value)


def test_defaults_validate_and_are_hashable():
    config = load_config()
    assert config == cfg.Config()
    assert hash(config) == hash(cfg.Config())
    assert config.grpo.group_size == 8 and config.grpo.eps_low == 0.2 and config.dpo.beta == 0.1


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))))
def test_every_preset_loads_and_validates(path):
    assert cfg.validate(load_config(path)) == load_config(path)


def test_the_named_presets_exist():
    assert {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))} >= set(PRESETS)


def test_variant_presets_switch_the_right_fields():
    grpo, dapo = load_config(preset("grpo")), load_config(preset("dapo"))
    assert (dapo.grpo.eps_low, dapo.grpo.eps_high, dapo.grpo.aggregation) == (0.2, 0.28, "token_mean")
    assert dapo.grpo.kl_coef == 0.0 and dapo.grpo.dynamic_sampling and dapo.grpo.overlong_shaping
    # `base:` inheritance: dapo -> grpo -> default keeps what it does not override.
    assert dapo.grpo.reward_functions == grpo.grpo.reward_functions == ("arithmetic_exact", "arithmetic_format")
    assert dapo.train.sft_warmup_steps == load_config(preset("default")).train.sft_warmup_steps > 0
    gspo = load_config(preset("gspo")).grpo
    assert (gspo.loss, gspo.gspo_eps_low, gspo.gspo_eps_high, gspo.aggregation) == (
        "gspo", 3e-4, 4e-4, "seq_mean_token_mean")
    dr = load_config(preset("dr_grpo")).grpo
    assert (dr.adv_scaling, dr.aggregation) == ("none", "seq_mean_token_sum_norm")
    assert load_config(preset("sapo")).grpo.loss == "sapo"
    assert load_config(preset("ppo")).ppo.kl_estimator == "full"


def test_overrides_parse_as_yaml_scalars_and_lists():
    config = load_config(preset("grpo"), [
        "seed=7", "optim.lr=1e-6", "grpo.eps_high=0.28", "train.resume=true", "grpo.dual_clip=3",
        "grpo.reward_functions=[arithmetic_exact]", "grpo.reward_weights=null", "sampling.stop_token_ids=[2, 7]",
        "run_dir=runs/x y", "model.ref_path=null", "data.synthetic.digits=1",
    ])
    assert config.seed == 7 and config.optim.lr == 1e-6 and config.grpo.eps_high == 0.28
    assert config.train.resume is True
    assert config.grpo.dual_clip == 3.0 and isinstance(config.grpo.dual_clip, float)
    assert config.grpo.reward_functions == ("arithmetic_exact",) and config.grpo.reward_weights is None
    assert config.sampling.stop_token_ids == (2, 7) and config.run_dir == "runs/x y"
    assert config.model.ref_path is None and config.data.synthetic.digits == 1
    assert config.data.synthetic.num_examples == 20000  # siblings of an overridden key survive


def test_yaml_round_trip_is_exact(tmp_path):
    config = load_config(preset("dapo"), [
        "run_dir=1e5", "data.task=yes.jsonl", "optim.lr=3e-7", "grpo.reward_weights=[1, 0.5]",
        "sampling.stop_token_ids=[0]", "model.critic_path='null'",
    ])
    assert config.run_dir == "1e5" and config.model.critic_path == "null"
    path = str(tmp_path / "sub" / "config.yaml")
    cfg.save_config(config, path)
    assert load_config(path) == config
    assert cfg.config_from_dict(cfg.config_to_dict(config)) == config


@pytest.mark.parametrize("override, expected", [
    ("grpo.eps_hihg=0.3", "unknown key 'grpo.eps_hihg', did you mean 'grpo.eps_high'?"),
    ("grpo.lr=1e-6", "unknown key 'grpo.lr', did you mean 'optim.lr'?"),
    ("gpro.group_size=4", "unknown key 'gpro', did you mean 'grpo'?"),
    ("mesh.zzz=1", "unknown key 'mesh.zzz', valid keys of mesh: data, fsdp, tensor, coordinator_address, "
                   "num_processes, process_id."),
    ("grpo.group_size=eight", "grpo.group_size must be an int, got 'eight'."),
    ("grpo.group_size=8.5", "grpo.group_size must be an int, got 8.5."),
    ("train.resume=1", "train.resume must be a bool, got 1."),
    ("optim.lr=fast", "optim.lr must be a float, got 'fast'."),
    ("grpo.dual_clip=high", "grpo.dual_clip must be a float or null, got 'high'."),
    ("grpo.reward_weights=[1, x]", "grpo.reward_weights[1] must be a float, got 'x'."),
    ("grpo.reward_functions=arithmetic_exact", "grpo.reward_functions must be a list of strings"),
    ("grpo=3", "grpo must be a mapping of its fields, got 3."),
    ("grpo.loss=gpso", "grpo.loss must be one of ppo, gspo, gspo_token, sapo, cispo, got 'gpso'; did you mean 'gspo'?"),
    ("grpo.kl_estimator=k4", "grpo.kl_estimator must be one of k1, k2, k3, full, got 'k4'"),
    ("algorithm=ppoo", "algorithm must be one of sft, rm, dpo, grpo, ppo, got 'ppoo'; did you mean 'ppo'?"),
    ("data.synthetic.operators=[/]", "data.synthetic.operators[0] must be one of +, -, *, got '/'."),
])
def test_unknown_keys_wrong_types_and_bad_enums(override, expected):
    assert expected in error_of(override)


def test_bucketing_reaches_the_sampler():
    from types import SimpleNamespace

    from jaxrl_llm.padding import Bucketing
    from jaxrl_llm.run.rollouts import sampling_config

    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    config = load_config(None, ["data.bucket=multiple", "data.bucket_size=8"])
    assert sampling_config(config, tokenizer, n=4).bucketing == Bucketing("multiple", 8)
    assert sampling_config(load_config(None, []), tokenizer, 4).bucketing == Bucketing("pow2", 16)
    assert sampling_config(load_config(None, ["sampling.ignore_eos=true"]), tokenizer, 4).stop_token_ids == ()
    with pytest.warns(UserWarning, match=r"sampling.prompt_bucket(_size)? is now data.bucket"):  # an old config.yaml
        old = load_config(None, ["sampling.prompt_bucket=multiple", "sampling.prompt_bucket_size=8"])
    assert (old.data.bucket, old.data.bucket_size) == ("multiple", 8)


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=-1e-3", "optim.lr must be > 0, got -0.001."),
    ("grpo.eps_high=-0.1", "grpo.eps_high must be >= 0, got -0.1."),
    ("sampling.top_p=1.5", "sampling.top_p must be in (0, 1], got 1.5; 1.0 turns nucleus sampling off."),
    ("sampling.top_p=0", "sampling.top_p must be in (0, 1], got 0.0"),
    ("sampling.temperature=0", "sampling.temperature must be > 0, got 0.0."),
    ("grpo.eps_low=1.0", "grpo.eps_low must be in [0, 1), got 1.0"),
    ("grpo.dual_clip=0.5", "grpo.dual_clip must be > 1, got 0.5; verl uses 3.0; null turns dual clipping off."),
    ("grpo.group_size=1", "grpo.group_size must be >= 2, got 1"),
    ("dpo.label_smoothing=0.5", "dpo.label_smoothing must be in [0, 0.5), got 0.5"),
    ("ppo.lam=1.5", "ppo.lam must be in [0, 1], got 1.5."),
    ("optim.b2=1", "optim.b2 must be in [0, 1), got 1.0."),
    ("optim.lr=.nan", "optim.lr must be a finite number, got nan."),
    ("mesh.fsdp=0", "mesh.fsdp must be a positive size or -1 (the remaining devices), got 0."),
    ("data.bucket_size=0", "data.bucket_size must be > 0, got 0."),
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf."),
    ("optim.lr=1e400", "optim.lr must be a finite number, got inf."),
    ("grpo.reward_weights=[.nan]", "grpo.reward_weights must hold finite numbers, got [nan]."),
    ("grpo.reward_functions=[arithmetic_exact, arithmetic_exact]",
     "grpo.reward_functions lists arithmetic_exact more than once; list it once"),
])
def test_impossible_values(override, expected):
    assert expected in error_of(override)


def test_inconsistent_sizes_name_the_fields_and_the_fix():
    assert "data.batch_size (12) must be a multiple of grpo.group_size (8)" in error_of("data.batch_size=12")
    assert "set data.batch_size=16." in error_of("data.batch_size=12")
    message = error_of("data.batch_size=24", "grpo.num_minibatches=5")
    assert "data.batch_size (24) must be a multiple of grpo.num_minibatches (5); set data.batch_size=25." in message
    message = error_of("train.grad_accum=3")
    assert "train.grad_accum (3) must divide the minibatch of 64 sequences" in message
    message = error_of("mesh.data=3")
    assert "the microbatch of 64 sequences must split over mesh.data × mesh.fsdp = 3 devices" in message
    assert "only one of mesh.data, mesh.fsdp, mesh.tensor may be -1" in error_of("mesh.fsdp=-1")
    assert "mesh.coordinator_address, mesh.num_processes and mesh.process_id" in error_of("mesh.num_processes=2")
    assert "mesh.process_id must be in [0, mesh.num_processes=2)" in error_of(
        "mesh.coordinator_address=localhost:1234", "mesh.num_processes=2", "mesh.process_id=2"
    )
    # Only the active algorithm's minibatches count.
    assert check(load_config(None, ["grpo.num_minibatches=5", "algorithm=sft"])).algorithm == "sft"
    message = error_of("algorithm=ppo", "model.reward_model_path=rm", "ppo.num_minibatches=5")
    assert "ppo.num_minibatches (5)" in message


def test_lengths_must_fit_the_model_positions():
    message = error_of("data.max_prompt_len=600", "data.max_completion_len=600")
    assert "data.max_prompt_len + data.max_completion_len = 1200 exceeds the model's 1024 positions" in message
    assert "512 positions" in error_of("model.source=some/folder", max_positions=512)
    assert load_config(None, ["model.source=some/folder", "data.max_prompt_len=4000"]).model.source == "some/folder"
    message = error_of("grpo.overlong_shaping=true", "grpo.overlong_buffer=512")
    assert "grpo.overlong_buffer (512) must be below data.max_completion_len (512)" in message


def test_algorithm_specific_requirements():
    assert "model.reward_model_path is required for ppo" in error_of("algorithm=ppo")
    message = error_of("algorithm=dpo")
    assert "data.task 'arithmetic' has no chosen, rejected fields, which dpo needs; use data.task=preference" in message
    assert check(load_config(None, ["algorithm=dpo", "data.task=preference"])).algorithm == "dpo"
    message = error_of("data.task=arithmetc")
    assert "data.task 'arithmetc' is not a built-in task" in message and "did you mean 'arithmetic'?" in message
    assert load_config(None, ["data.task=hf:gsm8k", "data.eval_size=20000"]).data.task == "hf:gsm8k"
    message = error_of("data.eval_size=20000")
    assert "data.eval_size (20000) leaves no training examples out of data.synthetic.num_examples" in message
    assert "model.tiny.num_heads (4) must be a multiple of model.tiny.num_kv_heads (3)" in error_of(
        "model.tiny.num_kv_heads=3")


def test_reward_functions_are_checked_before_training(tmp_path, monkeypatch):
    assert "grpo.reward_functions is empty" in error_of("grpo.reward_functions=[]")
    message = error_of("grpo.reward_weights=[1.0, 2.0, 3.0]")
    assert "grpo.reward_weights has 3 entries for 1 grpo.reward_functions" in message
    message = error_of("grpo.reward_functions=[arithmetic_exct]")
    assert "grpo.reward_functions[0]" in message and "did you mean 'arithmetic_exact'?" in message
    assert "cannot import module 'no_such_module'" in error_of("grpo.reward_functions=[no_such_module:f]")
    (tmp_path / "my_rewards.py").write_text("def brevity(prompts, completions, **fields):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config(None, ["grpo.reward_functions=[arithmetic_exact, 'my_rewards:brevity']"])
    assert config.grpo.reward_functions[1] == "my_rewards:brevity"


def test_validate_type_checks_configs_built_in_python():
    config = cfg.Config()
    bad = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, group_size="eight"))
    with pytest.raises(ConfigError, match="grpo.group_size must be an int, got 'eight'"):
        cfg.validate(bad)
    widened = dataclasses.replace(config, optim=dataclasses.replace(config.optim, lr=1))
    assert cfg.validate(widened).optim.lr == 1.0


def test_preset_files_and_overrides_fail_clearly(tmp_path):
    assert "config file 'nope.yaml' not found" in error_of(path="nope.yaml")
    assert "must look like key.sub=value" in error_of("optim.lr")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    assert "loops back" in error_of(path=str(tmp_path / "a.yaml"))
    (tmp_path / "bad.yaml").write_text("grpo: [unclosed\n")
    assert "is not valid YAML" in error_of(path=str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert "must hold a mapping of sections" in error_of(path=str(tmp_path / "list.yaml"))
    assert f"config file {str(tmp_path)!r} is a folder; pass a YAML preset" in error_of(path=str(tmp_path))
    (tmp_path / "latin1.yaml").write_bytes("seed: 1  # caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text (byte 14)" in error_of(path=str(tmp_path / "latin1.yaml"))
    (tmp_path / "child.yaml").write_text("base: ../parent.yaml\ngrpo: {eps_hihg: 1}\n")
    (tmp_path.parent / "parent.yaml").write_text("seed: 3\n")
    assert "unknown key 'grpo.eps_hihg', did you mean 'grpo.eps_high'?" in error_of(path=str(tmp_path / "child.yaml"))


@pytest.mark.parametrize("kind", ["ppo", "gspo", "gspo_token", "sapo", "cispo"])
def test_the_config_defaults_are_the_math_defaults(kind):
    """A config left at its defaults computes what the core function computes with its own defaults."""
    import jax.numpy as jnp
    import numpy as np

    from jaxrl_llm.algorithms.grpo import _loss_kwargs
    from jaxrl_llm.core import policy_loss

    rng = np.random.default_rng(0)
    logp = jnp.asarray(-np.abs(rng.normal(size=(3, 5))), jnp.float32)
    old = logp + jnp.asarray(rng.normal(size=(3, 5)) * 0.5, jnp.float32)
    adv, mask = jnp.asarray(rng.normal(size=3), jnp.float32), jnp.ones((3, 5))
    section = cfg.GRPOSection(loss=kind)
    configured, _ = policy_loss(logp, old, adv, mask, kind, **_loss_kwargs(section))
    default, _ = policy_loss(logp, old, adv, mask, kind)
    np.testing.assert_array_equal(configured, default)


def test_a_switch_of_another_policy_loss_is_refused():
    assert "grpo.dual_clip applies to grpo.loss=ppo only; grpo.loss=gspo ignores it" in error_of(
        "grpo.loss=gspo", "grpo.dual_clip=3.0"
    )
    assert load_config(overrides=["grpo.dual_clip=3.0"]).grpo.dual_clip == 3.0
