"""Train with jaxrl_llm: `python train.py [--config configs/X.yaml] [key.sub=value ...]`.

With no arguments it runs the built-in default (configs/default.yaml): a tiny transformer
warmed up with SFT on synthetic arithmetic, then trained with GRPO on the exact answer.
The installed command `jaxrl-train` is the same.
"""

import sys

from jaxrl_llm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
