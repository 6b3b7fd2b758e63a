"""The outer Python loop: batch -> jitted step -> metrics -> checkpoint, for every algorithm.

`train` checks the config, loads the policy, runs the SFT warm start when the algorithm asks for
one, builds the algorithm's `Phase` (`run.registry`) and hands it to `run_phase`, which resumes,
steps, logs, evaluates, checkpoints and finishes (summary, plot, HF export).

Reproducibility: the batch of step s depends only on (seed, s) and its key is
`fold_in(stream_key(seed, STEP), s)`, so a resumed run continues exactly like an uninterrupted one.
Nothing a run already wrote is lost to a crash: config.yaml is written once the checkpoint has
restored, metrics rows are only appended (or replaced atomically), a non-finite loss stops the run
before it can overwrite a good checkpoint, and Ctrl-C or SIGTERM (sent by SLURM, Kubernetes and TPU
preemption) stop it after the current step with that step saved.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import jax
import numpy as np

from jaxrl_llm import checkpoint, sharding
from jaxrl_llm import metrics as metrics_lib
from jaxrl_llm.compiles import CompileCounter
from jaxrl_llm.config import Config, config_to_dict, save_config
from jaxrl_llm.config.checks import check_model_facts
from jaxrl_llm.errors import Terminated, TrainingError
from jaxrl_llm.run import outputs, registry, resume
from jaxrl_llm.run.examples import prepare_examples
from jaxrl_llm.run.keys import STEP, stream_key
from jaxrl_llm.run.phases import Phase, decay_steps
from jaxrl_llm.run.policy import Policy, load_policy, own_copy, run_mesh
from jaxrl_llm.run.stops import StopRequests
from jaxrl_llm.state import frozen_parts, learning_rate_schedule, with_frozen, without_frozen

CONSOLE_METRICS = ("loss", "reward/mean", "accuracy", "kl", "eval/accuracy", "eval/reward")
# on_event(name, run_dir, step): "started" when the loop is about to run `step` (a resume has restored
# and its metrics file is open), "step" once step's update is in the state; what tests use to stop a
# run at a given point.
Events = Callable[[str, str, int], None]


@dataclasses.dataclass
class RunResult:
    """What a finished run leaves: its folder, the trained policy and the last metrics."""

    run_dir: str
    policy: Policy
    metrics: dict


def train(
    config: Config, policy: Policy | None = None, quiet: bool = False, on_event: Events | None = None
) -> RunResult:
    """Run `config` to the end (resuming when asked), leaving metrics, checkpoints, plot and export."""
    entry = registry.algorithm(registry.check(config))
    saved = resume.saved_config(config.run_dir) if config.train.resume else None
    notes = []
    if saved is not None:
        resume.check_resumable(saved, config)
        config, notes = resume.keep_schedule(saved, config)
    if config.train.log_compiles:  # each compile logged with the cache miss that caused it
        jax.config.update("jax_log_compiles", True)
        jax.config.update("jax_explain_cache_misses", True)
    m = config.mesh
    sharding.initialize_distributed(m.coordinator_address, m.num_processes, m.process_id)
    mesh = run_mesh(config)  # raises if the mesh does not fit the devices
    outputs.writable(config.run_dir)
    policy = policy or load_policy(config)
    # The batch must split over the resolved data × fsdp (a -1 is only known now).
    resolved = dataclasses.replace(m, data=mesh.shape["data"], fsdp=mesh.shape["fsdp"], tensor=mesh.shape["tensor"])
    registry.check(dataclasses.replace(config, mesh=resolved), policy.config.max_position_embeddings)
    check_model_facts(config, policy.config.vocab_size, policy.config.max_position_embeddings, entry.samples)
    if entry.warm_starts and config.train.sft_warmup_steps > 0:
        policy = sft_warmup(config, policy, quiet, on_event)
    train_set, eval_set = prepare_examples(config, policy.tokenizer, entry.fields)
    phase = entry.build(config, policy, train_set, eval_set)
    if not eval_set:  # data.eval_size=0 holds nothing out, so there is nothing to evaluate on
        phase = dataclasses.replace(phase, evaluate=None)
    return run_phase(config, phase, policy, quiet, on_event, (saved, notes) if saved else None)


def sft_warmup(config: Config, policy: Policy, quiet: bool, on_event: Events | None = None) -> Policy:
    """The SFT warm start of an RL run, in RUN_DIR/sft_warmup (resumed, or reused when finished)."""
    warm = warmup_config(config)
    if not quiet:
        print(f"SFT warm start: {config.train.sft_warmup_steps} steps in {warm.run_dir}")
    return train(warm, policy, quiet, on_event).policy


def warmup_config(config: Config) -> Config:
    """The SFT run of `config`'s warm start, refused when RUN_DIR/sft_warmup holds a longer one."""
    t = config.train
    warm = dataclasses.replace(
        config, algorithm="sft", run_dir=os.path.join(config.run_dir, "sft_warmup"),
        data=dataclasses.replace(config.data, batch_size=t.sft_warmup_batch_size or config.data.batch_size),
        optim=dataclasses.replace(
            config.optim, lr=t.sft_warmup_lr or config.optim.lr, schedule="constant", decay_steps=None
        ),
        train=dataclasses.replace(
            t, total_steps=t.sft_warmup_steps, sft_warmup_steps=0, export_hf=False, resume=True,
            checkpoint_every=t.sft_warmup_steps,
        ),
    )
    done = resume.saved_config(warm.run_dir)
    if done is not None and done.train.total_steps > t.sft_warmup_steps:
        raise TrainingError(
            f"{warm.run_dir} holds a {done.train.total_steps}-step warm start, but train.sft_warmup_steps="
            f"{t.sft_warmup_steps}; set train.sft_warmup_steps={done.train.total_steps} to reuse it, or delete "
            f"{warm.run_dir} (or choose another run_dir) to train a new one."
        )
    return warm


