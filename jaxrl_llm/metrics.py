"""Run metrics: one JSON object per step in RUN_DIR/metrics.jsonl, the same rows sent to optional
trackers (TensorBoard, Weights & Biases, trackio), and PNG plots of the main curves (several runs on
one figure to compare variants)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import warnings
from typing import Iterable

import numpy as np

from jaxrl_llm.errors import ConfigError, DataError

MAIN_CURVES = (
    "reward/mean", "eval/accuracy", "eval/reward", "loss", "kl", "entropy", "response_length/mean", "clipfrac/high",
)


def _to_float(value) -> float:
    return float(np.asarray(value))


TRACKERS = ("jsonl", "tensorboard", "wandb", "trackio")
# The package each tracker imports, and the extra that installs it.
TRACKER_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb"),
                    "trackio": ("trackio", "trackio")}


def tracker_missing(tracker: str) -> str | None:
    """Why `tracker` cannot log here (its package is not installed, and the pip line that fixes it), or None."""
    if tracker not in TRACKER_PACKAGES:
        return None
    module, extra = TRACKER_PACKAGES[tracker]
    if importlib.util.find_spec(module) is not None:
        return None
    return f"logging.trackers lists {tracker}, which needs the {module} package: pip install 'jaxrl_llm[{extra}]'"


class MetricsWriter:
    """Appends `{"step": s, **metrics}` lines to metrics.jsonl and sends the same rows to the other
    `trackers` (tensorboard, wandb, trackio), with the run's `config` and at the end its plot.

    A run resumed at `start_step` keeps the rows of the steps before it: rows of later steps (those
    the run will redo) and a line torn by a crash are dropped by writing the kept rows to a new file
    that replaces the old one atomically, so a kill at any moment leaves every row of the steps its
    checkpoint holds. Rows are never rewritten in place. A resumed run continues its W&B and trackio
    runs (the W&B run's id is kept in RUN_DIR/trackers.json).
    """

    def __init__(self, run_dir: str, start_step: int = 0, trackers=("jsonl",), project: str = "jaxrl_llm",
                 name: str | None = None, config: dict | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        rows, torn = _read_rows(self.path) if os.path.exists(self.path) else ([], False)
        kept = [row for row in rows if row["step"] < start_step]
        if torn or len(kept) < len(rows):
            _replace(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        missing = list(filter(None, map(tracker_missing, trackers)))
        if missing:
            raise ConfigError(missing[0])
        name = name or os.path.basename(os.path.normpath(run_dir))
        opened = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio}
        self._trackers = [opened[t](run_dir, project, name, config or {}, start_step) for t in trackers if t in opened]
        self._file = open(self.path, "a", encoding="utf-8")
        self._last_step = start_step - 1

    def write(self, step: int, metrics: dict) -> dict:
        """Record one step's scalars (one write of one whole line); returns them as plain floats."""
        row = {name: _to_float(value) for name, value in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **row}) + "\n")
        self._file.flush()
        self._send(lambda tracker: tracker.log(int(step), row), f"step {int(step)}")
        self._last_step = int(step)
        return row

    def add_plot(self, path: str) -> None:
        """Send the run's plot (a PNG) to the trackers, at the last step logged."""
        self._send(lambda tracker: tracker.image("plot", path, max(self._last_step, 0)), "the plot")

    def _send(self, send, what: str) -> None:
        """`send` to every tracker; one that fails is warned of and dropped, and the run goes on
        (metrics.jsonl, written first, holds every row)."""
        for tracker in list(self._trackers):
            try:
                send(tracker)
            except Exception as error:  # a tracker's service or disk, not the run, failed
                self._trackers.remove(tracker)
                warnings.warn(f"logging: {type(tracker).__name__.strip('_')} failed on {what} ({error!r}); the run "
                              "goes on without it, and metrics.jsonl keeps every row.", RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        """Close the file and finish every tracker's run; closing twice does nothing."""
        if self._file.closed:
            return
        self._file.close()
        for tracker in self._trackers:
            tracker.close()


class _TensorBoard:
    """RUN_DIR/tensorboard event files (tensorboardX), the config as text."""

    def __init__(self, run_dir: str, project: str, name: str, config: dict, start_step: int):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", start_step)

    def log(self, step: int, row: dict) -> None:
        for name, value in row.items():
            self.writer.add_scalar(name, value, step)

    def image(self, tag: str, path: str, step: int) -> None:
        import matplotlib.image

        self.writer.add_image(tag, matplotlib.image.imread(path)[..., :3], step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A Weights & Biases run writing under RUN_DIR/wandb; WANDB_MODE=offline keeps it local for `wandb sync`."""

    def __init__(self, run_dir: str, project: str, name: str, config: dict, start_step: int):
        import wandb

        ids_path = os.path.join(run_dir, "trackers.json")
        ids = {}
        if os.path.exists(ids_path):
            with open(ids_path, encoding="utf-8") as file:
                ids = json.load(file)
        if start_step == 0 or "wandb" not in ids:  # a new run; a resumed one continues its own
            ids["wandb"] = secrets.token_hex(4)  # W&B run ids are short lowercase alphanumerics
            _replace(ids_path, json.dumps(ids))
        self.wandb = wandb
        # create_new: a sweep holds one W&B run per run of it in this process.
        try:
            self.run = wandb.init(project=project, name=name, dir=run_dir, config=config, id=ids["wandb"],
                                  resume="allow", reinit="create_new")
        except wandb.errors.UsageError as error:  # no login, in a process that cannot ask for one
            raise ConfigError(
                f"logging.trackers lists wandb, which could not start a run: {error} Log in (`wandb login`, or "
                "WANDB_API_KEY), or set WANDB_MODE=offline to keep the run under RUN_DIR/wandb for `wandb sync`."
            ) from error

    def log(self, step: int, row: dict) -> None:
        self.run.log(row, step=step)

    def image(self, tag: str, path: str, step: int) -> None:
        self.run.log({tag: self.wandb.Image(path)}, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """A trackio run in its local database (TRACKIO_DIR, by default under ~/.cache/huggingface); `trackio
    show` opens its dashboard. trackio holds one run per process at a time, so sweeps cannot use it."""

    def __init__(self, run_dir: str, project: str, name: str, config: dict, start_step: int):
        import trackio

        self.trackio = trackio
        # No background CPU/GPU logging threads; a resumed run appends to its own (same name).
        self.run = trackio.init(project=project, name=name, config=config, resume="allow" if start_step else "never",
                                embed=False, auto_log_cpu=False, auto_log_gpu=False)

    def log(self, step: int, row: dict) -> None:
        self.run.log(row, step=step)

    def image(self, tag: str, path: str, step: int) -> None:
        self.run.log({tag: self.trackio.Image(path)}, step=step)

    def close(self) -> None:
        self.run.finish()


def _replace(path: str, text: str) -> None:
    """Write `text` to a new file beside `path` and rename it over `path`: readers (and a crash)
    see the old file or the new one, never a mix."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


def _read_rows(path: str) -> tuple[list[dict], bool]:
    """(rows, whether the last line was torn) of a metrics.jsonl; a bad line before the last names
    the file and line."""
    with open(path, encoding="utf-8", errors="replace") as file:
        lines = file.read().split("\n")
    rows, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the last line, cut by a crash mid-write
                torn = True
                continue
            raise DataError(f"{path} line {number} is not a JSON object; fix or delete that line.") from None
        if not isinstance(row, dict) or "step" not in row:
            raise DataError(f"{path} line {number} is not a metrics row (a JSON object with a step); fix or delete it.")
        rows.append(row)
    return rows, torn


def read_metrics(run_dir: str) -> list[dict]:
    """All rows of RUN_DIR/metrics.jsonl, in order (a last line torn by a crash is skipped)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise DataError(f"{path} not found: is {run_dir!r} a run folder?")
    return _read_rows(path)[0]


def write_summary(run_dir: str, summary: dict) -> None:
    """RUN_DIR/summary.json, replaced atomically."""
    _replace(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2))


def read_summary(run_dir: str) -> dict:
    """RUN_DIR/summary.json, or {} when the run has none yet."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            summary = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; delete it (a finished run writes it again).") from None
    if not isinstance(summary, dict):
        raise DataError(f"{path} does not hold a JSON object; delete it (a finished run writes it again).")
    return summary


def _labels(run_dirs: list[str]) -> list[str]:
    """Each run's folder name, or its path below the runs' common folder when names repeat."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath([os.path.abspath(d) for d in run_dirs])
    return [os.path.relpath(os.path.abspath(d), common) for d in run_dirs]


def _with_start(run_dir: str, rows: list[dict]) -> list[dict]:
    """The rows, plus the evaluation before training (summary.json's `before/*`) as a point at step 0."""
    before = {k[len("before/"):]: v for k, v in read_summary(run_dir).items() if k.startswith("before/")}
    return [{"step": 0, **before}, *rows] if before else rows


def plot_runs(
    run_dirs: Iterable[str], out_path: str, names: Iterable[str] = MAIN_CURVES, title: str | None = None
) -> str:
    """Draw each named metric that any run logged, one panel per metric, one line per run (labelled
    by folder name); evaluations start from the run's before-training evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs, names = list(run_dirs), list(names)
    runs = {label: _with_start(d, read_metrics(d)) for label, d in zip(_labels(run_dirs), run_dirs)}
    present = [n for n in names if any(n in row for rows in runs.values() for row in rows)]
    if not present:
        raise DataError(f"none of the metrics {names} were logged in {list(runs)}")
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, present):
        for i, (label, metrics) in enumerate(runs.items()):
            points = [(r["step"], r[name]) for r in metrics if name in r]
            if points:  # one colour per run in every panel, also where another run lacks the metric
                ax.plot(*zip(*points), label=label, color=f"C{i % 10}", marker="o" if len(points) < 30 else None,
                        markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
    for ax in axes.flat[len(present):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
