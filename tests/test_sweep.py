"""Sweeps: declaring them, which runs share a program, each run of a sweep equal to the same run done
alone (GRPO and DPO, both run axes), equal configs giving equal trajectories, an exact resume, and
the paired statistics against float64 NumPy and Student-t tables."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_steps import CONFIG, SETUPS, pairs, rollout, tiny_params

from jaxrl_llm import compare
from jaxrl_llm.algorithms.dpo import make_dpo_step
from jaxrl_llm.algorithms.grpo import make_grpo_step
from jaxrl_llm.algorithms.ppo import make_ppo_step
from jaxrl_llm.algorithms.rm import make_rm_step
from jaxrl_llm.config import ConfigError, DPOSection, GRPOSection, OptimSection, PPOSection, RMSection
from jaxrl_llm.config.schema import RolloutCorrectionSection
from jaxrl_llm.config.sweeps import VMAPPED, load_sweep, structure, varying
from jaxrl_llm.run import train, train_sweep
from jaxrl_llm.run.sweep import _replace_path, group_by_structure
from jaxrl_llm.state import TrainState, make_optimizer

pytestmark = pytest.mark.usefixtures("xla_disk_cache")  # see conftest.py

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = os.path.join(os.path.dirname(HERE), "configs")
# Small GRPO: a 2-step warm start, then 3 steps of 4 prompts x 4 answers, evaluated twice.
GRPO = ["data.batch_size=16", "grpo.group_size=4", "train.total_steps=3", "train.sft_warmup_steps=2",
        "train.sft_warmup_batch_size=16", "train.eval_every=2", "data.eval_size=8", "train.checkpoint_every=1",
        "grpo.kl_placement=loss", "train.export_hf=false", "data.synthetic.num_examples=200"]
DPO = ["model.source=tiny", "data.task=preference", "data.batch_size=4", "data.eval_size=8", "train.total_steps=3",
       "train.eval_every=2", "train.checkpoint_every=0", "train.export_hf=false", "data.synthetic.num_examples=200"]
SWEPT = ["sweep.seed=[0,1]", "sweep.grpo.kl_coef=[0.0,0.02,0.04]"]
TIMINGS = ("time/", "tokens_per_s")


def sweep_of(preset, run_dir, *overrides):
    return load_sweep(os.path.join(PRESETS, preset), [*overrides, f"run_dir={run_dir}"])


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def assert_same_rows(got, want, rtol=0.0, skip=()):
    """Every metric of `want` (timings and `skip` aside) in `got`, row for row, within `rtol`."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for name, value in w.items():
            if name.startswith(TIMINGS) or name in skip:
                continue
            assert g[name] == pytest.approx(value, rel=rtol, abs=rtol / 10), (w["step"], name)


def solo_rows(sweep, tmp_path, index):
    """The metrics of run `index` of `sweep` trained alone."""
    config = sweep.runs()[index]
    solo = dataclasses.replace(config, run_dir=str(tmp_path / f"solo_{index}"))
    train(solo, quiet=True)
    return rows(solo.run_dir), rows(os.path.join(solo.run_dir, "sft_warmup")) if config.train.sft_warmup_steps else []


# ---------------------------------------------------------------- declaring a sweep


def test_a_grid_crosses_the_axes_and_a_zip_pairs_them(tmp_path):
    grid = sweep_of("default.yaml", tmp_path, "sweep.seed=[0,1]", "sweep.optim.lr=[1e-3,3e-4]")
    assert [(c.seed, c.optim.lr) for c in grid.runs()] == [(0, 1e-3), (0, 3e-4), (1, 1e-3), (1, 3e-4)]
    assert [c.run_dir for c in grid.runs()] == [str(tmp_path / f"run_{i:02d}") for i in range(4)]
    zipped = sweep_of("default.yaml", tmp_path, "sweep.seed=[0,1]", "sweep.optim.lr=[1e-3,3e-4]", "sweep.mode=zip")
    assert [(c.seed, c.optim.lr) for c in zipped.runs()] == [(0, 1e-3), (1, 3e-4)]
    assert sweep_of("default.yaml", tmp_path) is None


