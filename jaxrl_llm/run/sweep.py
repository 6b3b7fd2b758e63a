"""Sweeps as one compiled program: the runs of one structure (`config.sweeps.structure`) train
together, their states stacked on a leading run axis and every step one vmapped, jitted call.

Each run keeps its own folder (RUN_DIR/run_NN: config.yaml, metrics.jsonl, checkpoints, summary,
plot, export), resumable alone or with the sweep, and computes exactly what it computes alone: its
batch and keys come from its own seed, its numbers (`config.sweeps.VMAPPED`) enter the traced step
as arrays, and the rollouts of all runs are sampled in one vmapped generation call. Runs that share
a seed see the same prompts in the same order and draw the same sampling uniforms (the sampler's
rows depend only on key, row and prompt), so their differences are paired. State that the step
only reads and that every run holds equally (a frozen LoRA base, a common reference) is kept once.

Shapes: N runs.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_llm import checkpoint, compare, sharding
from jaxrl_llm import metrics as metrics_lib
from jaxrl_llm.compiles import CompileCounter
from jaxrl_llm.config import Config, config_to_dict, save_config
from jaxrl_llm.config.checks import check_model_facts
from jaxrl_llm.config.loading import _flat
from jaxrl_llm.config.sweeps import Sweep, label, structure, varying
from jaxrl_llm.errors import ConfigError, Terminated, TrainingError
from jaxrl_llm.models.lora import count_params
from jaxrl_llm.run import outputs, registry, resume
from jaxrl_llm.run.examples import prepare_examples
from jaxrl_llm.run.keys import STEP, stream_key
from jaxrl_llm.run.loop import CONSOLE_METRICS, Events, RunResult, _finite_or_raise, _progress, warmup_config
from jaxrl_llm.run.phases import Phase, decay_steps, optimizer
from jaxrl_llm.run.policy import Policy, load_policy, run_mesh
from jaxrl_llm.run.rollouts import Rollouts
from jaxrl_llm.run.stops import StopRequests
from jaxrl_llm.sampling import generate_runs
from jaxrl_llm.state import TrainState, frozen_parts, learning_rate_schedule, with_frozen, without_frozen


@dataclasses.dataclass
class SweepResult:
    """A finished sweep: its folder, each run's result and axis values ({path: value}), in order."""

    run_dir: str
    runs: list[RunResult]
    settings: list[dict]


def train_sweep(sweep: Sweep, quiet: bool = False, on_event: Events | None = None) -> SweepResult:
    """Train every run of `sweep`: one program per structure, in chunks of `sweep.parallel` runs (0: as
    many as are estimated to fit), then the sweep's plot and paired comparison."""
    return train_runs(
        sweep.runs(), sweep.base.run_dir, sweep.settings(), sweep.parallel, sweep.run_axis, quiet, on_event
    )


def train_runs(
    configs: list[Config], run_dir: str, settings: list[dict] | None = None, parallel: int = 0,
    run_axis: str = "auto", quiet: bool = False, on_event: Events | None = None,
) -> SweepResult:
    """Train `configs` (each with its own run_dir) as a sweep whose index lives in `run_dir`;
    `run_axis` as `config.sweeps.Sweep`'s."""
    run_axis = resolve_run_axis(run_axis)
    settings = settings or [{"run": i} for i in range(len(configs))]
    configs = [_checked(one_device(c), setting) for c, setting in zip(configs, settings)]
    programs = group_by_structure(configs)
    if jax.device_count() > 1 and not quiet:
        print(f"sweep: every program runs on one device of {jax.device_count()} (the run axis is not split yet)")
    outputs.writable(run_dir)
    write_index(run_dir, configs, settings, programs)
    results: list[RunResult | None] = [None] * len(configs)
    for number, members in enumerate(programs):
        group = [configs[i] for i in members]
        policies = starting_policies(group)
        size = parallel or runs_that_fit(group[0], policies[0], run_axis)
        chunks = [list(range(i, min(i + size, len(members)))) for i in range(0, len(members), size)]
        if not quiet:
            print(describe_program(number, len(programs), group, chunks, parallel, run_axis))
        for chunk in chunks:
            chunk_results = train_vmapped(
                [group[k] for k in chunk], [policies[k] for k in chunk], run_axis, quiet, on_event
            )
            for k, result in zip(chunk, chunk_results):
                results[members[k]] = result
    try:
        compare.plot_sweep(run_dir, os.path.join(run_dir, "sweep.png"), list(metrics_lib.MAIN_CURVES))
    except ValueError:
        pass  # nothing plottable was logged
    if not quiet:
        print(compare.report(run_dir))
    return SweepResult(run_dir, results, settings)


