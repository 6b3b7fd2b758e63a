"""Export a run's model from any saved checkpoint, without resuming it: `python -m jaxrl_llm.export
RUN_DIR [--step N] [--out DIR]` (also `jaxrl-export`).

Writes DIR/hf (default DIR: RUN_DIR for the latest checkpoint, RUN_DIR/export_step_N for --step N), a
folder transformers loads, with a model card; a reward-model run as a sequence classifier, a PPO run's
critic beside it as DIR/critic_hf, a LoRA run's adapters also as DIR/adapter (a PEFT adapter folder).
Steps are numbered as in metrics.jsonl and checkpoints/ (0 is the first).
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxrl_llm import cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (it holds config.yaml and checkpoints/)")
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    parser.add_argument("--out", help="where hf/ (and critic_hf/, adapter/) go")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="larger models are written as safetensors shards of at most this size (default 5)")
    args = parser.parse_args(argv)
    return cli.run(lambda: export_run(args.run_dir, args.step, args.out, int(args.max_shard_gb * 10**9)))


def export_run(run_dir: str, step: int | None = None, out: str | None = None, max_shard_bytes: int = 5 * 10**9):
    """Export RUN_DIR's checkpoint at `step` (default the latest) to OUT/hf; returns OUT."""
    from jaxrl_llm.config import load_config
    from jaxrl_llm.errors import ConfigError
    from jaxrl_llm.metrics import read_summary
    from jaxrl_llm.run.evaluate import is_run_dir, run_models
    from jaxrl_llm.run.outputs import export

    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir!r} is not a run folder (no config.yaml in it); give the run_dir of a run.")
    config = load_config(os.path.join(run_dir, "config.yaml"))
    policy, critic = run_models(run_dir, step)
    out = out or (run_dir if step is None else os.path.join(run_dir, f"export_step_{step}"))
    # The summary's evaluation belongs to the run's end: a model card of an earlier step leaves it out.
    summary = read_summary(run_dir) if step is None else {}
    export(config, policy, summary, out, critic, max_shard_bytes)
    print(f"exported {run_dir} (step {'latest' if step is None else step}) to {os.path.join(out, 'hf')}")
    return out


if __name__ == "__main__":
    sys.exit(main())
