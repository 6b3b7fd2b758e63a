"""The outer Python loop: batch -> jitted step -> metrics -> checkpoint, for every algorithm.

`train` checks the config, loads the policy, runs the SFT warm start when the algorithm asks for
one, builds the algorithm's `Phase` (`run.registry`) and hands it to `run_phase`, which resumes,
steps, logs, evaluates, checkpoints and finishes (summary, plot, HF export).

Reproducibility: the batch of step s depends only on (seed, s) and its key is
`fold_in(stream_key(seed, STEP), s)`, so a resumed run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from jaxrl_llm import checkpoint, sharding
from jaxrl_llm import metrics as metrics_lib
from jaxrl_llm.config import Config, config_to_dict, save_config
from jaxrl_llm.config.checks import check_model_facts
from jaxrl_llm.errors import TrainingError
from jaxrl_llm.models.load import export_hf
from jaxrl_llm.run import registry
from jaxrl_llm.run.examples import prepare_examples
from jaxrl_llm.run.keys import STEP, stream_key
from jaxrl_llm.run.phases import Phase
from jaxrl_llm.run.policy import Policy, load_policy, run_mesh
from jaxrl_llm.run.resume import saved_summary, warn_of_changes
from jaxrl_llm.state import learning_rate_schedule

CONSOLE_METRICS = ("loss", "reward/mean", "accuracy", "kl", "eval/accuracy", "eval/reward")


@dataclasses.dataclass
class RunResult:
    """What a finished run leaves: its folder, the trained policy and the last metrics."""

    run_dir: str
    policy: Policy
    metrics: dict


def train(config: Config, policy: Policy | None = None, quiet: bool = False) -> RunResult:
    """Run `config` to the end (resuming when asked), leaving metrics, checkpoints, plot and export."""
    entry = registry.algorithm(registry.check(config))
    m = config.mesh
    sharding.initialize_distributed(m.coordinator_address, m.num_processes, m.process_id)
    mesh = run_mesh(config)  # raises if the mesh does not fit the devices
    policy = policy or load_policy(config)
    # The batch must split over the resolved data × fsdp (a -1 is only known now).
    resolved = dataclasses.replace(m, data=mesh.shape["data"], fsdp=mesh.shape["fsdp"], tensor=mesh.shape["tensor"])
    registry.check(dataclasses.replace(config, mesh=resolved), policy.config.max_position_embeddings)
    check_model_facts(config, policy.config.vocab_size, policy.config.max_position_embeddings, entry.samples)
    os.makedirs(config.run_dir, exist_ok=True)
    if entry.warm_starts and config.train.sft_warmup_steps > 0:
        policy = sft_warmup(config, policy, quiet)
    config_path = os.path.join(config.run_dir, "config.yaml")
    if config.train.resume and os.path.exists(config_path):
        warn_of_changes(config_path, config)
    if jax.process_index() == 0:
        save_config(config, config_path)
    train_set, eval_set = prepare_examples(config, policy.tokenizer, entry.fields)
    phase = entry.build(config, policy, train_set, eval_set)
    if not eval_set:  # data.eval_size=0 holds nothing out, so there is nothing to evaluate on
        phase = dataclasses.replace(phase, evaluate=None)
    return run_phase(config, phase, policy, quiet)


def sft_warmup(config: Config, policy: Policy, quiet: bool) -> Policy:
    """The SFT warm start of an RL run, in RUN_DIR/sft_warmup (resumed or reused when present)."""
    t = config.train
    warm = dataclasses.replace(
        config, algorithm="sft", run_dir=os.path.join(config.run_dir, "sft_warmup"),
        optim=dataclasses.replace(config.optim, lr=t.sft_warmup_lr or config.optim.lr),
        train=dataclasses.replace(
            t, total_steps=t.sft_warmup_steps, sft_warmup_steps=0, export_hf=False, resume=True,
            checkpoint_every=t.sft_warmup_steps,
        ),
    )
    if not quiet:
        print(f"SFT warm start: {t.sft_warmup_steps} steps in {warm.run_dir}")
    return train(warm, policy, quiet).policy


def compiled(config: Config, phase: Phase, policy: Policy):
    """(state placed on the run's mesh, the phase's step jitted there with the state donated)."""
    mesh = run_mesh(config)
    shardings = sharding.tree_shardings(phase.state, mesh, phase.model_configs or (policy.config,))
    return sharding.place(phase.state, shardings), sharding.jit_step(phase.step, mesh, shardings)


def run_phase(config: Config, phase: Phase, policy: Policy, quiet: bool = False) -> RunResult:
    """The step loop of one phase: resume, step, log, evaluate, checkpoint, and finish."""
    t = config.train
    manager = checkpoint.checkpoint_manager(os.path.join(config.run_dir, "checkpoints"), t.keep_checkpoints)
    state, step_fn = compiled(config, phase, policy)
    start = 0
    if t.resume:
        restored = checkpoint.restore_latest(manager, state)
        if restored is not None:
            last_saved, state, _ = restored
            start = last_saved + 1
    elif manager.latest_step() is not None:
        raise TrainingError(
            f"{manager.directory} already holds checkpoints (latest step {manager.latest_step()}); set "
            "train.resume=true to continue that run, or choose another run_dir."
        )
    before = {}
    if phase.evaluate and t.eval_every and start == 0:
        before = {f"before/{k}": v for k, v in phase.evaluate(state).items()}
    o = config.optim
    lr_at = learning_rate_schedule(o.lr, t.total_steps, o.schedule, o.warmup_steps)
    main = jax.process_index() == 0  # one writer per run, however many processes
    writer = metrics_lib.MetricsWriter(config.run_dir, t.tensorboard, start) if main else None
    base_key = stream_key(config.seed, STEP)
    bar = None if quiet else _progress(t.total_steps, start)
    row, done = {}, start - 1  # `done`: the last step whose update is in `state`
    meta = lambda s: {"step": s, "algorithm": config.algorithm, "config": config_to_dict(config)}
    try:
        for step in range(start, t.total_steps):
            batch, host = phase.make_batch(state, step)
            began = time.perf_counter()
            state, out = step_fn(state, batch, jax.random.fold_in(base_key, step))
            done = step
            out = jax.device_get(out)
            host["time/train"] = time.perf_counter() - began
            host["lr"] = float(lr_at(step))
            host["tokens_per_s"] = float(batch.num_tokens()) / (host["time/train"] + host.get("time/generation", 0.0))
            if phase.evaluate and t.eval_every and (step + 1) % t.eval_every == 0:
                host.update(phase.evaluate(state))
            evaluated = any(name.startswith("eval/") for name in host)
            row = {name: float(np.asarray(value)) for name, value in {**out, **host}.items()}
            _finite_or_raise(step, row)
            if writer is not None and (step % t.log_every == 0 or evaluated or step == t.total_steps - 1):
                writer.write(step, row)
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
                checkpoint.save(manager, step, state, meta(step))
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{row[k]:.3g}" for k in CONSOLE_METRICS if k in row}, refresh=False)
    except KeyboardInterrupt:
        if done >= start and manager.latest_step() != done:
            checkpoint.save(manager, done, state, meta(done))
        print(f"\ninterrupted: step {done} is saved in {manager.directory}; resume with train.resume=true")
        raise
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    if done >= start and manager.latest_step() != done:
        checkpoint.save(manager, done, state, meta(done))
    if phase.evaluate and start < t.total_steps:
        row.update(phase.evaluate(state))
    if start >= t.total_steps:  # finished before (a resumed run, a reused warm start): keep its summary
        row = saved_summary(config.run_dir)
    row.update(before)
    trained = dataclasses.replace(policy, params=phase.policy_params(state))
    finish(config, trained, row, quiet)
    return RunResult(config.run_dir, trained, row)


def _finite_or_raise(step: int, row: dict) -> None:
    bad = [name for name, value in row.items() if not math.isfinite(value)]
    if bad:
        raise TrainingError(
            f"step {step}: non-finite {', '.join(bad)}; stopping before saving, so the last checkpoint "
            "stays good. Lower optim.lr, raise optim.grad_clip's strictness, or check the data."
        )


def _progress(total: int, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, dynamic_ncols=True, mininterval=1.0, leave=True)


def finish(config: Config, policy: Policy, last: dict, quiet: bool) -> None:
    """Export to RUN_DIR/hf if asked, draw RUN_DIR/metrics.png, write and print the summary
    (files are written by process 0 of a multi-host run)."""
    params = sharding.to_host(policy.params) if config.train.export_hf else None  # every process joins
    if jax.process_index() != 0:
        return
    if config.train.export_hf:
        export_hf(params, os.path.join(config.run_dir, "hf"), policy.config, policy.tokenizer)
    summary = {k: float(v) for k, v in last.items()}
    with open(os.path.join(config.run_dir, "summary.json"), "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=2)
    try:  # after summary.json, whose before-training evaluation starts the eval curves
        metrics_lib.plot_runs([config.run_dir], os.path.join(config.run_dir, "metrics.png"))
    except ValueError:
        pass  # nothing plottable was logged (e.g. zero steps run)
    if not quiet:
        print(f"\n{config.algorithm} run in {config.run_dir}")
        for name in sorted(summary):
            if name.startswith(("eval/", "reward/mean", "loss", "kl")):
                was = summary.get(f"before/{name}")
                print(f"  {name:28s} {summary[name]:.4g}" + ("" if was is None else f"   (before: {was:.4g})"))
