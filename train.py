"""Train with jaxrl_llm: `python train.py [--config configs/X.yaml] [key.sub=value ...]`.

With no arguments it runs the built-in default (configs/default.yaml): a tiny transformer
warmed up with SFT on synthetic arithmetic, then trained with GRPO on the exact answer.
"""

import argparse
import os
import sys

from jaxrl_llm import cli

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "configs")


def presets() -> list[str]:
    return sorted(name[:-5] for name in os.listdir(CONFIGS) if name.endswith(".yaml"))


def main(argv=None) -> int:
    from jaxrl_llm.run.registry import ALGORITHMS

    parser = argparse.ArgumentParser(
        description="jaxrl_llm post-training: SFT, RM, PPO, GRPO (+DAPO/GSPO/SAPO/Dr. GRPO), DPO.",
        epilog=f"algorithms: {', '.join(ALGORITHMS)} (config key `algorithm`)\n"
               f"presets in configs/: {', '.join(presets())}\n"
               "examples:\n  python train.py\n  python train.py --config configs/dapo.yaml train.total_steps=50\n"
               "  python train.py --config configs/sft.yaml optim.lr=3e-4 run_dir=runs/my_sft\n"
               "  python train.py run_dir=runs/seeds sweep.seed=[0,1,2,3] sweep.optim.lr=[1e-3,3e-4]"
               "   # 8 runs, one vmapped program",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=os.path.join(CONFIGS, "default.yaml"),
                        help="a YAML preset (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    args = parser.parse_args(argv)

    def run_training():
        from jaxrl_llm.config import load_config
        from jaxrl_llm.config.sweeps import load_sweep
        from jaxrl_llm.run import train, train_sweep

        sweep = load_sweep(args.config, args.overrides)
        if sweep is not None:  # several runs: one vmapped program per structure
            train_sweep(sweep)
        else:
            train(load_config(args.config, args.overrides))

    return cli.run(run_training)


if __name__ == "__main__":
    sys.exit(main())