def test_a_sweep_section_in_a_preset(tmp_path):
    preset = tmp_path / "sweep.yaml"
    preset.write_text(f"base: {PRESETS}/grpo.yaml\nsweep:\n  seed: [0, 1, 2]\n  grpo.kl_coef: [0.0, 0.04]\n"
                      "  grpo:\n    eps_high: [0.28]\n  parallel: 2\n")
    sweep = load_sweep(str(preset), [f"run_dir={tmp_path}"])
    assert len(sweep.runs()) == 6 and sweep.parallel == 2
    assert {c.grpo.eps_high for c in sweep.runs()} == {0.28}


@pytest.mark.parametrize("overrides, message", [
    (["sweep.optim.lrr=[1e-3]"], "did you mean 'optim.lr'"),
    (["sweep.seed=3"], "sweep.seed must be a non-empty list"),
    (["sweep.seed=[]"], "sweep.seed must be a non-empty list"),
    (["sweep.optim.lr=[fast]"], "sweep run 0 (optim.lr=fast): optim.lr must be a float"),
    (["sweep.seed=[0,1]", "sweep.optim.lr=[1e-3]", "sweep.mode=zip"], "need one length; got seed: 2, optim.lr: 1"),
    (["sweep.seed=[0]", "sweep.mode=random"], "sweep.mode must be one of grid, zip"),
    (["sweep.seed=[0]", "sweep.parallel=-1"], "sweep.parallel must be an int >= 0"),
    (["sweep.seed=[0]", "sweep.run_axis=pmap"], "sweep.run_axis must be one of auto, vmap, map"),
    (["sweep.run_dir=[a,b]"], "not a config field a sweep can vary"),
    (["sweep.grpo.group_size=[3]"], "sweep run grpo.group_size=3: data.batch_size"),
])
def test_a_bad_sweep_is_one_error_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        train_sweep(sweep_of("default.yaml", tmp_path, *overrides), quiet=True)  # fails before loading
    assert message in str(error.value)


