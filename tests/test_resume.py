"""Resume is exact in every case, a crash loses nothing, and what cannot resume says why.

The resume matrix runs the default job, shortened, in a subprocess (tests/resume_probe.py), stops it
with a real signal at a fixed point of the loop, resumes it, and compares every metrics row (timings
aside) with the same run made in one go.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from jaxrl_llm import metrics

HERE = os.path.dirname(os.path.abspath(__file__))
TIMINGS = ("time/", "tokens_per_s")


PROBE_ENV = {}  # the probes' environment: this process's, with the compilation cache below


@pytest.fixture(scope="module", autouse=True)
def compile_cache(xla_cache_folder):
    """The probe processes share a persistent XLA compilation cache (conftest's folder): each one
    compiles the same programs, and loading them from disk takes a probe from about 17 s to 7 s."""
    PROBE_ENV.update(os.environ, JAX_COMPILATION_CACHE_DIR=str(xla_cache_folder),
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    yield
    PROBE_ENV.clear()


def probe(run_dir, spec, *overrides, resume=False):
    """Run tests/resume_probe.py; (exit code, stderr)."""
    args = [sys.executable, os.path.join(HERE, "resume_probe.py"), str(run_dir), spec, *overrides]
    if resume:
        args.append("train.resume=true")
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, env=PROBE_ENV or None)
    return out.returncode, out.stderr


def rows(run_dir, name="metrics.jsonl"):
    with open(os.path.join(run_dir, name)) as file:
        lines = [json.loads(line) for line in file if line.strip()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMINGS)} for row in lines]


def same_rows(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), a["step"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The shortened default, run in one go."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    code, err = probe(run_dir, "none")
    assert code == 0, err[-2000:]
    return run_dir


def resumed_equals_straight(run_dir, straight):
    code, err = probe(run_dir, "none", resume=True)
    assert code == 0, err[-2000:]
    same_rows(rows(run_dir), rows(straight))
    same_rows(rows(run_dir / "sft_warmup"), rows(straight / "sft_warmup"))
    summary, want = metrics.read_summary(run_dir), metrics.read_summary(straight)
    assert summary.keys() == want.keys() and any(k.startswith("before/") for k in summary)
    assert {k: v for k, v in summary.items() if not k.startswith(TIMINGS)} == pytest.approx(
        {k: v for k, v in want.items() if not k.startswith(TIMINGS)}, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("signame, code", [("TERM", 143), ("INT", 130)])
def test_sigterm_and_ctrl_c_save_the_step_and_resume_exactly(tmp_path, straight, signame, code):
    run_dir = tmp_path / "run"
    got, err = probe(run_dir, f"{signame}@step:2")
    assert got == code, err[-2000:]
    saved = [int(name) for name in os.listdir(run_dir / "checkpoints") if name.isdigit()]
    assert max(saved) == 2  # the step in progress finished and was saved
    assert [r["step"] for r in rows(run_dir)] == [0, 1, 2]
    resumed_equals_straight(run_dir, straight)


def test_kill_during_a_checkpoint_loses_nothing(tmp_path, straight):
    run_dir = tmp_path / "run"
    got, _ = probe(run_dir, "KILL@checkpoint:3")  # the warm start's, GRPO step 1's, then step 3's: killed
    assert got == -signal.SIGKILL
    assert sorted(int(n) for n in os.listdir(run_dir / "checkpoints") if n.isdigit()) == [1]
    resumed_equals_straight(run_dir, straight)


def test_kill_during_the_warm_start(tmp_path, straight):
    run_dir = tmp_path / "run"
    got, _ = probe(run_dir, "KILL@warmup:0")
    assert got == -signal.SIGKILL and not (run_dir / "metrics.jsonl").exists()
    resumed_equals_straight(run_dir, straight)


def test_kill_during_the_first_step_of_a_resume_keeps_every_row(tmp_path, straight):
    run_dir = tmp_path / "run"
    assert probe(run_dir, "KILL@step:5")[0] == -signal.SIGKILL  # checkpoints at steps 1 and 3
    before = rows(run_dir)
    assert [r["step"] for r in before] == [0, 1, 2, 3, 4]
    assert probe(run_dir, "KILL@started", resume=True)[0] == -signal.SIGKILL  # resumed at step 4
    assert rows(run_dir) == before[:4]  # the rows of the steps its checkpoint holds, none lost
    resumed_equals_straight(run_dir, straight)


# ----------------------------------------------------------------------------- refusals that change nothing

ROOT = os.path.dirname(HERE)
TINY = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1", "model.tiny.head_dim=8",
    "data.synthetic.num_examples=400", "data.eval_size=8", "data.batch_size=8", "data.max_completion_len=8",
    "train.eval_every=0", "train.export_hf=false",
]


def config(preset, run_dir, *overrides):
    from jaxrl_llm.config import load_config

    return load_config(os.path.join(ROOT, "configs", f"{preset}.yaml"), [*TINY, f"run_dir={run_dir}", *overrides])


def files(run_dir):
    """Every file under `run_dir` with its bytes (what a refused resume must leave alone)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    from jaxrl_llm.run import train

    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    train(config("grpo", run_dir, "train.total_steps=2", "train.sft_warmup_steps=2", "grpo.group_size=4"), quiet=True)
    return run_dir


@pytest.mark.parametrize("override, field", [
    ("algorithm=sft", "algorithm: 'grpo' -> 'sft'"),
    ("model.tiny.hidden_size=48", "model.tiny.hidden_size: 32 -> 48"),
    ("model.ref_path=elsewhere", "model.ref_path: None -> 'elsewhere'"),
    ("model.reward_model_path=runs/rm/hf", "model.reward_model_path: None -> 'runs/rm/hf'"),
])
def test_a_resume_that_cannot_take_effect_is_refused_and_writes_nothing(grpo_run, override, field):
    from jaxrl_llm.errors import TrainingError
    from jaxrl_llm.run import train

    before = files(grpo_run)
    with pytest.raises(TrainingError, match=rf"cannot resume .* with {re.escape(field)}.*Resume with its saved config"):
        train(config("grpo", grpo_run, "train.total_steps=3", "train.sft_warmup_steps=2", "grpo.group_size=4",
                     "train.resume=true", override), quiet=True)
    assert files(grpo_run) == before


def test_a_shorter_warm_start_or_run_is_refused_and_writes_nothing(grpo_run):
    from jaxrl_llm.errors import TrainingError
    from jaxrl_llm.run import train

    before = files(grpo_run)
    with pytest.raises(TrainingError, match=r"holds a 2-step warm start, but train.sft_warmup_steps=1"):
        train(config("grpo", grpo_run, "train.total_steps=3", "train.sft_warmup_steps=1", "grpo.group_size=4",
                     "train.resume=true"), quiet=True)
    with pytest.raises(TrainingError, match=r"has already trained 2 steps, more than train.total_steps=1"):
        train(config("grpo", grpo_run, "train.total_steps=1", "train.sft_warmup_steps=2", "grpo.group_size=4",
                     "train.resume=true"), quiet=True)
    assert files(grpo_run) == before


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_running_longer_keeps_the_schedule_the_run_started_with(tmp_path, schedule):
    """A decay fixed at the start: the resumed run equals a straight run with that decay
    (optim.decay_steps), every step at the learning rate it had."""
    from jaxrl_llm.run import train

    common = [f"optim.schedule={schedule}", "optim.warmup_steps=1", "train.sft_warmup_steps=0", "grpo.group_size=4"]
    run_dir = tmp_path / "run"
    train(config("grpo", run_dir, *common, "train.total_steps=4"), quiet=True)
    with pytest.warns(UserWarning, match=re.escape("the run keeps the schedule it started with (optim.decay_steps=4)")):
        train(config("grpo", run_dir, *common, "train.total_steps=6", "train.resume=true"), quiet=True)
    train(config("grpo", tmp_path / "straight", *common, "train.total_steps=6", "optim.decay_steps=4"), quiet=True)
    same_rows(rows(run_dir), rows(tmp_path / "straight"))
    assert rows(run_dir)[-1]["lr"] == 0.0


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    from jaxrl_llm import checkpoint
    from jaxrl_llm.errors import CheckpointError
    from jaxrl_llm.run import train

    common = ["train.total_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=4"]
    whole = train(config("sft", tmp_path / "whole", *common), quiet=True)
    run_dir = tmp_path / "cut"
    train(config("sft", run_dir, "train.total_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=4"),
          quiet=True)
    data_files = [p for p in (run_dir / "checkpoints" / "2" / "state").rglob("*") if p.is_file() and p.stat().st_size]
    for path in data_files:  # truncate the newest checkpoint's arrays
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"resuming from checkpoint 1 in .*: newer ones could not be restored"):
        resumed = train(config("sft", run_dir, *common, "train.resume=true"), quiet=True)
    assert rows(run_dir)[-1]["loss"] == pytest.approx(rows(whole.run_dir)[-1]["loss"], rel=1e-6)

    manager = checkpoint.checkpoint_manager(str(run_dir / "checkpoints"))
    for step in manager.all_steps():
        for item in (run_dir / "checkpoints" / str(step)).iterdir():
            if item.name == "meta":
                shutil.rmtree(item)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* could be restored: step 3: .*"):
        checkpoint.restore_latest(manager, resumed.policy.params)


def test_a_full_disk_during_a_checkpoint_is_one_error_naming_the_folder(tmp_path, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    from jaxrl_llm import checkpoint
    from jaxrl_llm.errors import CheckpointError

    manager = checkpoint.checkpoint_manager(str(tmp_path / "checkpoints"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(CheckpointError, match=r"saving checkpoint 7 in .*checkpoints failed \(OSError: .*No space left"
                                              r".*the disk is full \(\d+ MiB free\)"):
        checkpoint.save(manager, 7, {"w": np.zeros(3)}, {})


def test_a_read_only_run_dir_is_one_error(tmp_path):
    from jaxrl_llm.errors import TrainingError
    from jaxrl_llm.run import train

    if os.geteuid() == 0:  # root writes anywhere: make the folder a file instead
        (tmp_path / "ro").write_text("")
        run_dir = tmp_path / "ro" / "run"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        run_dir = tmp_path / "ro" / "run"
    with pytest.raises(TrainingError, match=r"cannot write to run_dir .*; choose a writable run_dir"):
        train(config("sft", run_dir, "train.total_steps=1"), quiet=True)
