"""The training loop end to end on tiny models: files a run leaves, exact resume, the RLHF pipeline."""

import dataclasses
import glob
import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import checkpoint
from jaxrl_llm.config import load_config
from jaxrl_llm.errors import TrainingError
from jaxrl_llm.metrics import MetricsWriter
from jaxrl_llm.models.load import load_model, load_scalar_model
from jaxrl_llm.run.examples import prepare_examples
from jaxrl_llm.run.loop import run_phase, train
from jaxrl_llm.run.outputs import finish
from jaxrl_llm.run.phases import sft_phase
from jaxrl_llm.run.policy import load_policy
from jaxrl_llm.run.registry import ALGORITHMS
from jaxrl_llm.run.sweep import train_runs

pytestmark = pytest.mark.usefixtures("xla_disk_cache")  # see conftest.py

SFT_FIELDS = ALGORITHMS["sft"].fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.head_dim=8", "data.synthetic.num_examples=400", "data.eval_size=16",
]


def config(preset, run_dir, *overrides):
    return load_config(os.path.join(ROOT, "configs", f"{preset}.yaml"), [*TINY, f"run_dir={run_dir}", *overrides])


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


def test_cli_rejects_a_typo_before_compiling():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "grpo.eps_hihg=0.3"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "did you mean 'grpo.eps_high'" in out.stderr


def test_cli_help_lists_the_algorithms_and_presets():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    assert "algorithms: " + ", ".join(ALGORITHMS) in out.stdout
    for path in glob.glob(os.path.join(ROOT, "configs", "*.yaml")):
        assert os.path.basename(path)[:-5] in out.stdout, path


def test_the_end_of_a_run_prints_a_summary_and_draws_the_plot(tmp_path, capsys):
    cfg = config("grpo", tmp_path / "run", "train.export_hf=false")  # no policy to export here
    writer = MetricsWriter(cfg.run_dir)
    for step in range(3):
        writer.write(step, {"loss": 1.0 / (step + 1), "reward/mean": 0.1 * step, "kl": 0.01, "grad_norm": 2.0})
    writer.close()
    finish(cfg, None, {"loss": 0.33, "reward/mean": 0.2, "kl": 0.01, "grad_norm": 2.0, "eval/accuracy": 0.5,
                       "before/eval/accuracy": 0.125}, quiet=False)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == f"grpo run in {cfg.run_dir}" and len(printed) <= 25
    assert any(line.split()[:2] == ["eval/accuracy", "0.5"] and "(before: 0.125)" in line for line in printed)
    assert any(line.split()[0] == "reward/mean" for line in printed)
    assert not any("grad_norm" in line for line in printed)  # the screen shows the main numbers only
    with open(os.path.join(cfg.run_dir, "summary.json")) as file:
        assert json.load(file)["eval/accuracy"] == 0.5
    assert os.path.getsize(os.path.join(cfg.run_dir, "metrics.png")) > 1000