def test_a_plain_config_refuses_a_sweep_and_the_command_line_reports_it(tmp_path):
    from jaxrl_llm.config import load_config

    with pytest.raises(ConfigError, match="load it with config.load_sweep"):
        load_config(os.path.join(PRESETS, "default.yaml"), ["sweep.seed=[0,1]"])
    train_py = os.path.join(os.path.dirname(HERE), "train.py")
    done = subprocess.run([sys.executable, train_py, "sweep.seed=[0,1]", "sweep.optim.lrr=[1]"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "did you mean 'optim.lr'" in done.stderr, done.stderr


def test_numbers_share_a_program_and_switches_do_not(tmp_path):
    sweep = sweep_of("grpo.yaml", tmp_path, "sweep.seed=[0,1]", "sweep.optim.lr=[1e-5,3e-5]",
                     "sweep.grpo.loss=[ppo,gspo]", "sweep.grpo.reward_weights=[[1.0,0.1],[1.0,0.0]]")
    configs = sweep.runs()
    programs = group_by_structure(configs)
    assert len(programs) == 2 and all(len(p) == 8 for p in programs)
    assert {configs[i].grpo.loss for i in programs[0]} == {"ppo"}
    assert varying([configs[i] for i in programs[0]]) == ["optim.lr"]
    # Switching a number off (None) is structure; a value is not.
    on, off = (dataclasses.replace(configs[0], optim=dataclasses.replace(configs[0].optim, grad_clip=v))
               for v in (0.5, None))
    assert structure(on) == structure(configs[0]) != structure(off)


# ---------------------------------------------------------------- every vmapped number is only computed with


def _traced(section, paths, values):
    """`section` with each field of `paths` set to its entry of the traced `values`."""
    for path, value in zip(paths, values):
        section = _replace_path(section, [path.split(".", 1)[1]], value)
    return section


def _section_steps():
    """(prefix, base section, trace(section) -> the step's outputs) of every section with vmapped numbers."""
    rng = np.random.default_rng(0)
    params = tiny_params(CONFIG, 0)
    key = jax.random.key(0)

    def optim(o):
        tx = make_optimizer(o.lr, 10, "cosine", 0, o.weight_decay, o.b1, o.b2, o.eps, o.grad_clip)
        critic = make_optimizer(o.critic_lr, 10)
        grads = jax.tree.map(jnp.ones_like, params)
        return (TrainState.create(params, tx).apply_gradients(grads).params,
                TrainState.create(params, critic).apply_gradients(grads).params)

    def step(setup, factory, batch):
        state = SETUPS[setup](CONFIG)[0]
        rows = jax.tree.map(jnp.asarray, batch(rng))
        return lambda section: factory(CONFIG, section)(state, rows, key)

    grpo = step("grpo", make_grpo_step, rollout)

    def sampled(rng):  # a rollout carrying the sampler's log-probs, some far from the trainer's
        batch = rollout(rng)
        logp = -rng.uniform(0.1, 3.0, batch.tokens_RxT.shape).astype(np.float32)
        return batch.replace(rollout_logp_RxT=logp * batch.completion_mask_RxT)

    corrected_step = lambda config, c: make_grpo_step(config, GRPOSection(group_size=4), correction=c)
    correction = step("grpo", corrected_step, sampled)
    return [
        ("optim", OptimSection(grad_clip=1.0), optim),
        ("grpo", GRPOSection(group_size=4, kl_coef=0.04, dual_clip=3.0, num_minibatches=2), grpo),
        ("grpo", GRPOSection(group_size=4, loss="gspo", num_minibatches=2), grpo),
        ("grpo", GRPOSection(group_size=4, loss="sapo", num_minibatches=2), grpo),
        ("grpo", GRPOSection(group_size=4, loss="cispo", num_minibatches=2), grpo),
        ("dpo", DPOSection(loss="robust", label_smoothing=0.1), step("dpo", make_dpo_step, pairs)),
        ("rm", RMSection(margin=0.5, center_coef=0.01), step("rm", make_rm_step, pairs)),
        ("ppo", PPOSection(missing_stop_penalty=1.0, entropy_coef=0.01), step("ppo", make_ppo_step, rollout)),
        ("rollout_correction", RolloutCorrectionSection(is_level="token", mask_level="token", mask_low=0.2,
                                                        mask_high=5.0), correction),
    ]


def test_every_vmapped_number_traces_as_an_array_and_changes_the_step():
    """Each field of VMAPPED goes into its step as a traced array (a Python branch on it would raise)
    and reaches the result: the step's outputs depend on it."""
    covered = set()
    for prefix, section, run in _section_steps():
        paths = [p for p in VMAPPED if p.startswith(prefix + ".") and getattr(section, p.split(".", 1)[1]) is not None]
        values = [float(getattr(section, p.split(".", 1)[1])) for p in paths]
        traced = lambda *v, run=run, section=section, paths=paths: run(_traced(section, paths, v))
        jaxpr = jax.make_jaxpr(traced)(*values)
        used = {id(v) for eqn in jaxpr.jaxpr.eqns for v in eqn.invars}
        unused = [p for p, var in zip(paths, jaxpr.jaxpr.invars) if id(var) not in used]
        # Each loss kind reads only its own numbers; every number is read by some kind.
        covered |= {p for p in paths if p not in unused}
    assert covered == set(VMAPPED), set(VMAPPED) - covered


# ---------------------------------------------------------------- each run of a sweep equals the run alone


@pytest.fixture(scope="module")
def grpo_sweep(tmp_path_factory):
    """Seeds 0, 1 x β 0, 0.02, 0.04 on lax.map: two programs, one without a reference model and one
    whose runs share theirs, β traced."""
    root = tmp_path_factory.mktemp("grpo_sweep")
    sweep = sweep_of("default.yaml", root / "sweep", *GRPO, *SWEPT, "sweep.run_axis=map")
    result = train_sweep(sweep, quiet=True)
    return sweep, result, root


def test_each_run_of_a_grpo_sweep_equals_the_run_alone(grpo_sweep):
    sweep, result, root = grpo_sweep
    assert [r.run_dir for r in result.runs] == [c.run_dir for c in sweep.runs()]
    for index in (0, 5):  # seed 0 without KL, seed 1 with β = 0.04
        want, want_warm = solo_rows(sweep, root, index)
        run_dir = sweep.runs()[index].run_dir
        assert_same_rows(rows(os.path.join(run_dir, "sft_warmup")), want_warm)
        assert_same_rows(rows(run_dir), want)
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as file:
            assert result.runs[index].metrics["eval/accuracy"] == json.load(file)["eval/accuracy"]


def test_vmapped_runs_equal_the_runs_alone_within_float32(grpo_sweep, tmp_path):
    sweep, _, _ = grpo_sweep
    vmapped = sweep_of("default.yaml", tmp_path / "v", *GRPO, "sweep.seed=[0,1]", "sweep.grpo.kl_coef=[0.02,0.04]",
                       "sweep.run_axis=vmap")
    train_sweep(vmapped, quiet=True)
    for index, same in ((0, 1), (3, 5)):
        assert_same_rows(rows(vmapped.runs()[index].run_dir), rows(sweep.runs()[same].run_dir), rtol=1e-4)


def test_a_lora_sweep_keeps_one_frozen_base_and_equals_the_run_alone(tmp_path):
    sweep = sweep_of("default.yaml", tmp_path / "sweep", *GRPO, "train.sft_warmup_steps=0", "model.lora.rank=4",
                     "grpo.kl_coef=0.04", "sweep.optim.lr=[1e-2,3e-3]", "sweep.run_axis=map")
    result = train_sweep(sweep, quiet=True)
    first, second = (run.policy.params for run in result.runs)
    # The base is every run's own object (never stacked), the adapters are each run's.
    assert first["embed"]["embedding"] is second["embed"]["embedding"]
    assert first["layers"]["attn"]["q_proj"]["kernel"] is second["layers"]["attn"]["q_proj"]["kernel"]
    assert not np.allclose(first["layers"]["attn"]["q_proj"]["lora_b"], second["layers"]["attn"]["q_proj"]["lora_b"])
    want, _ = solo_rows(sweep, tmp_path, 1)
    assert_same_rows(rows(sweep.runs()[1].run_dir), want)


def test_runs_with_equal_configs_have_equal_trajectories(tmp_path):
    sweep = sweep_of("default.yaml", tmp_path, *GRPO, "train.sft_warmup_steps=0", "sweep.optim.lr=[1e-3,1e-3]",
                     "sweep.run_axis=vmap")
    train_sweep(sweep, quiet=True)
    untimed = lambda run_dir: [{k: v for k, v in r.items() if not k.startswith(TIMINGS)} for r in rows(run_dir)]
    first, second = (untimed(c.run_dir) for c in sweep.runs())
    assert first == second


def test_each_run_of_a_dpo_sweep_in_chunks_equals_the_run_alone(tmp_path):
    sweep = sweep_of("dpo.yaml", tmp_path / "sweep", *DPO, "sweep.seed=[0,1]", "sweep.dpo.beta=[0.1,0.5]",
                     "sweep.parallel=3", "sweep.run_axis=map")
    train_sweep(sweep, quiet=True)
    for index in (1, 3):  # one in each chunk
        want, _ = solo_rows(sweep, tmp_path, index)
        assert_same_rows(rows(sweep.runs()[index].run_dir), want)


def test_a_vmapped_dpo_sweep_equals_the_runs_alone_within_float32(tmp_path):
    sweep = sweep_of("dpo.yaml", tmp_path / "sweep", *DPO, "sweep.dpo.beta=[0.1,0.5]", "sweep.run_axis=vmap")
    train_sweep(sweep, quiet=True)
    want, _ = solo_rows(sweep, tmp_path, 1)
    # At step 0 the policy is its reference, so every margin is an exact tie in the run alone and a
    # ±1e-8 one in the vmapped run: the share of positive margins is not continuous there.
    assert_same_rows(rows(sweep.runs()[1].run_dir), want, rtol=1e-4, skip=("rewards/accuracies",))


def test_a_resumed_sweep_equals_the_uninterrupted_one(grpo_sweep, tmp_path):
    sweep, _, _ = grpo_sweep
    again = sweep_of("default.yaml", tmp_path, *GRPO, *SWEPT, "sweep.run_axis=map")

    def stop_after_step_1(name, run_dir, step):  # Ctrl-C during step 1 of the first program
        if name == "step" and step == 1 and run_dir == again.runs()[0].run_dir:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train_sweep(again, quiet=True, on_event=stop_after_step_1)
    resumed = sweep_of("default.yaml", tmp_path, *GRPO, *SWEPT, "sweep.run_axis=map", "train.resume=true")
    train_sweep(resumed, quiet=True)
    for mine, straight in zip(resumed.runs(), sweep.runs()):
        assert_same_rows(rows(mine.run_dir), rows(straight.run_dir))


def test_the_sweep_writes_its_index_plot_and_comparison(grpo_sweep, capsys):
    sweep, _, root = grpo_sweep
    run_dir = sweep.base.run_dir
    index = compare.read_index(run_dir)
    assert [r["setting"] for r in index["runs"]] == sweep.settings()
    assert os.path.isfile(os.path.join(run_dir, "sweep.png"))
    from jaxrl_llm import sweep as sweep_cli

    assert sweep_cli.main([run_dir, "--plot", str(root / "cmp.png")]) == 0
    out = capsys.readouterr().out
    assert "grpo.kl_coef=0.0 − grpo.kl_coef=0.04" in out and "2 seeds" in out and os.path.isfile(root / "cmp.png")


# ---------------------------------------------------------------- paired statistics


@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027), (7, 2.3646), (30, 2.0423)])
def test_t_quantiles_match_the_table(df, quantile):
    assert compare.t_quantile(0.975, df) == pytest.approx(quantile, abs=2e-4)
    assert compare.t_cdf(quantile, df) == pytest.approx(0.975, abs=2e-5)


