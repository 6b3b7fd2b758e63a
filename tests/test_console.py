"""The installed commands (`jaxrl-train`, `jaxrl-eval`, `jaxrl-plot`, `jaxrl-sweep`, `jaxrl-export`) are the
functions behind `python train.py` and `python -m jaxrl_llm.eval | .plot | .sweep | .export`, and work from any folder;
the README's install lines name extras that pyproject.toml defines."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig

import tomllib

from jaxrl_llm import cli, export, plot, sweep
from jaxrl_llm import eval as eval_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.head_dim=8", "data.synthetic.num_examples=200", "data.eval_size=8", "data.batch_size=8",
    "train.total_steps=2", "train.eval_every=0",
]
COMMANDS = {"jaxrl-train": cli.train_main, "jaxrl-eval": eval_cli.main, "jaxrl-plot": plot.main,
            "jaxrl-sweep": sweep.main, "jaxrl-export": export.main}
# The README's install lines, verbatim.
INSTALLS = [
    "pip install -e '.[cuda]'",
    "pip install -e '.[tpu]'",
    "pip install -e '.[wandb,trackio,tensorboard]'",
    "pip install -e '.[math]'",
]


def command(name: str, *args: str, cwd: str) -> str:
    """The stdout of an installed command; a failure shows its stderr."""
    path = os.path.join(sysconfig.get_path("scripts"), name)
    out = subprocess.run([path, *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def module(name: str, *args: str, cwd: str) -> str:
    out = subprocess.run([sys.executable, "-m", name, *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_each_command_is_the_function_behind_its_python_line():
    scripts = {ep.name: ep.load() for ep in importlib.metadata.entry_points(group="console_scripts")
               if ep.name.startswith("jaxrl-")}
    assert scripts == COMMANDS
    with open(os.path.join(ROOT, "train.py"), encoding="utf-8") as file:
        assert "sys.exit(train_main())" in file.read()


def test_the_commands_train_a_sweep_evaluate_and_plot_from_another_folder(tmp_path):
    """From a folder without configs/: the preset is found by name, and each command prints what its
    `python -m` line prints."""
    command("jaxrl-train", "--config", "sft", *TINY, "run_dir=runs/s", "sweep.seed=[0,1]", cwd=tmp_path)
    runs = [str(tmp_path / "runs" / "s" / name) for name in ("run_00", "run_01")]
    assert all(len(open(os.path.join(run, "metrics.jsonl")).readlines()) == 2 for run in runs)

    ours = json.loads(command("jaxrl-eval", runs[0], "--json", "--samples", "1", cwd=tmp_path))
    theirs = json.loads(module("jaxrl_llm.eval", runs[0], "--json", "--samples", "1", cwd=tmp_path))
    assert ours == theirs and ours["examples"] == 8

    command("jaxrl-plot", *runs, "-o", "ours.png", cwd=tmp_path)
    module("jaxrl_llm.plot", *runs, "-o", "theirs.png", cwd=tmp_path)
    assert (tmp_path / "ours.png").read_bytes() == (tmp_path / "theirs.png").read_bytes()

    ours = command("jaxrl-sweep", "runs/s", "--metric", "loss", "--plot", "ours.png", cwd=tmp_path)
    theirs = module("jaxrl_llm.sweep", "runs/s", "--metric", "loss", "--plot", "ours.png", cwd=tmp_path)
    assert ours == theirs and "seed" in ours


def test_the_readme_install_lines_name_extras_that_exist():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        readme = file.read()
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        extras = tomllib.load(file)["project"]["optional-dependencies"]
    assert extras["cuda"] == ["jax[cuda12]>=0.6"] and extras["tpu"] == ["jax[tpu]>=0.6"]
    for line in INSTALLS:
        assert line in readme, line
        (names,) = re.findall(r"\[([a-z0-9,]+)\]", line)
        assert all(name in extras for name in names.split(",")), line
