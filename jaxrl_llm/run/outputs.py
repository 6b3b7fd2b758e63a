"""What a run leaves in its folder besides checkpoints and metrics: a writable folder to start with,
and at the end the summary, the plot and the HF export."""

from __future__ import annotations

import os

import jax

from jaxrl_llm import metrics as metrics_lib
from jaxrl_llm import sharding
from jaxrl_llm.config import Config, config_to_dict
from jaxrl_llm.errors import TrainingError
from jaxrl_llm.models import lora, peft
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


def export(config: Config, policy: Policy) -> None:
    """RUN_DIR/hf, a folder transformers loads (LoRA merged into the base), and for a LoRA policy also
    RUN_DIR/adapter, a PEFT adapter folder for the base model (`PeftModel.from_pretrained`)."""
    params = policy.params
    if policy.config.lora is not None:
        params = lora.merge_jit(params, policy.config)
    params = sharding.to_host(params)  # every process joins
    adapters = sharding.to_host(lora.split(policy.params)[1]) if policy.config.lora is not None else None
    if jax.process_index() != 0:
        return
    export_hf(params, os.path.join(config.run_dir, "hf"), policy.config, policy.tokenizer)
    if adapters and "head" not in policy.params:  # PEFT's causal-LM adapters; a reward model exports merged only
        peft.save_adapter(os.path.join(config.run_dir, "adapter"), adapters, policy.config, config.model.source)


def metrics_writer(config: Config, start_step: int) -> metrics_lib.MetricsWriter:
    """The run's metrics.jsonl, and its `logging.trackers` given the whole config."""
    lg = config.logging
    return metrics_lib.MetricsWriter(config.run_dir, start_step, lg.trackers, lg.project, lg.name,
                                     config_to_dict(config))


def finish(config: Config, policy: Policy, last: dict, quiet: bool,
           writer: metrics_lib.MetricsWriter | None = None) -> None:
    """Export to RUN_DIR/hf (and RUN_DIR/adapter) if asked, draw RUN_DIR/metrics.png (and send it to the
    `writer`'s trackers), write and print the summary (files are written by process 0 of a multi-host run)."""
    if config.train.export_hf:
        export(config, policy)
    if jax.process_index() != 0:
        return
    summary = {k: float(v) for k, v in last.items()}
    metrics_lib.write_summary(config.run_dir, summary)
    try:  # after summary.json, whose before-training evaluation starts the eval curves
        plot = metrics_lib.plot_runs([config.run_dir], os.path.join(config.run_dir, "metrics.png"))
    except ValueError:
        plot = None  # nothing plottable was logged (e.g. zero steps run)
    if plot and writer is not None:
        writer.add_plot(plot)
    if not quiet:
        print(f"\n{config.algorithm} run in {config.run_dir}")
        for name in sorted(summary):
            if name.startswith(("eval/", "reward/mean", "loss", "kl")):
                was = summary.get(f"before/{name}")
                print(f"  {name:28s} {summary[name]:.4g}" + ("" if was is None else f"   (before: {was:.4g})"))