def test_the_paired_interval_and_p_value_match_float64_numpy():
    rng = np.random.default_rng(3)
    a = {s: float(v) for s, v in enumerate(rng.normal(0.8, 0.05, 8))}
    b = {s: a[s] - float(d) for s, d in enumerate(rng.normal(0.03, 0.02, 8))}
    b[99] = 0.0  # a seed only one side ran is left out
    got = compare.paired(a, b)
    d = np.array([a[s] - b[s] for s in range(8)], np.float64)
    half = 2.364624 * d.std(ddof=1) / np.sqrt(8)
    assert got["seeds"] == 8
    assert got["mean"] == pytest.approx(d.mean(), rel=1e-12)
    assert (got["low"], got["high"]) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-5)
    t = d.mean() / (d.std(ddof=1) / np.sqrt(8))
    assert got["p"] == pytest.approx(2 * (1 - compare.t_cdf(t, 7)), rel=1e-9)
    # At t = t_{0.975, 7} the two-sided p-value is 0.05.
    assert 2 * (1 - compare.t_cdf(2.364624, 7)) == pytest.approx(0.05, abs=1e-5)


def test_holm_rejects_step_down():
    assert compare.holm([0.01, 0.04, 0.03]) == [True, False, False]  # 0.01 <= 0.05/3; 0.03 > 0.05/2
    assert compare.holm([0.01, 0.02, 0.04]) == [True, True, True]  # 0.01 <= .0167, 0.02 <= .025, 0.04 <= .05
    assert compare.holm([0.2, 0.001]) == [False, True]


def test_the_report_says_which_differences_are_significant(tmp_path):
    runs = []
    for i, (lr, seed) in enumerate([(lr, seed) for lr in (1, 2, 3) for seed in range(6)]):
        folder = tmp_path / f"run_{i:02d}"
        folder.mkdir()
        value = {1: 0.5, 2: 0.7, 3: 0.5}[lr] + 0.01 * ((seed * 7 + lr) % 3)
        (folder / "summary.json").write_text(json.dumps({"eval/accuracy": value}))
        runs.append({"index": i, "run_dir": folder.name, "setting": {"optim.lr": lr, "seed": seed}, "seed": seed})
    compare.write_index(str(tmp_path), runs)
    text = compare.report(str(tmp_path))
    assert "3 configurations" in text and "(6 seeds)" in text
    lines = {line.split(":")[0].strip(): line for line in text.splitlines() if " − " in line}
    assert "significant, also after Holm" in lines["optim.lr=1 − optim.lr=2"]
    assert ": not significant" in lines["optim.lr=1 − optim.lr=3"]
    assert "significant after Holm's correction: optim.lr=1 − optim.lr=2; optim.lr=2 − optim.lr=3" in text
    assert math.isnan(compare.mean_interval([1.0])[1])
