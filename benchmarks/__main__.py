"""Run every benchmark, print one table of ours beside the PyTorch stack, update RESULTS.md.

    pip install -r benchmarks/requirements.txt    # TRL, the GRPO baseline
    python -m benchmarks                          # CPU: every benchmark (forward ... multiturn, sweep)
    python -m benchmarks --gpu                    # the same, sized for one H100/H200, bf16
    python -m benchmarks --only train_step --repeats 3 --no-write

Each benchmark runs in its own process (`python -m benchmarks.NAME --json FILE`), so one's memory
and thread pools do not leak into the next; its detailed output streams through. Each row is the
median of the timed repeats after a warm-up; compile time is ours only (the PyTorch side does not
compile): XLA's seconds for the programs counted before timing. "compiles after warm-up" counts the
programs compiled during ours' timed calls, which must be 0: a timed call that compiles is mistimed.
A benchmark that refuses to report (the two sides disagree, TRL is missing) gets a row
saying why. A full run (no --only) writes the table, the machine, its load and the date over the
CPU or GPU section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Result, add_model_arguments, print_table, read_result

BENCHMARKS = ("forward", "generate", "rollout_precision", "continuous", "train_step", "grpo_iteration", "overlap",
              "lora", "multiturn", "sweep")
GOALS = {  # (benchmark, gpu) -> minimum speed ratio, issue 8
    ("generate", False): 5.0, ("generate", True): 10.0,
    ("train_step", False): 1.2, ("grpo_iteration", False): 3.0,
    ("sweep", False): 3.0, ("sweep", True): 3.0,  # issue 20
    ("rollout_precision", False): 1.6, ("rollout_precision", True): 1.6,  # int8 over our bf16, issue 21
}
MFU_GOAL = 0.35  # training step on one H100, issue 6
RESULTS = Path(__file__).parent / "RESULTS.md"
SECTION = re.compile(r"(?ms)^(## (?:CPU|GPU))\n.*?(?=^## |\Z)")
HEADER = """# Benchmark results

Written by `python -m benchmarks` (the CPU section) and `python -m benchmarks --gpu` (the GPU
section); each run replaces its own section. Speeds are medians of timed repeats after a warm-up,
ours and the baseline alternating in one process so that other load on the machine hits both
alike; the ratio is how many times faster ours is. Compile time is ours (JAX) alone: XLA's
seconds for the programs it compiled before timing (jax's compile events, counted), and "compiles
after warm-up" the programs compiled during the timed calls, which is 0 unless something
recompiles. On CPU both sides live in one process, so memory is resident-set size: for forward
and generate the process's peak during one call and its growth in that call; for the training step
each side's growth from loading its model to the peak of its second step (weights, AdamW state,
activations, and for ours the compiled step; the second, because torch.optim creates AdamW's
moments in its first step, after the backward freed the activations, which later steps' peaks
hold together); for GRPO the peak during an iteration and the largest growth in one (ours' first
iteration compiles). On a GPU, each allocator's peak. Each benchmark first checks
that both sides computed the same thing and reports no speed otherwise; `python -m
benchmarks.NAME` prints those checks and the details behind a row.
"""
GPU_NOT_RUN = """## GPU

Not run yet: no GPU was available when these benchmarks were written. `python -m benchmarks --gpu`
on one H100/H200 fills this section (bf16, forward 16 × 1024, generate 256 × 128 + 256, train step
16 × 1024 with model FLOPs utilisation, GRPO 8 prompts × 8 samples × 256 tokens). Goals: generation
≥ 10× transformers, training step ≥ 35% MFU.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="bf16 on one GPU, larger shapes, MFU and roofline")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--repeats", type=int, help="timed repeats of every benchmark (default: each one's own)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny shapes, CPU
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    args.names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    return args


def run_one(name: str, args: argparse.Namespace) -> Result | str:
    """The benchmark's row, or the reason it gave none (its last output line)."""
    flags = ["--gpu"] * args.gpu + ["--smoke"] * args.smoke
    flags += ["--repeats", str(args.repeats)] if args.repeats else []
    flags += ["--random-weights"] * args.random_weights + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
    flags += ["--attention", args.attention]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *flags, "--json", str(out)]
        print(f"\n=== {' '.join(cmd[1:-2])}", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.strip())
        proc.wait()
        if proc.returncode == 0 and out.exists():
            return read_result(out)
    reason = next((line for line in reversed(lines) if line), "no output")
    return f"no result (exit {proc.returncode}): {reason[-200:]}"