def test_sft_run_leaves_its_files_and_resumes_exactly(tmp_path):
    common = ["data.batch_size=8", "train.eval_every=3", "train.checkpoint_every=3", "data.max_completion_len=16",
              "data.max_prompt_len=48"]
    whole = train(config("sft", tmp_path / "whole", "train.total_steps=6", *common), quiet=True)
    files = ("metrics.jsonl", "metrics.png", "summary.json", "config.yaml", "hf/config.json", "hf/model.safetensors")
    for name in files:
        assert os.path.exists(os.path.join(whole.run_dir, name)), name
    logged = rows(whole.run_dir)
    assert [r["step"] for r in logged] == list(range(6)) and "eval/loss" in logged[2]

    train(config("sft", tmp_path / "split", "train.total_steps=3", *common), quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # running longer is no change worth a warning
        longer = config("sft", tmp_path / "split", "train.total_steps=6", "train.resume=true", *common)
        resumed = train(longer, quiet=True)
    for a, b in zip(jax.tree.leaves(whole.policy.params), jax.tree.leaves(resumed.policy.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert [r["step"] for r in rows(resumed.run_dir)] == list(range(6))
    assert [r["loss"] for r in rows(resumed.run_dir)][3:] == pytest.approx([r["loss"] for r in logged][3:], rel=1e-6)
    with pytest.raises(TrainingError, match="train.resume=true"):
        train(config("sft", tmp_path / "split", "train.total_steps=6", *common), quiet=True)
    # Resuming a finished run (as an RL run does with its warm start) keeps its summary.
    summary = json.loads(open(os.path.join(resumed.run_dir, "summary.json")).read())
    assert "eval/loss" in summary and "loss" in summary
    saved = open(os.path.join(resumed.run_dir, "config.yaml")).read()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing runs, so a changed lr changes nothing and is not written down
        again = train(config("sft", tmp_path / "split", "train.total_steps=6", "train.resume=true", "optim.lr=5e-4",
                             *common), quiet=True)
    assert json.loads(open(os.path.join(again.run_dir, "summary.json")).read()) == summary == again.metrics
    assert open(os.path.join(resumed.run_dir, "config.yaml")).read() == saved
    with pytest.warns(UserWarning, match=r"differs from its saved config.yaml in optim.lr: 0.001 -> 0.0005"):
        train(config("sft", tmp_path / "split", "train.total_steps=7", "train.resume=true", "optim.lr=5e-4",
                     *common), quiet=True)


@pytest.mark.parametrize("preset", ["sft", "grpo"])
def test_a_run_without_held_out_examples_skips_evaluation(tmp_path, preset):
    result = train(config(preset, tmp_path / preset, "data.eval_size=0", "train.total_steps=2", "train.eval_every=1",
                          "train.sft_warmup_steps=1", "data.batch_size=8", "data.max_completion_len=8"), quiet=True)
    assert "loss" in result.metrics and not any("eval/" in name for name in result.metrics)


def test_grpo_run_with_warm_start_and_dynamic_sampling(tmp_path):
    result = train(config(
        "dapo", tmp_path / "dapo", "train.sft_warmup_steps=2", "train.total_steps=2", "data.batch_size=16",
        "grpo.group_size=4", "train.eval_every=2", "data.max_completion_len=8", "grpo.overlong_buffer=2",
        "grpo.dynamic_sampling_max_tries=2",
    ), quiet=True)
    assert os.path.exists(os.path.join(result.run_dir, "sft_warmup", "metrics.jsonl"))
    last = rows(result.run_dir)[-1]
    for name in ("loss", "pg_loss", "reward/mean", "reward/std", "reward/arithmetic_exact", "clipfrac", "clipfrac/high",
                 "approx_kl", "entropy", "response_length/mean", "response_length/max", "truncated_fraction",
                 "time/generation", "time/train", "grad_norm", "lr", "tokens_per_s", "eval/accuracy",
                 "dynamic_sampling/tries"):
        assert name in last, name
    assert 1 <= last["dynamic_sampling/tries"] <= 2


def test_rlhf_pipeline_sft_rm_ppo_and_dpo(tmp_path):
    """SFT -> RM -> PPO and SFT -> DPO, checkpoints passed from stage to stage by path."""
    short = ["train.total_steps=2", "train.eval_every=2", "data.batch_size=8", "data.max_completion_len=16",
             "data.max_prompt_len=48"]
    sft = train(config("sft", tmp_path / "sft", *short), quiet=True)
    sft_hf = os.path.join(sft.run_dir, "hf")
    rm = train(config("rm", tmp_path / "rm", f"model.source={sft_hf}", "train.export_hf=true", *short), quiet=True)
    assert "eval/accuracy" in rows(rm.run_dir)[-1]
    ppo_config = config(
        "ppo", tmp_path / "ppo", f"model.source={sft_hf}", f"model.reward_model_path={os.path.join(rm.run_dir, 'hf')}",
        "ppo.epochs=1", *short,
    )
    ppo = train(ppo_config, quiet=True)
    last = rows(ppo.run_dir)[-1]
    # The same run in a sweep over the critic's lr and β (actor, critic, reference and reward model in
    # one program; the frozen ones kept once) equals it, metric for metric.
    sweep = train_runs(
        [dataclasses.replace(ppo_config, run_dir=str(tmp_path / "sweep" / name),
                             optim=dataclasses.replace(ppo_config.optim, critic_lr=lr),
                             ppo=dataclasses.replace(ppo_config.ppo, kl_coef=beta))
         for name, lr, beta in (("same", ppo_config.optim.critic_lr, ppo_config.ppo.kl_coef), ("other", 1e-3, 0.2))],
        str(tmp_path / "sweep"), run_axis="map", quiet=True,
    )
    assert [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))}
            for r in rows(sweep.runs[0].run_dir)] == [
            {k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))} for r in rows(ppo.run_dir)]
    assert rows(sweep.runs[1].run_dir)[-1]["vf_loss"] != last["vf_loss"]
    for name in ("pg_loss", "vf_loss", "score/mean", "score/std", "reward/mean", "kl", "entropy", "clipfrac",
                 "approx_kl", "explained_variance", "value_clipfrac", "response_length/mean", "response_length/max",
                 "truncated_fraction", "grad_norm/actor", "grad_norm/critic", "lr", "tokens_per_s", "time/generation",
                 "time/train", "eval/preference_score"):
        assert name in last, name
    dpo = train(config("dpo", tmp_path / "dpo", f"model.source={sft_hf}", *short), quiet=True)
    assert rows(dpo.run_dir)[0]["loss"] == pytest.approx(np.log(2.0), rel=1e-5)
    # Every stage hands back its model by default: transformers computes what we compute.
    for result in (sft, rm, ppo, dpo):
        assert_transformers_agrees(os.path.join(result.run_dir, "hf"), result.policy.params)
    critic_hf = os.path.join(ppo.run_dir, "critic_hf")
    assert_transformers_agrees(critic_hf, load_scalar_model(critic_hf).params)
    with open(os.path.join(ppo.run_dir, "hf", "README.md")) as file:
        card = file.read()
    assert "ppo policy" in card and "eval/preference_score" in card and "AutoModelForCausalLM" in card


