"""The run layer: everything between a config and a trained model.

`registry` (one entry per algorithm), `policy` (the models a run starts from), `examples` (data to
batches), `rollouts` (sampling and scoring), `phases` (each algorithm as state + step + batches),
`loop` (the step loop, checkpoints, metrics), `sweep` (many runs as one program), `resume`,
`evaluate` (held-out evaluation), `keys` (random streams).
"""

from jaxrl_llm.run.evaluate import evaluate
from jaxrl_llm.run.loop import RunResult, train
from jaxrl_llm.run.policy import Policy, load_policy
from jaxrl_llm.run.registry import ALGORITHMS, check
from jaxrl_llm.run.sweep import SweepResult, train_runs, train_sweep

__all__ = [
    "ALGORITHMS", "Policy", "RunResult", "SweepResult", "check", "evaluate", "load_policy", "train", "train_runs",
    "train_sweep",
]
