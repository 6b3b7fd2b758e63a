"""A short run of the default job (SFT warm start, then GRPO, tiny model) that test_resume.py starts in
a subprocess and stops with a real signal at a chosen point of the loop.

    python tests/resume_probe.py RUN_DIR SIGNAL@EVENT[:N] [key=value ...]

SIGNAL is KILL, TERM, INT or none. EVENT is `step` (GRPO step N done), `warmup` (warm-start step N
done), `started` (a resumed GRPO phase is about to run its first step: restored, its metrics file
open) or `checkpoint` (the N-th checkpoint, written
but not yet renamed into place by orbax). Exits with train.py's code.
"""

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import orbax.checkpoint._src.path.async_path as async_path  # noqa: E402

from jaxrl_llm import cli  # noqa: E402
from jaxrl_llm.config import load_config  # noqa: E402
from jaxrl_llm.run.loop import train  # noqa: E402

SHORT = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.head_dim=8", "data.synthetic.num_examples=400", "data.eval_size=16", "data.batch_size=8",
    "grpo.group_size=4", "data.max_completion_len=8", "train.sft_warmup_steps=2", "train.total_steps=6",
    "train.checkpoint_every=2", "train.eval_every=3", "train.export_hf=false", "optim.lr=1e-3",
]


def main() -> int:
    run_dir, spec, *overrides = sys.argv[1:]
    name, _, where = spec.partition("@")
    event, _, count = where.partition(":")
    count = int(count or 0)
    fire = lambda: os.kill(os.getpid(), getattr(signal, f"SIG{name}"))

    if event == "checkpoint":
        rename, renames = async_path.rename, []

        async def rename_then_maybe_die(src, dst):
            renames.extend([dst] if dst.name.isdigit() else [])  # a step's folder, not one of its items
            if len(renames) == count:
                fire()
            return await rename(src, dst)

        async_path.rename = rename_then_maybe_die

    def on_event(kind: str, where: str, step: int) -> None:
        warm = os.path.basename(where) == "sft_warmup"
        if (event, kind, warm) in (("step", "step", False), ("warmup", "step", True)) and step == count:
            fire()
        if event == "started" and kind == "started" and step > 0 and not warm:
            fire()

    config = load_config(os.path.join(ROOT, "configs", "default.yaml"), [f"run_dir={run_dir}", *SHORT, *overrides])
    return cli.run(lambda: train(config, quiet=True, on_event=None if name == "none" else on_event))


if __name__ == "__main__":
    sys.exit(main())