def assert_transformers_agrees(folder: str, params) -> None:
    """transformers loads `folder` and computes what our model computes with `params` (a reward or value
    model's score up to its head's bias, which HF's classifier lacks)."""
    import torch
    import transformers

    scalar = "head" in params
    ours_model = (load_scalar_model if scalar else load_model)(folder)
    tokens_BxT = np.arange(3, 11, dtype=np.int32)[None] % ours_model.config.vocab_size
    ours = np.asarray(ours_model.logits(params, tokens_BxT, np.ones_like(tokens_BxT)))
    auto = transformers.AutoModelForSequenceClassification if scalar else transformers.AutoModelForCausalLM
    with torch.no_grad():
        theirs = auto.from_pretrained(folder, dtype=torch.float32).eval()(
            input_ids=torch.as_tensor(tokens_BxT, dtype=torch.long)).logits.numpy()
    if scalar:
        ours, theirs = ours[:, -1] - np.asarray(params["head"]["bias"]), theirs[:, 0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(theirs).max()))


def test_grpo_with_a_reward_model_as_reward_function(tmp_path):
    short = ["train.total_steps=1", "data.batch_size=8", "data.max_completion_len=8", "data.max_prompt_len=48"]
    sft = train(config("sft", tmp_path / "sft", *short), quiet=True)
    rm = train(config("rm", tmp_path / "rm", f"model.source={os.path.join(sft.run_dir, 'hf')}",
                      "train.export_hf=true", "train.eval_every=0", *short), quiet=True)
    run = train(config(
        "grpo", tmp_path / "grpo", "data.task=preference", "grpo.group_size=4", "train.sft_warmup_steps=0",
        "grpo.reward_functions=[reward_model, preference_score]", "grpo.reward_weights=null",
        f"model.reward_model_path={os.path.join(rm.run_dir, 'hf')}", "train.eval_every=0", *short,
    ), quiet=True)
    last = rows(run.run_dir)[-1]
    assert "reward/reward_model" in last and "reward/preference_score" in last and last["tokens_per_s"] > 0
    assert_transformers_agrees(os.path.join(run.run_dir, "hf"), run.policy.params)


@pytest.mark.parametrize("preset", ["gspo", "sapo", "dr_grpo"])
def test_variant_presets_run(tmp_path, preset):
    run = train(config(
        preset, tmp_path / preset, "train.sft_warmup_steps=0", "train.total_steps=1", "data.batch_size=8",
        "grpo.group_size=4", "data.max_completion_len=8", "train.eval_every=0",
    ), quiet=True)
    assert np.isfinite(rows(run.run_dir)[-1]["loss"])


