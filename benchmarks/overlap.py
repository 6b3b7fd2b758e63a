"""Overlapped rollouts: seconds per GRPO iteration with `sampling.overlap` off and on (staleness 1).

    python -m benchmarks.overlap                    # CPU: the SmolLM2 GRPO CPU preset, 8 steps each
    python -m benchmarks.overlap --gpu              # the GPU preset

Both runs train the same preset from the same start for --steps steps (no evaluation, no
checkpoints, no export) in this process; an iteration is the wall time between two steps' metrics
rows, and each side's figure is the median over the steps after the first two (compiles). With
overlap on, step t+1's rollouts (generation, decoding, reward scoring) run on a worker thread while
step t trains; the ratio is how much of the generation that hides. The floor is max(generation,
training) per step, both measured in the synchronous run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Result, add_model_arguments, print_table, smollm2_source, write_result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU preset")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", help="also write the summary row here (for python -m benchmarks)")
    parser.add_argument("--repeats", type=int, help="ignored: the median is over the steps after the first two")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the tiny default job
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    args.preset = "configs/default.yaml" if args.smoke else (
        "configs/smollm2_grpo_gpu.yaml" if args.gpu else "configs/smollm2_grpo_cpu.yaml"
    )
    args.steps = 4 if args.smoke else args.steps
    return args


def run(args, run_dir: Path, overlap: bool) -> tuple[list[dict], dict]:
    """Metrics rows of `--steps` steps of the preset, each with the wall time it arrived at, and the
    run's summary."""
    from jaxrl_llm.config import load_config
    from jaxrl_llm.run import train

    overrides = [f"run_dir={run_dir}", f"train.total_steps={args.steps}", "train.eval_every=0", "data.eval_size=0",
                 "train.checkpoint_every=0", "train.export_hf=false", "train.sft_warmup_steps=0",
                 f"sampling.overlap={str(overlap).lower()}", "sampling.staleness=1"]
    if args.random_weights and not args.smoke:
        model = smollm2_source(str(run_dir.parent / "model"), args)
        overrides += [f"model.source={model}", f"model.attention={args.attention}"]
    arrivals = []
    result = train(load_config(args.preset, overrides), quiet=True,
                   on_event=lambda name, _, step: arrivals.append(time.perf_counter()) if name == "step" else None)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    for row, arrived in zip(rows, arrivals):
        row["arrived"] = arrived
    return rows, result.metrics


def measure(args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory() as folder:
        sync, sync_summary = run(args, Path(folder) / "sync", overlap=False)
        overlapped, summary = run(args, Path(folder) / "overlap", overlap=True)
    iteration = lambda rows: float(np.median(np.diff([r["arrived"] for r in rows])[1:]))
    sync_s, overlap_s = iteration(sync), iteration(overlapped)
    generation = float(np.median([r["time/generation"] for r in sync[2:]]))
    training = float(np.median([r["time/train"] for r in sync[2:]]))
    print_table(["", "s / iteration", "generation s", "train s"], [
        ["synchronous", f"{sync_s:.2f}", f"{generation:.2f}", f"{training:.2f}"],
        ["overlap, staleness 1", f"{overlap_s:.2f}", "(hidden)", "-"],
    ])
    print(f"overlap / synchronous: {sync_s / overlap_s:.2f}x faster; floor max(generation, train) = "
          f"{max(generation, training):.2f} s, at most {sync_s / max(generation, training):.2f}x")
    # The medians are of the steps after the second: no program may compile in them.
    recompiles = {name: int(rows[-1]["time/compiles"] - rows[1]["time/compiles"])
                  for name, rows in (("synchronous", sync), ("overlapped", overlapped))}
    print(f"compiles: synchronous {sync_summary['time/compiles']:.0f} programs in "
          f"{sync_summary['time/compile_s']:.1f} s, "
          f"overlapped {summary['time/compiles']:.0f} in {summary['time/compile_s']:.1f} s; after the second "
          f"step {recompiles['synchronous']} and {recompiles['overlapped']}")
    return Result(
        row=f"GRPO iteration, {Path(args.preset).stem}, overlapped rollouts (staleness 1)",
        baseline="the synchronous run", ours_s=overlap_s, baseline_s=sync_s, work=0, unit="s",
        compile_s=summary["time/compile_s"], ours_memory="-", baseline_memory="-", repeats=len(sync) - 2,
        compiles_after_warmup=recompiles["overlapped"],
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_result(measure(args), args.json)


if __name__ == "__main__":
    main()
