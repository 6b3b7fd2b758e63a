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
from jaxrl_llm.models.load import MAX_SHARD_BYTES, export_hf
from jaxrl_llm.run import registry
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


def export(config: Config, policy: Policy, summary: dict, root: str | None = None, critic: Policy | None = None,
           max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """ROOT/hf (ROOT: the run_dir unless given), a folder transformers loads (LoRA merged into the base;
    a reward model as a sequence classifier) with a model card; for a LoRA policy also ROOT/adapter, a
    PEFT adapter folder for the base model (`PeftModel.from_pretrained`); a PPO critic as ROOT/critic_hf."""
    root = root or config.run_dir
    models = [("hf", policy)] + ([("critic_hf", critic)] if critic is not None else [])
    for name, model in models:
        params = lora.merge_jit(model.params, model.config) if model.config.lora is not None else model.params
        params = sharding.to_host(params)  # every process joins
        if jax.process_index() != 0:
            continue
        folder = os.path.join(root, name)
        export_hf(params, folder, model.config, model.tokenizer, max_shard_bytes)
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as file:
            file.write(model_card(config, summary, folder, scalar="head" in params, critic=name == "critic_hf"))
    if policy.config.lora is not None and "head" not in policy.params:  # PEFT's causal-LM adapters
        adapters = sharding.to_host(lora.split(policy.params)[1])
        if jax.process_index() == 0:
            peft.save_adapter(os.path.join(root, "adapter"), adapters, policy.config, config.model.source)


def model_card(config: Config, summary: dict, folder: str, scalar: bool, critic: bool = False) -> str:
    """The README.md of an exported model: where it came from, how it was trained, its final
    evaluation, and how transformers loads it."""
    kind = "value model (PPO critic)" if critic else "reward model" if scalar else "policy"
    auto = "AutoModelForSequenceClassification" if scalar else "AutoModelForCausalLM"
    section = registry.algorithm(config).section
    settings = {"algorithm": config.algorithm, "model.source": config.model.source, "seed": config.seed,
                "data.task": config.data.task, "data.batch_size": config.data.batch_size,
                "train.total_steps": config.train.total_steps, "optim.lr": config.optim.lr,
                "optim.schedule": config.optim.schedule}
    if config.model.lora.rank:
        settings.update({"model.lora.rank": config.model.lora.rank, "model.lora.alpha": config.model.lora.alpha})
    if section:  # the algorithm's own settings
        values = config_to_dict(getattr(config, section)).items()
        settings.update({f"{section}.{k}": v for k, v in values if not isinstance(v, dict)})
    evals = sorted(k for k in summary if k.startswith("eval/"))
    lines = [
        "---", "library_name: transformers", f"tags: [jaxrl_llm, {config.algorithm}]", "---", "",
        f"# {os.path.basename(os.path.normpath(config.run_dir))}: {config.algorithm} {kind}", "",
        f"Trained with jaxrl_llm ({config.algorithm}) from `{config.model.source}`; the "
        f"run's config is `{os.path.join(config.run_dir, 'config.yaml')}`.", "",
        "## Settings", "", "| setting | value |", "|---|---|",
        *[f"| `{k}` | `{v}` |" for k, v in settings.items()], "",
    ]
    if evals:
        lines += ["## Held-out evaluation", "", "| metric | before training | after |", "|---|---|---|",
                  *[f"| {k} | {_number(summary.get('before/' + k))} | {_number(summary[k])} |" for k in evals], ""]
    lines += ["## Load it", "", "```python", f"from transformers import {auto}, AutoTokenizer", "",
              f'model = {auto}.from_pretrained("{folder}")', f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
              "```", ""]
    return "\n".join(lines)


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def metrics_writer(config: Config, start_step: int) -> metrics_lib.MetricsWriter:
    """The run's metrics.jsonl, and its `logging.trackers` given the whole config."""
    lg = config.logging
    return metrics_lib.MetricsWriter(config.run_dir, start_step, lg.trackers, lg.project, lg.name,
                                     config_to_dict(config))


def finish(config: Config, policy: Policy, last: dict, quiet: bool,
           writer: metrics_lib.MetricsWriter | None = None, critic: Policy | None = None) -> None:
    """Export to RUN_DIR/hf (RUN_DIR/adapter, RUN_DIR/critic_hf) unless train.export_hf=false, draw
    RUN_DIR/metrics.png (and send it to the `writer`'s trackers), write and print the summary (files are
    written by process 0 of a multi-host run)."""
    if config.train.export_hf:
        export(config, policy, last, critic=critic)
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
        if "time/compiles" in summary:
            print(f"  compiled {summary['time/compiles']:.0f} XLA programs in {summary['time/compile_s']:.1f} s")