def test_grpo_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = ["train.sft_warmup_steps=0", "data.batch_size=8", "grpo.group_size=4", "data.max_completion_len=8",
              "train.eval_every=0", "grpo.kl_coef=0.1", "optim.lr=1e-3"]
    whole = train(config("grpo", tmp_path / "whole", "train.total_steps=3", *common), quiet=True)
    train(config("grpo", tmp_path / "split", "train.total_steps=2", *common), quiet=True)
    resumed = train(config("grpo", tmp_path / "split", "train.total_steps=3", "train.resume=true", *common), quiet=True)
    straight, split = rows(whole.run_dir), rows(resumed.run_dir)
    for name in ("loss", "reward/mean", "kl", "entropy", "response_length/mean"):
        assert [r[name] for r in split] == pytest.approx([r[name] for r in straight], rel=1e-5, abs=1e-7), name
    for a, b in zip(jax.tree.leaves(whole.policy.params), jax.tree.leaves(resumed.policy.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = config("sft", tmp_path / "nan", "train.total_steps=6", "train.checkpoint_every=2", "train.eval_every=0",
                 "data.batch_size=8", "data.max_completion_len=16", "data.max_prompt_len=48")
    policy = load_policy(cfg)
    phase = sft_phase(cfg, policy, *prepare_examples(cfg, policy.tokenizer, SFT_FIELDS))
    good_step = phase.step

    def poisoned(state, batch, key):
        state, out = good_step(state, batch, key)
        return state, {**out, "loss": jnp.where(state.step >= 4, jnp.nan, out["loss"])}

    with pytest.raises(TrainingError, match="step 3: non-finite loss"):
        run_phase(cfg, dataclasses.replace(phase, step=poisoned), policy, quiet=True)
    manager = checkpoint.checkpoint_manager(os.path.join(cfg.run_dir, "checkpoints"))
    assert manager.all_steps() == [1]


def test_ctrl_c_saves_the_last_finished_step_and_resume_matches_the_uninterrupted_run(tmp_path, capsys):
    """Ctrl-C while step 4's batch is being built: step 3 is saved, the interrupt propagates, and
    resuming ends where six straight steps end (same seed, same metrics)."""
    common = ["data.batch_size=8", "train.eval_every=0", "train.checkpoint_every=0", "data.max_completion_len=16",
              "data.max_prompt_len=48", "optim.lr=3e-3"]
    start = load_policy(config("sft", tmp_path / "whole", *common))
    examples = prepare_examples(config("sft", tmp_path / "whole", *common), start.tokenizer, SFT_FIELDS)
    runs, evaluate = {}, None
    for name, overrides in (("whole", []), ("cut", []), ("resumed", ["train.resume=true"])):
        run_dir = tmp_path / ("whole" if name == "whole" else "cut")
        cfg = config("sft", run_dir, "train.total_steps=6", *common, *overrides)
        policy = dataclasses.replace(start, params=jax.tree.map(jnp.copy, start.params))  # the step donates its state
        phase = sft_phase(cfg, policy, *examples)
        evaluate = evaluate or phase.evaluate  # its jitted loss compiles once
        phase = dataclasses.replace(phase, evaluate=evaluate)
        if name != "cut":
            runs[name] = run_phase(cfg, phase, policy, quiet=True)
            continue
        def interrupted_at_4(state, step, make_batch=phase.make_batch):
            if step == 4:
                raise KeyboardInterrupt
            return make_batch(state, step)

        with pytest.raises(KeyboardInterrupt):
            run_phase(cfg, dataclasses.replace(phase, make_batch=interrupted_at_4), policy, quiet=True)
        assert "interrupted: step 3 is saved" in capsys.readouterr().out
        manager = checkpoint.checkpoint_manager(os.path.join(cfg.run_dir, "checkpoints"))
        assert manager.all_steps() == [3]
        assert [r["step"] for r in rows(cfg.run_dir)] == [0, 1, 2, 3]

    for a, b in zip(jax.tree.leaves(runs["whole"].policy.params), jax.tree.leaves(runs["resumed"].policy.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    straight, resumed = rows(runs["whole"].run_dir), rows(runs["resumed"].run_dir)
    assert [r["step"] for r in resumed] == list(range(6))
    for name in ("loss", "grad_norm", "lr", "tokens"):
        assert [r[name] for r in resumed] == [r[name] for r in straight], name