def compiled(config: Config, phase: Phase, policy: Policy):
    """(state placed on the run's mesh, the phase's step jitted there with the state donated)."""
    mesh = run_mesh(config)
    shardings = sharding.tree_shardings(phase.state, mesh, phase.model_configs or (policy.config,))
    return sharding.place(phase.state, shardings), sharding.jit_step(phase.step, mesh, shardings)


class RolloutQueue:
    """An RL phase's batches made on a worker thread up to `staleness` steps ahead (`sampling.overlap`):
    before step s trains, the rollouts of steps s..s+staleness not yet started are started from a copy
    of the params step s trains (the state is donated to the step), and step s waits for its own.
    Staleness 0 makes each batch, then trains on it: the synchronous run."""

    def __init__(self, phase: Phase, staleness: int, last_step: int):
        self.phase, self.staleness, self.last_step = phase, staleness, last_step
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rollouts")
        self.pending: dict[int, tuple[Future, int]] = {}  # step -> (its batch, the step whose params made it)

    def make_batch(self, state, step: int):
        ahead = [s for s in range(step, min(step + self.staleness, self.last_step - 1) + 1) if s not in self.pending]
        if ahead:
            params = own_copy(self.phase.policy_params(state))
            for s in ahead:
                self.pending[s] = (self.pool.submit(self.phase.rollouts.batch, params, s), step)
        future, made_at = self.pending.pop(step)
        batch, host = future.result()
        return batch, {**host, "rollout/staleness": float(step - made_at)}

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def run_phase(
    config: Config, phase: Phase, policy: Policy, quiet: bool = False, on_event: Events | None = None,
    resumed: tuple[Config, list[str]] | None = None,
) -> RunResult:
    """The step loop of one phase: resume, step, log, evaluate, checkpoint, and finish. `resumed` is
    the saved config a resumed run compares itself with, and notes on what it kept. Each row carries
    `time/compiles`, the programs compiled so far, which stays put after the first steps."""
    with CompileCounter() as compiles:
        return _phase(config, phase, policy, quiet, on_event, resumed, compiles)


def _phase(config: Config, phase: Phase, policy: Policy, quiet: bool, on_event: Events | None,
           resumed: tuple[Config, list[str]] | None, compiles: CompileCounter) -> RunResult:
    t = config.train
    emit = on_event or (lambda name, run_dir, step: None)
    manager = checkpoint.checkpoint_manager(os.path.join(config.run_dir, "checkpoints"), t.keep_checkpoints)
    state, step_fn = compiled(config, phase, policy)
    start, state, before = _resume(config, manager, state)
    if resumed is not None and start < t.total_steps:
        resume.warn_of_changes(*resumed, config)
    # Only now, and only with steps to run: a refused or failed resume, or a finished run reused as
    # it is (a warm start), leaves the saved config as it was.
    if jax.process_index() == 0 and start < t.total_steps:
        save_config(config, os.path.join(config.run_dir, "config.yaml"))
    # One writer per run, however many processes; it stays open until the final plot has gone to its
    # trackers. Opened before anything compiles, so that a tracker refusing to start (W&B without a
    # login) stops the run at once.
    writer = outputs.metrics_writer(config, start) if jax.process_index() == 0 and start < t.total_steps else None
    try:
        if phase.evaluate and t.eval_every and start == 0:
            before = {f"before/{k}": float(v) for k, v in phase.evaluate(state).items()}
        return _steps(config, phase, policy, state, step_fn, manager, start, before, writer, quiet, emit, compiles)
    finally:
        if writer is not None:
            writer.close()


