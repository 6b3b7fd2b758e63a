"""What a run leaves in its folder besides checkpoints and metrics: a writable folder to start with,
and at the end the summary, the plot and the HF export."""

from __future__ import annotations

import os

import jax

from jaxrl_llm import metrics as metrics_lib
from jaxrl_llm import sharding
from jaxrl_llm.config import Config
from jaxrl_llm.errors import TrainingError
from jaxrl_llm.models.load import export_hf
from jaxrl_llm.run.policy import Policy


def writable(run_dir: str) -> None:
    """Create `run_dir` and prove it takes files, before any work goes into it."""
    probe = os.path.join(run_dir, ".write_probe")
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as error:
        raise TrainingError(
            f"cannot write to run_dir {run_dir!r} ({error.strerror}); choose a writable run_dir."
        ) from None


def finish(config: Config, policy: Policy, last: dict, quiet: bool) -> None:
    """Export to RUN_DIR/hf if asked, draw RUN_DIR/metrics.png, write and print the summary
    (files are written by process 0 of a multi-host run)."""
    params = sharding.to_host(policy.params) if config.train.export_hf else None  # every process joins
    if jax.process_index() != 0:
        return
    if config.train.export_hf:
        export_hf(params, os.path.join(config.run_dir, "hf"), policy.config, policy.tokenizer)
    summary = {k: float(v) for k, v in last.items()}
    metrics_lib.write_summary(config.run_dir, summary)
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
