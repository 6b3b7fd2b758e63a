"""A sweep as one program against one process per run: S seeds of the default job (`python train.py`:
the tiny model's SFT warm start, then GRPO on one-digit sums) as one `sweep.seed=[...]` run, beside
the same S runs launched one after another as `python train.py seed=s`.

    python -m benchmarks.sweep                  # 8 seeds, each run as configs/default.yaml has it
    python -m benchmarks.sweep --seeds 4 --steps 50

Both sides are whole processes, timed from launch to exit (imports, compiles, checkpoints, exports
included); memory is each side's peak resident set (the largest of the sequential processes). The
sweep's run s must end with run s's held-out accuracy (on CPU, where the sweep steps its runs one
after another inside the program, bit for bit), or no speed is reported. The limit: on a CPU the
runs' steps cost about what they cost alone, so a sweep saves what lies around them (start-up,
compiles, evaluations, writing); the printed bound is the sequential time over the sweep's own step
and generation time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Result, add_model_arguments, format_bytes, print_table, write_result

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="S runs (default 8)")
    parser.add_argument("--steps", type=int, help="GRPO and warm-start steps (default: the preset's 150 each)")
    parser.add_argument("--gpu", action="store_true", help="the same job on the default accelerator")
    parser.add_argument("--repeats", type=int, default=1, help="ignored: each side runs once (minutes)")
    parser.add_argument("--json", help="also write the summary row here (for python -m benchmarks)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # 2 seeds, 3 steps
    add_model_arguments(parser)  # accepted from `python -m benchmarks`; the job's model is the preset's tiny one
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps = 2, 3
    return args


def job(args, run_dir: str) -> list[str]:
    """train.py's arguments for the default job in `run_dir`."""
    steps = [] if args.steps is None else [f"train.total_steps={args.steps}", f"train.sft_warmup_steps={args.steps}"]
    return [sys.executable, str(ROOT / "train.py"), f"run_dir={run_dir}", *steps]


def run(command: list[str]) -> tuple[float, int]:
    """(seconds from launch to exit, peak resident bytes) of one process; a failed run stops the
    benchmark with its output."""
    with tempfile.TemporaryFile("w+") as log:
        began = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - began
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            log.seek(0)
            sys.exit(f"{' '.join(command)} failed:\n{log.read()[-4000:]}")
    return seconds, usage.ru_maxrss * 1024


def final_accuracy(run_dir: str) -> float:
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as file:
        return json.load(file)["eval/accuracy"]


def loop_seconds(run_dir: str) -> float:
    """A run's own step and generation time, its warm start's included (from its metrics)."""
    total = 0.0
    for folder in (run_dir, os.path.join(run_dir, "sft_warmup")):
        with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as file:
            rows = [json.loads(line) for line in file]
        total += sum(r.get("time/train", 0.0) + r.get("time/generation", 0.0) for r in rows[1:])
    return total


def compiles_of(run_dir: str) -> tuple[float, int]:
    """(XLA compile seconds of the run, programs compiled after its second step) from its outputs: a
    sweep's step 1 compiles the vmapped sampler (step 0 samples each run alone)."""
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as file:
        seconds = json.load(file)["time/compile_s"]
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as file:
        counts = [json.loads(line)["time/compiles"] for line in file]
    return seconds, int(counts[-1] - counts[min(1, len(counts) - 1)])


def measure(args) -> Result:
    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory() as folder:
        sweep_dir = os.path.join(folder, "sweep")
        sweep_s, sweep_peak = run(job(args, sweep_dir) + [f"sweep.seed=[{','.join(map(str, seeds))}]"])
        sweep_compute_s = loop_seconds(os.path.join(sweep_dir, "run_00"))  # a sweep run's times are all runs'
        compile_s, recompiles = compiles_of(os.path.join(sweep_dir, "run_00"))
        sequential_s, compute_s, sequential_peak = 0.0, 0.0, 0
        for seed in seeds:
            run_dir = os.path.join(folder, f"seed_{seed}")
            seconds, peak = run(job(args, run_dir) + [f"seed={seed}"])
            sequential_s, sequential_peak = sequential_s + seconds, max(sequential_peak, peak)
            compute_s += loop_seconds(run_dir)
            ours, theirs = final_accuracy(os.path.join(sweep_dir, f"run_{seed:02d}")), final_accuracy(run_dir)
            if abs(ours - theirs) > (0.0 if not args.gpu else 0.02):
                sys.exit(f"seed {seed}: the sweep's run ends at accuracy {ours}, the run alone at {theirs}; "
                         "no speed reported.")
    notes = (
        f"{args.seeds} seeds of the default job: one sweep process {sweep_s:.1f} s, {args.seeds} sequential "
        f"processes {sequential_s:.1f} s; every run's final held-out accuracy equal on both sides.",
        f"steps and generation: {compute_s:.1f} s in the sequential runs, {sweep_compute_s:.1f} s in the sweep "
        f"(all runs); with nothing else (no start-up, compiles, evaluations, checkpoints, exports) the ratio "
        f"would be {sequential_s / sweep_compute_s:.2f}x.",
        f"the sweep compiled for {compile_s:.1f} s, and {recompiles} programs after its second step",
    )
    return Result(
        row=f"sweep of {args.seeds} seeds, default job", baseline=f"{args.seeds} x python train.py",
        ours_s=sweep_s, baseline_s=sequential_s, work=0, unit="s", compile_s=compile_s,
        ours_memory=format_bytes(sweep_peak), baseline_memory=format_bytes(sequential_peak), repeats=1, notes=notes,
        compiles_after_warmup=recompiles,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = measure(args)
    print_table(
        ["benchmark", "jaxrl_llm", "baseline", "ratio", "peak memory (ours / baseline)"],
        [[result.row, f"{result.ours_s:.1f} s", f"{result.baseline} {result.baseline_s:.1f} s", f"{result.ratio:.2f}x",
          f"{result.ours_memory} / {result.baseline_memory}"]],
    )
    for note in result.notes:
        print(note)
    write_result(result, args.json)


if __name__ == "__main__":
    main()