def goal_text(name: str, gpu: bool, result: Result | str) -> str:
    """The issue's goal for this row and whether the run met it."""
    if name == "train_step" and gpu:
        mfu = getattr(result, "mfu", None)
        verdict = "" if mfu is None else f": {mfu:.0%}, {'met' if mfu >= MFU_GOAL else 'not met'}"
        return f"MFU ≥ {MFU_GOAL:.0%}" + verdict
    goal = GOALS.get((name, gpu))
    if goal is None or isinstance(result, str):
        return f"≥ {goal:g}×" if goal else "-"
    return f"≥ {goal:g}×: {'met' if result.ratio >= goal else 'not met'}"


def table_rows(results: dict[str, Result | str], gpu: bool) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        if isinstance(r, str):
            rows.append([name, r, "", "", "", goal_text(name, gpu, r), "", "", "", ""])
            continue
        rows.append([
            r.row, r.speed(r.ours_s), r.baseline, r.speed(r.baseline_s), f"{r.ratio:.2f}×",
            goal_text(name, gpu, r), "-" if r.compile_s is None else f"{r.compile_s:.1f}",
            "-" if r.compiles_after_warmup is None else str(r.compiles_after_warmup),
            r.ours_memory, r.baseline_memory,
        ])
    return rows


HEADERS = ["benchmark", "jaxrl_llm", "baseline", "baseline speed", "ratio", "goal", "compile s",
           "compiles after warm-up", "memory, ours", "memory, baseline"]


def machine(gpu: bool) -> str:
    """The card, or the CPU model and core count, with the software versions."""
    if gpu:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, check=False)
        where = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else "GPU"
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else []
        where = f"{names[0] if names else platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    versions = ", ".join(f"{p} {_version(p)}" for p in ("jax", "torch", "transformers", "trl"))
    return f"{where}; {versions}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_text(loads: list[float]) -> str:
    """The 1-minute load average seen around the benchmarks, and what it means for the numbers."""
    cores = os.cpu_count()
    text = f"1-minute load average {min(loads):.1f}–{max(loads):.1f} on {cores} cores during the run"
    # The benchmark itself keeps every core busy, so a load up to about `cores` is its own.
    if max(loads) > cores + 1:
        text += (": other jobs were sharing the cores, so absolute speeds are lower than on an idle "
                 "machine, and the ratios may differ from an idle machine's too: alternating the calls "
                 "spreads the load over both sides, but an oversubscribed machine need not slow both alike")
    return text


def section(args, results: dict[str, Result | str], loads: list[float]) -> str:
    """The markdown section of this run."""
    title = "## GPU" if args.gpu else "## CPU"
    date = datetime.date.today().isoformat()
    command = "python -m benchmarks" + " --gpu" * args.gpu + " --random-weights" * args.random_weights
    command += f" --attention {args.attention}" * (args.attention != "xla")
    lines = [title, "", f"{date}, `{command}`: {machine(args.gpu)}; "
             f"{load_text(loads)}.", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results, args.gpu)]
    notes = [note for r in results.values() if isinstance(r, Result) for note in r.notes]
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def update_results(text: str, gpu: bool, path: Path = RESULTS) -> None:
    """Replace this mode's section of RESULTS.md, keeping the other one."""
    old = path.read_text() if path.exists() else HEADER
    sections = {m.group(1): m.group(0) for m in SECTION.finditer(old)}
    sections["## GPU" if gpu else "## CPU"] = text
    sections.setdefault("## CPU", "## CPU\n\nNot run yet.\n")
    sections.setdefault("## GPU", GPU_NOT_RUN)
    head = old.split("\n## ", 1)[0].rstrip() + "\n"
    path.write_text("\n".join([head, sections["## CPU"].rstrip() + "\n", sections["## GPU"].rstrip() + "\n"]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    loads = [os.getloadavg()[0]]
    results = {}
    for name in args.names:
        results[name] = run_one(name, args)
        loads.append(os.getloadavg()[0])
    print(f"\n=== summary ({'GPU' if args.gpu else 'CPU'}; {load_text(loads)})")
    print_table(HEADERS, table_rows(results, args.gpu))
    for r in results.values():
        for note in getattr(r, "notes", ()):
            print(f"- {note}")
    if args.no_write or args.smoke or args.only:
        return
    if not any(isinstance(r, Result) for r in results.values()):
        sys.exit(f"No benchmark reported a speed; {RESULTS} left alone.")
    update_results(section(args, results, loads), args.gpu)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
