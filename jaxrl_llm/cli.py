"""The training command (`python train.py`, `jaxrl-train`) and what every command line (also
`jaxrl_llm.eval`, `.plot`, `.sweep`) shares: quiet imports, and one clean `error:` line for every
problem the user can fix."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

# transformers warns on import that PyTorch is missing; jaxrl_llm never needs it.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def run(main: Callable[[], object]) -> int:
    """`main()`'s exit code (0 unless it returns an int); a `JaxrlError` prints `error: <message>` and
    gives 2, Ctrl-C 130 and SIGTERM 143 (128 + the signal, as a shell reports them)."""
    from jaxrl_llm.errors import JaxrlError, Terminated

    try:
        code = main()
        return code if isinstance(code, int) else 0
    except JaxrlError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Terminated:
        return 143
    except KeyboardInterrupt:
        return 130


# configs/ of the repository, installed with the package as jaxrl_llm/presets (a link in a clone).
PRESETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")


def presets() -> list[str]:
    """The names of the presets that ship with jaxrl_llm."""
    return sorted(name[:-5] for name in os.listdir(PRESETS) if name.endswith(".yaml"))


def preset_path(config: str) -> str:
    """A YAML path as given, or the shipped preset of that name (`dapo` or `dapo.yaml`)."""
    if os.path.exists(config):
        return config
    name = config[:-5] if config.endswith(".yaml") else config
    if os.sep not in config and name in presets():
        return os.path.join(PRESETS, f"{name}.yaml")
    return config  # load_config names the missing file


def train_main(argv=None) -> int:
    """`python train.py` and `jaxrl-train`: train a preset (by default configs/default.yaml) with overrides."""
    from jaxrl_llm.run.registry import ALGORITHMS

    parser = argparse.ArgumentParser(
        description="jaxrl_llm post-training: SFT, RM, PPO, GRPO (+DAPO/GSPO/SAPO/Dr. GRPO), DPO.",
        epilog=f"algorithms: {', '.join(ALGORITHMS)} (config key `algorithm`)\n"
               f"presets in configs/ (give a path, or a name such as dapo): {', '.join(presets())}\n"
               "examples:\n  python train.py\n  python train.py --config configs/dapo.yaml train.total_steps=50\n"
               "  jaxrl-train --config sft optim.lr=3e-4 run_dir=runs/my_sft\n"
               "  python train.py run_dir=runs/seeds sweep.seed=[0,1,2,3] sweep.optim.lr=[1e-3,3e-4]"
               "   # 8 runs, one vmapped program",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="default",
                        help="a YAML preset: a path, or the name of one in configs/ (default: default)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    args = parser.parse_args(argv)

    def run_training():
        from jaxrl_llm.config import load_config
        from jaxrl_llm.config.sweeps import load_sweep
        from jaxrl_llm.run import train, train_sweep

        path = preset_path(args.config)
        sweep = load_sweep(path, args.overrides)
        if sweep is not None:  # several runs: one vmapped program per structure
            train_sweep(sweep)
        else:
            train(load_config(path, args.overrides))

    return run(run_training)