def _steps(config: Config, phase: Phase, policy: Policy, state, step_fn, manager, start: int, before: dict,
           writer: metrics_lib.MetricsWriter | None, quiet: bool, emit: Events, compiles: CompileCounter) -> RunResult:
    """Steps `start`.. of the phase, then its final evaluation, summary, plot and export."""
    t, o = config.train, config.optim
    lr_at = learning_rate_schedule(o.lr, decay_steps(config), o.schedule, o.warmup_steps)
    base_key = stream_key(config.seed, STEP)
    bar = None if quiet else _progress(t.total_steps, start)
    row, done = {}, start - 1  # `done`: the last step whose update is in `state`
    meta = lambda s: {"step": s, "algorithm": config.algorithm, "config": config_to_dict(config), "before": before}
    stop = StopRequests()
    overlap = config.sampling.overlap and phase.rollouts is not None
    queue = RolloutQueue(phase, config.sampling.staleness, t.total_steps) if overlap else None
    make_batch = queue.make_batch if queue else phase.make_batch
    emit("started", config.run_dir, start)
    try:
        with stop:
            for step in range(start, t.total_steps):
                if stop.signal is not None:
                    break
                batch, host = make_batch(state, step)
                began = time.perf_counter()
                state, out = step_fn(state, batch, jax.random.fold_in(base_key, step))
                done = step
                emit("step", config.run_dir, step)
                out = jax.device_get(out)
                host["time/train"] = time.perf_counter() - began
                host["lr"] = float(lr_at(step))
                seconds = host["time/train"] + host.get("time/generation", 0.0)
                host["tokens_per_s"] = float(batch.num_tokens()) / seconds
                if phase.evaluate and t.eval_every and (step + 1) % t.eval_every == 0:
                    host.update(phase.evaluate(state))
                host["time/compiles"] = float(compiles.count)
                evaluated = any(name.startswith("eval/") for name in host)
                row = {name: float(np.asarray(value)) for name, value in {**out, **host}.items()}
                _finite_or_raise(step, row)
                if writer is not None and (step % t.log_every == 0 or evaluated or step == t.total_steps - 1):
                    writer.write(step, row)
                if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
                    checkpoint.save(manager, step, without_frozen(state), meta(step))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{row[k]:.3g}" for k in CONSOLE_METRICS if k in row}, refresh=False)
    except KeyboardInterrupt:  # raised by code, or a second Ctrl-C: `state` holds step `done` unless donated
        stop.signal = stop.signal or signal.SIGINT
        if any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):
            raise
    finally:
        if queue is not None:
            queue.close()
        if bar is not None:
            bar.close()
    if done >= start and manager.latest_step() != done:
        checkpoint.save(manager, done, without_frozen(state), meta(done))
    if stop.signal is not None:
        name = "terminated (SIGTERM)" if stop.signal == signal.SIGTERM else "interrupted"
        print(f"\n{name}: step {done} is saved in {manager.directory}; resume with train.resume=true")
        raise Terminated() if stop.signal == signal.SIGTERM else KeyboardInterrupt()
    if phase.evaluate and start < t.total_steps:
        row.update(phase.evaluate(state))
    if start >= t.total_steps:  # finished before (a resumed run, a reused warm start): keep its summary
        row = metrics_lib.read_summary(config.run_dir) or _last_row(config.run_dir)
    row.update(before)
    if start < t.total_steps:  # this session's compiles, in summary.json
        row.update({"time/compiles": float(compiles.count), "time/compile_s": compiles.seconds})
    trained = dataclasses.replace(policy, params=phase.policy_params(state))
    critic = phase.critic(state) if phase.critic else None
    outputs.finish(config, trained, row, quiet, writer, critic)
    return RunResult(config.run_dir, trained, row)


def _resume(config: Config, manager, state):
    """(first step to run, the state to run it from, the evaluation before training): a resumed run's
    from its newest checkpoint that restores; refuses a new run over old checkpoints and a resume
    past train.total_steps."""
    t = config.train
    if not t.resume:
        if manager.latest_step() is not None:
            raise TrainingError(
                f"{manager.directory} already holds checkpoints (latest step {manager.latest_step()}); set "
                "train.resume=true to continue that run, or choose another run_dir."
            )
        return 0, state, {}
    # A checkpoint holds the trained params and optimizer state; a LoRA run's frozen base is the model it loaded.
    restored = checkpoint.restore_latest(manager, without_frozen(state))
    if restored is None:
        return 0, state, {}
    step, trained, meta = restored
    state = with_frozen(trained, frozen_parts(state))
    if step + 1 > t.total_steps:
        raise TrainingError(
            f"{config.run_dir} has already trained {step + 1} steps, more than train.total_steps={t.total_steps}; "
            f"raise train.total_steps to at least {step + 1} to continue it, or choose another run_dir."
        )
    return step + 1, state, meta.get("before", {})


def _last_row(run_dir: str) -> dict:
    """The last metrics row of a run killed between its last checkpoint and its summary, or {}."""
    rows = metrics_lib.read_metrics(run_dir) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else []
    return {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}


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