def _checked(config: Config, setting: dict) -> Config:
    """`config` checked as a run of its algorithm; an error names the run."""
    try:
        if config.sampling.overlap:
            raise ConfigError(
                "sampling.overlap is not supported in a sweep (its runs generate in one synchronous call); "
                "set sampling.overlap=false, or train the run alone."
            )
        if "trackio" in config.logging.trackers:
            raise ConfigError(
                "logging.trackers lists trackio, which holds one run per process, and a sweep's runs log at once; "
                "use wandb or tensorboard for a sweep, or train the runs alone."
            )
        return registry.check(config)
    except ConfigError as error:
        raise ConfigError(f"sweep run {label(setting)}: {error}") from None


def starting_policies(configs: list[Config]) -> list[Policy]:
    """Each run's starting model, loaded once: a loaded model is every run's, the tiny random model
    is drawn from each seed."""
    loaded: dict = {}
    for config in configs:
        key = config.seed if config.model.source == "tiny" else None
        if key not in loaded:
            loaded[key] = load_policy(config)
    return [loaded[config.seed if config.model.source == "tiny" else None] for config in configs]


def one_device(config: Config) -> Config:
    """A sweep's run on one device (the run axis is not split over devices yet)."""
    return dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, data=1, fsdp=1, tensor=1))


