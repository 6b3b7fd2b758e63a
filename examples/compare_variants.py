"""GRPO and its successors (the presets grpo, dapo, gspo, sapo, dr_grpo) on the default task, 8 seeds
each, as one sweep: one process, one compiled program per variant (they differ in structure), the
seeds of a variant stepped together. Then the paired comparison of their final held-out accuracy and
a plot with a line per run and a mean with its 95% band per variant.

    python examples/compare_variants.py                          # runs/variants, docs/variants.png
    python examples/compare_variants.py --seeds 4 --out v.png train.total_steps=50

Every run takes two updates per rollout (grpo.num_minibatches=2): the second is off-policy, so the
ratio leaves 1 and the clipping / gating rules act; with one on-policy update the PPO clip, GSPO and
SAPO all give the same gradient. Seed s of every variant sees the same prompts in the same order and
starts from the same warm start, so the differences are paired by seed.
"""

import argparse
import os
import sys

from jaxrl_llm import cli
from jaxrl_llm.compare import plot_sweep
from jaxrl_llm.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("grpo", "dapo", "gspo", "sapo", "dr_grpo")
COMMON = ["grpo.num_minibatches=2", "train.total_steps=100", "train.eval_every=20", "train.checkpoint_every=0",
          "train.export_hf=false"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--runs", default="runs/variants", help="the sweep's run_dir")
    parser.add_argument("--out", default=os.path.join(HERE, "..", "docs", "variants.png"))
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="applied to every run")
    args = parser.parse_args(argv)

    def compare():
        from jaxrl_llm.run import train_runs

        configs, settings = [], []
        for variant in VARIANTS:
            for seed in range(args.seeds):
                run_dir = os.path.join(args.runs, f"run_{len(configs):02d}")
                preset = os.path.join(HERE, "..", "configs", f"{variant}.yaml")
                configs.append(load_config(preset, [*COMMON, *args.overrides, f"seed={seed}", f"run_dir={run_dir}"]))
                settings.append({"preset": variant, "seed": seed})
        train_runs(configs, args.runs, settings)  # ends with the paired comparison
        metrics = ["eval/accuracy", "reward/mean", "response_length/mean", "clipfrac/high", "entropy", "kl"]
        print("plot:", plot_sweep(args.runs, args.out, metrics))

    return cli.run(compare)


if __name__ == "__main__":
    sys.exit(main())
