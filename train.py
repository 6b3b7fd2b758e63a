"""Train with jaxrl_llm: `python train.py [--config configs/X.yaml] [key.sub=value ...]`.

With no arguments it runs the built-in default (configs/default.yaml): a tiny transformer
warmed up with SFT on synthetic arithmetic, then trained with GRPO on the exact answer.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "configs")


def presets() -> list[str]:
    return sorted(name[:-5] for name in os.listdir(CONFIGS) if name.endswith(".yaml"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="jaxrl_llm post-training: SFT, RM, PPO, GRPO (+DAPO/GSPO/SAPO/Dr. GRPO), DPO.",
        epilog="algorithms: sft, rm, ppo, grpo, dpo (config key `algorithm`)\n"
               f"presets in configs/: {', '.join(presets())}\n"
               "examples:\n  python train.py\n  python train.py --config configs/dapo.yaml train.total_steps=50\n"
               "  python train.py --config configs/sft.yaml optim.lr=3e-4 run_dir=runs/my_sft",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=os.path.join(CONFIGS, "default.yaml"),
                        help="a YAML preset (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    args = parser.parse_args(argv)

    from jaxrl_llm.config import ConfigError, load_config
    from jaxrl_llm.data import DataError
    from jaxrl_llm.loop import TrainingError, train
    from jaxrl_llm.models.hf import ModelLoadError
    from jaxrl_llm.rewards import RewardError
    from jaxrl_llm.sharding import ShardingError
    from jaxrl_llm.tokenizer import TokenizerError

    try:
        train(load_config(args.config, args.overrides))
    except (ConfigError, DataError, FileNotFoundError, ModelLoadError, RewardError, ShardingError,
            TokenizerError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