def group_by_structure(configs: list[Config]) -> list[list[int]]:
    """The indices of the runs of each compiled program, programs in order of their first run."""
    groups: dict[tuple, list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(structure(config), []).append(index)
    return list(groups.values())


def describe_program(number: int, count: int, group: list[Config], chunks: list, parallel: int, run_axis: str) -> str:
    """One line on what a program vmaps, and whether it runs in chunks."""
    over = ["seed"] if len({c.seed for c in group}) > 1 else []
    over += varying(group)
    line = (f"sweep program {number + 1}/{count}: {len(group)} runs differing in {', '.join(over) or 'nothing'}, "
            f"stepped together (run axis: {run_axis})")
    if count > 1:
        line += "; the programs differ in structure (a loss, an aggregation, a switch), so each compiles on its own"
    if len(chunks) > 1:
        why = "sweep.parallel" if parallel else "the estimated memory (set sweep.parallel to choose)"
        line += f"; in {len(chunks)} sequential chunks of at most {len(chunks[0])} runs ({why})"
    return line


def runs_that_fit(config: Config, policy: Policy, run_axis: str) -> int:
    """How many runs of `config` one program can hold: free memory over an estimate of one run's
    state (params, gradients, two Adam moments, a reference copy) and, when vmapped, activations
    (under lax.map one run's activations live at a time); at least 1."""
    trained_bytes = 4 * count_params(policy.params) if config.model.lora.rank == 0 else 0
    c, d = policy.config, config.data
    tokens = d.batch_size * (d.max_prompt_len + d.max_completion_len) * (2 if config.algorithm in ("dpo", "rm") else 1)
    activations = 4 * tokens * (c.hidden_size * c.num_layers * 16 + c.vocab_size)
    if run_axis == "vmap":
        return max(1, int(0.7 * free_memory() // max(5 * trained_bytes + activations, 1)))
    return max(1, int((0.7 * free_memory() - activations) // max(5 * trained_bytes, 1)))


def free_memory() -> int:
    """Bytes the default device can still take: the accelerator's limit, or the host's available memory."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            fields = dict(line.split(":", 1) for line in file)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except OSError:  # no /proc (macOS): half the physical memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def write_index(run_dir: str, configs: list[Config], settings: list[dict], programs: list[list[int]]) -> None:
    """RUN_DIR/sweep.json: each run's folder, axis values, seed and program."""
    program_of = {i: number for number, members in enumerate(programs) for i in members}
    compare.write_index(run_dir, [
        {"index": i, "run_dir": os.path.relpath(c.run_dir, run_dir), "setting": settings[i],
         "label": label(settings[i]), "seed": c.seed, "program": program_of[i]}
        for i, c in enumerate(configs)
    ])


# ---------------------------------------------------------------- one vmapped program


def train_vmapped(
    configs: list[Config], policies: list[Policy], run_axis: str, quiet: bool, on_event: Events | None,
    examples: dict | None = None,
) -> list[RunResult]:
    """Train runs of one structure, from their starting `policies`, as one vmapped program (their warm
    starts first, likewise)."""
    entry = registry.algorithm(configs[0])
    policy = policies[0]
    examples = {} if examples is None else examples
    resumed = []
    for i, config in enumerate(configs):
        saved = resume.saved_config(config.run_dir) if config.train.resume else None
        if saved is not None:
            resume.check_resumable(saved, config)
            configs[i], notes = resume.keep_schedule(saved, config)
            resumed.append((saved, notes))
        else:
            resumed.append(None)
        outputs.writable(configs[i].run_dir)
        check_model_facts(configs[i], policy.config.vocab_size, policy.config.max_position_embeddings, entry.samples)
    if entry.warm_starts and configs[0].train.sft_warmup_steps > 0:
        warm = [warmup_config(c) for c in configs]
        if not quiet:
            print(f"SFT warm starts: {len(warm)} runs x {configs[0].train.sft_warmup_steps} steps")
        policies = [result.policy for result in train_vmapped(warm, policies, run_axis, quiet, on_event, examples)]
    phases = []
    for config, run_policy in zip(configs, policies):
        # Runs (and their warm starts) with one seed and data share their examples; the batch size picks none.
        key = (config.seed, dataclasses.replace(config.data, batch_size=0))
        if key not in examples:
            examples[key] = prepare_examples(config, policy.tokenizer, entry.fields)
        train_set, eval_set = examples[key]
        phase = entry.build(config, run_policy, train_set, eval_set)
        phases.append(phase if eval_set else dataclasses.replace(phase, evaluate=None))
    return VmappedRuns(configs, phases, policies, run_axis).run(quiet, on_event, resumed)


class VmappedRuns:
    """N runs of one structure, their states stacked; `run` is the step loop of `run.loop.run_phase`
    for all of them at once."""

    def __init__(self, configs: list[Config], phases: list[Phase], policies: list[Policy], run_axis: str):
        self.configs, self.phases, self.policies, self.run_axis = configs, phases, policies, run_axis
        self.N = len(configs)
        states = [phase.state for phase in phases]
        self.treedef = jax.tree.structure(states[0])
        self.leaves = [jax.tree.leaves(state) for state in states]
        for phase in phases:
            phase.state = None  # the stacked state replaces them
        self.numbers = {path: np.array([_flat(config_to_dict(c))[path] for c in configs], np.float32)
                        for path in varying(configs)}
        self.step_fn = self.batched = self.state = None

    # ---- state: per-run leaves are stacked, leaves the step only reads and all runs hold equally stay single

    def stack(self, passthrough: list[bool]) -> None:
        """The stacked state: leaf j stacked over runs unless the step passes it through unchanged
        and every run holds the same value."""
        self.batched = []
        leaves = []
        for j in range(len(self.leaves[0])):
            column = [run[j] for run in self.leaves]
            shared = passthrough[j] and all(
                x is column[0] or (x.shape == column[0].shape and bool(jnp.array_equal(x, column[0]))) for x in column
            )
            self.batched.append(not shared)
            leaves.append(column[0] if shared else jnp.stack(column))
            for run in self.leaves:
                run[j] = None  # each run's copy goes as soon as it is stacked
        # The layout the step returns, so its second call does not compile again.
        self.state = jax.device_put(self.treedef.unflatten(leaves), self.replicated())
        self.leaves = None

    def replicated(self) -> NamedSharding:
        return NamedSharding(run_mesh(self.configs[0]), PartitionSpec())

    def run_state(self, state, n: int):
        """Run n's state out of the stacked one (one jitted slice of every per-run leaf)."""
        leaves = jax.tree.leaves(state)
        sliced = iter(_take(tuple(x for x, b in zip(leaves, self.batched) if b), n))
        return self.treedef.unflatten([next(sliced) if b else x for x, b in zip(leaves, self.batched)])

    def flags(self):
        """A state-shaped tree of bools: which leaves carry the run axis."""
        return self.treedef.unflatten(self.batched)

    # ---- the step

    def compile(self, batch, key) -> None:
        """Stack the state (keeping shared what the step only reads) and jit the vmapped step."""
        phase, config = self.phases[0], self.configs[0]
        one = self.treedef.unflatten(self.leaves[0])
        one_batch = jax.tree.map(lambda x: x[0], batch)
        jaxpr = jax.make_jaxpr(lambda s, b, k: phase.step(s, b, k)[0])(one, one_batch, key)
        ins, outs = jaxpr.jaxpr.invars, jaxpr.jaxpr.outvars
        passthrough = [out is inp for inp, out in zip(ins, outs)]
        self.stack(passthrough)
        txs = [node.tx for node in _train_states(one)]
        optimizers_of = phase.optimizers_of or (lambda c: [optimizer(c)])
        treedef, batched = self.treedef, self.batched

        def one_run(batched_leaves, shared_leaves, batch, key, numbers):
            leaves = [s if b is None else b for s, b in zip(shared_leaves, batched_leaves)]
            state = treedef.unflatten(leaves)
            run_config = with_numbers(config, numbers)
            state = _with_optimizers(state, optimizers_of(run_config))
            new_state, metrics = phase.step_of(run_config)(state, batch, key)
            new_state = _with_optimizers(new_state, txs)
            return [x for x, b in zip(jax.tree.leaves(new_state), batched) if b], metrics

        def step(batched_leaves, shared_leaves, batch, keys, numbers):
            it = iter(batched_leaves)
            padded = [next(it) if b else None for b in batched]
            # Traced under the run's (one-device) mesh, as `sharding.jit_step` traces a single run's step.
            with sharding.mesh_context(run_mesh(config)):
                if self.run_axis == "vmap":
                    return jax.vmap(one_run, in_axes=(0, None, 0, 0, 0))(padded, shared_leaves, batch, keys, numbers)
                return jax.lax.map(lambda xs: one_run(xs[0], shared_leaves, *xs[1:]), (padded, batch, keys, numbers))

        # One layout in and out (replicated on the run's one-device mesh), so no step compiles twice.
        self.step_fn = jax.jit(step, donate_argnums=0, in_shardings=self.replicated(), out_shardings=self.replicated())

    def step(self, state, batch, keys):
        """One vmapped update of every run: (new stacked state, metrics with a leading run axis)."""
        leaves = jax.tree.leaves(state)
        batched = [x for x, b in zip(leaves, self.batched) if b]
        shared = [None if b else x for x, b in zip(leaves, self.batched)]
        numbers = {path: jnp.asarray(values) for path, values in self.numbers.items()}
        new_batched, metrics = self.step_fn(batched, shared, batch, keys, numbers)
        it = iter(new_batched)
        return self.treedef.unflatten([next(it) if b else x for x, b in zip(leaves, self.batched)]), metrics

    # ---- batches

    def make_batch(self, state, step: int):
        """(stacked batch, per-run host metrics) of step `step`: RL rollouts in one vmapped generation call."""
        rollouts = [phase.rollouts for phase in self.phases]
        if state is not None and all(type(r) is Rollouts for r in rollouts):
            return self._rollout_batch(state, rollouts, step)
        if state is None:  # before the state is stacked: each run's own batch
            made = [phase.make_batch(None, step) if phase.rollouts is None else
                    phase.make_batch(self.treedef.unflatten(self.leaves[n]), step)
                    for n, phase in enumerate(self.phases)]
        else:  # a phase without rollouts makes its batch from the data alone
            made = [phase.make_batch(None if phase.rollouts is None else self.run_state(state, n), step)
                    for n, phase in enumerate(self.phases)]
        return stack_batches([b for b, _ in made], self.policies[0].tokenizer.pad_token_id), [h for _, h in made]

    def _rollout_batch(self, state, rollouts: list[Rollouts], step: int):
        start = time.perf_counter()
        plans = [r.step_prompts(step) for r in rollouts]
        phase = self.phases[0]
        params = phase.policy_params(state)
        batched = phase.policy_params(self.flags())
        if rollouts[0].weights_dtype != "float32":  # every run's rollout copy, in one call
            in_axes = jax.tree.map(lambda b: 0 if b else None, batched)
            params = jax.vmap(rollouts[0].rollout_weights, in_axes=(in_axes,))(params)
            batched = jax.tree.map(lambda _: True, params)
        outs = generate_runs(
            params, batched, [[e["prompt_ids"] for e in prompts] for prompts, _ in plans], [k for _, k in plans],
            rollouts[0].sampling, rollouts[0].rollout_config, run_mesh(self.configs[0]), self.run_axis,
        )
        made = []
        for n, (r, (prompts, _), out) in enumerate(zip(rollouts, plans, outs)):
            total_R, parts, _ = r.scored(prompts, out, r.sampling.n)
            params_of = lambda n=n, r=r: r.rollout_weights(self.phases[n].policy_params(self.run_state(state, n)))
            made.append(r.finish(params_of, prompts, out, total_R, parts, step, start))
        return stack_batches([b for b, _ in made], self.policies[0].tokenizer.pad_token_id), [h for _, h in made]

    # ---- the loop

    def run(self, quiet: bool, on_event: Events | None, resumed: list) -> list[RunResult]:
        """Every run's steps; each row carries `time/compiles`, the programs compiled so far, as a
        single run's does."""
        with CompileCounter() as compiles:
            return self._run(quiet, on_event, resumed, compiles)

    def _run(self, quiet: bool, on_event: Events | None, resumed: list, compiles: CompileCounter) -> list[RunResult]:
        configs, phases, N = self.configs, self.phases, self.N
        t = configs[0].train
        emit = on_event or (lambda name, run_dir, step: None)
        managers = [checkpoint.checkpoint_manager(os.path.join(c.run_dir, "checkpoints"), t.keep_checkpoints)
                    for c in configs]
        for manager in managers:
            if not t.resume and manager.latest_step() is not None:
                raise TrainingError(
                    f"{manager.directory} already holds checkpoints (latest step {manager.latest_step()}); set "
                    "train.resume=true to continue the sweep, or choose another run_dir."
                )
        start, befores = self._restore(managers) if t.resume else (0, [{}] * N)
        if start >= t.total_steps:  # finished before (a reused warm start): its summaries and trained policies
            return [self._result(n, self.treedef.unflatten(self.leaves[n]), metrics_lib.read_summary(c.run_dir))
                    for n, c in enumerate(configs)]
        for n, config in enumerate(configs):
            if resumed[n] is not None:
                resume.warn_of_changes(*resumed[n], config)
            save_config(config, os.path.join(config.run_dir, "config.yaml"))
        # Opened before anything compiles, so that a tracker refusing to start stops the sweep at once.
        writers = [outputs.metrics_writer(c, start) for c in configs]
        try:
            batch, hosts = self.make_batch(None, start)
            keys_of = lambda s: jnp.stack([jax.random.fold_in(stream_key(c.seed, STEP), s) for c in configs])
            self.compile(batch, keys_of(start)[0])
            state = self.state
            if t.eval_every and start == 0 and phases[0].evaluate:
                befores = [{f"before/{k}": float(v) for k, v in self.evaluate(state, n).items()} for n in range(N)]
            lrs = [learning_rate_schedule(c.optim.lr, decay_steps(c), c.optim.schedule, c.optim.warmup_steps)
                   for c in configs]
            meta = lambda n, s: {"step": s, "algorithm": configs[n].algorithm, "config": config_to_dict(configs[n]),
                                 "before": befores[n]}
            failed: dict[int, str] = {}
            rows = [{} for _ in range(N)]
            done = start - 1
            bar = None if quiet else _progress(t.total_steps, start)
            stop = StopRequests()
            for config in configs:
                emit("started", config.run_dir, start)
            try:
                with stop:
                    for step in range(start, t.total_steps):
                        if stop.signal is not None:
                            break
                        if batch is None:
                            batch, hosts = self.make_batch(state, step)
                        began = time.perf_counter()
                        state, out = self.step(state, batch, keys_of(step))
                        done = step
                        for config in configs:
                            emit("step", config.run_dir, step)
                        out = jax.device_get(out)
                        seconds = time.perf_counter() - began
                        evaluate = phases[0].evaluate and t.eval_every and (step + 1) % t.eval_every == 0
                        for n in range(N):
                            if n in failed:
                                continue
                            host = dict(hosts[n])
                            host["time/train"] = seconds
                            host["lr"] = float(lrs[n](step))
                            # the run's own tokens over the program's step (all runs) and generation
                            host["tokens_per_s"] = _num_tokens(batch, n) / (seconds + host.get("time/generation", 0.0))
                            if evaluate:
                                host.update(self.evaluate(state, n))
                            host["time/compiles"] = float(compiles.count)
                            row = {name: float(np.asarray(value))
                                   for name, value in {**_run_row(out, n), **host}.items()}
                            try:
                                _finite_or_raise(step, row)
                            except TrainingError as error:
                                failed[n] = f"{configs[n].run_dir}: {error}"
                                print(f"\n{failed[n]} (the sweep's other runs go on)")
                                continue
                            rows[n] = row
                            evaluated = any(name.startswith("eval/") for name in host)
                            if step % t.log_every == 0 or evaluated or step == t.total_steps - 1:
                                writers[n].write(step, row)
                        batch = None
                        if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
                            self._save(managers, state, step, meta, failed)
                        if bar is not None:
                            bar.update(1)
                            shown = {k: np.mean([rows[n][k] for n in range(N) if k in rows[n]]) for k in CONSOLE_METRICS
                                     if any(k in r for r in rows)}
                            bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            except KeyboardInterrupt:
                stop.signal = stop.signal or signal.SIGINT
                if any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):
                    raise
            finally:
                if bar is not None:
                    bar.close()
            if done >= start and managers[0].latest_step() != done:
                self._save(managers, state, done, meta, failed)
            if stop.signal is not None:
                name = "terminated (SIGTERM)" if stop.signal == signal.SIGTERM else "interrupted"
                print(f"\n{name}: step {done} of every run is saved; resume the sweep with train.resume=true")
                raise Terminated() if stop.signal == signal.SIGTERM else KeyboardInterrupt()
            results = []
            for n, config in enumerate(configs):
                row = rows[n]
                if phases[n].evaluate and n not in failed:
                    row.update(self.evaluate(state, n))
                row.update(befores[n])
                row.update({"time/compiles": float(compiles.count), "time/compile_s": compiles.seconds})
                results.append(self._result(n, self.run_state(state, n), row))
                if n not in failed:
                    critic = self.phases[n].critic(self.run_state(state, n)) if self.phases[n].critic else None
                    outputs.finish(config, results[-1].policy, row, quiet=True, writer=writers[n], critic=critic)
            if failed:
                raise TrainingError("runs of the sweep stopped early: " + "; ".join(failed.values()))
            return results
        finally:
            for writer in writers:  # after the final plots went to the trackers
                writer.close()

    def _result(self, n: int, run_state, row: dict) -> RunResult:
        trained = dataclasses.replace(self.policies[n], params=self.phases[n].policy_params(run_state))
        return RunResult(self.configs[n].run_dir, trained, row)

    def evaluate(self, state, n: int) -> dict:
        """Run n's held-out evaluation."""
        return self.phases[n].evaluate(self.run_state(state, n))

    def _save(self, managers, state, step: int, meta, failed: dict) -> None:
        for n, manager in enumerate(managers):
            if n not in failed:
                checkpoint.save(manager, step, without_frozen(self.run_state(state, n)), meta(n, step))

    def _restore(self, managers) -> tuple[int, list[dict]]:
        """(first step to run, each run's evaluation before training) from the newest step every run
        has a checkpoint of that restores; the runs' per-run leaves are set from it."""
        templates = [without_frozen(self.treedef.unflatten(leaves)) for leaves in self.leaves]
        common = min((m.latest_step() if m.latest_step() is not None else -1) for m in managers)
        while common >= 0:
            restored = [checkpoint.restore_latest(m, tmpl, at_most=common) for m, tmpl in zip(managers, templates)]
            steps = [r[0] if r else -1 for r in restored]
            if min(steps) == common == max(steps):
                break
            common = min(steps)
        if common < 0:
            return 0, [{}] * self.N
        t = self.configs[0].train
        if common + 1 > t.total_steps:
            raise TrainingError(
                f"the sweep has already trained {common + 1} steps, more than train.total_steps={t.total_steps}; "
                f"raise train.total_steps to at least {common + 1} to continue it, or choose another run_dir."
            )
        for n, (_, trained, _) in enumerate(restored):
            self.leaves[n] = jax.tree.leaves(with_frozen(trained, frozen_parts(self.treedef.unflatten(self.leaves[n]))))
        return common + 1, [r[2].get("before", {}) for r in restored]


def resolve_run_axis(run_axis: str) -> str:
    """`auto`: lax.map on CPU, where batching the runs' matmuls made a training step twice as slow as
    running them one after another (benchmarks/sweep.py), vmap on accelerators, which batching fills."""
    if run_axis != "auto":
        return run_axis
    return "map" if jax.default_backend() == "cpu" else "vmap"


@jax.jit
def _take(leaves: tuple, n) -> tuple:
    return tuple(x[n] for x in leaves)


def with_numbers(config: Config, numbers: dict) -> Config:
    """`config` with each vmapped number (dotted path -> traced scalar) swapped in."""
    for path, value in numbers.items():
        config = _replace_path(config, path.split("."), value)
    return config


def _replace_path(section, parts: list[str], value):
    head, *rest = parts
    return dataclasses.replace(section, **{head: _replace_path(getattr(section, head), rest, value) if rest else value})


def _train_states(state) -> list[TrainState]:
    is_state = lambda node: isinstance(node, TrainState)
    return [node for node in jax.tree.leaves(state, is_leaf=is_state) if is_state(node)]


def _with_optimizers(state, txs: list):
    """`state` with each TrainState's optimizer replaced, in tree order."""
    is_state = lambda node: isinstance(node, TrainState)
    it = iter(txs)
    return jax.tree.map(lambda node: node.replace(tx=next(it)) if is_state(node) else node, state, is_leaf=is_state)


def stack_batches(batches: list, pad_token_id: int):
    """Per-run batches of one kind stacked on a leading run axis (on the host, one transfer); rows of
    different widths are widened (prompt parts on the left, the rest on the right) with padding no
    loss sees."""
    batches = [jax.tree.map(np.asarray, b) for b in batches]
    first = batches[0]
    if hasattr(first, "prompt_mask_RxP"):  # rollouts: [prompt | completion], widths of both may differ
        P = max(b.prompt_mask_RxP.shape[1] for b in batches)
        T = max(b.tokens_RxT.shape[1] - b.prompt_mask_RxP.shape[1] for b in batches) + P
        batches = [_widen_rollout(b, P, T, pad_token_id) for b in batches]
    else:
        T = max(x.shape[1] for b in batches for x in jax.tree.leaves(b))
        batches = [jax.tree_util.tree_map_with_path(lambda path, x: _widen(x, T, _fill(path, pad_token_id)), b)
                   for b in batches]
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def _fill(path, pad_token_id: int) -> int:
    return pad_token_id if str(getattr(path[-1], "name", "")).startswith("tokens") else 0


def _widen(x: np.ndarray, width: int, value: int, left: bool = False) -> np.ndarray:
    if x.ndim < 2 or x.shape[1] == width:
        return x
    pad = (width - x.shape[1], 0) if left else (0, width - x.shape[1])
    return np.pad(x, ((0, 0), pad) + ((0, 0),) * (x.ndim - 2), constant_values=value)


def _widen_rollout(b, P: int, T: int, pad_token_id: int):
    """A rollout batch with its prompt part left-padded to P and then right-padded to T tokens."""
    extra = P - b.prompt_mask_RxP.shape[1]
    grow = lambda x, value: _widen(_widen(x, x.shape[1] + extra, value, left=True), T, value)
    return b.replace(
        tokens_RxT=grow(b.tokens_RxT, pad_token_id), mask_RxT=grow(b.mask_RxT, 0),
        completion_mask_RxT=grow(b.completion_mask_RxT, 0), prompt_mask_RxP=_widen(b.prompt_mask_RxP, P, 0, left=True),
        token_rewards_RxT=None if b.token_rewards_RxT is None else grow(b.token_rewards_RxT, 0),
    )


def _num_tokens(batch, n: int) -> float:
    """Real tokens of run n's rows in a stacked host batch."""
    return float(jax.tree.map(operator.itemgetter(n), batch).num_tokens())


def _run_row(out: dict, n: int) -> dict:
    return {name: value[n] for name, value in out.items()}

