"""Reading a sweep's results: configurations (runs equal but for the seed), paired differences with
Student-t 95% intervals across seeds, the comparison table, and a plot with a line per run and a
mean with a 95% band per configuration.

Two configurations are compared on the seeds both ran: the difference of run (A, seed s) and run
(B, seed s) removes what the seed does to both (its prompts, its sampling uniforms, its init), so
the interval is that of a paired t-test (Student 1908). With several pairs, Holm's step-down rule
(Holm 1979) says which differences survive the number of comparisons.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os

import numpy as np

from jaxrl_llm import metrics as metrics_lib
from jaxrl_llm.errors import TrainingError

SWEEP_FILE = "sweep.json"  # a sweep's runs: folder, axis values, seed, program
FINAL_METRICS = ("eval/accuracy", "eval/reward", "eval/loss", "reward/mean", "loss")  # the default, first found


def read_index(run_dir: str) -> dict:
    """RUN_DIR/sweep.json."""
    path = os.path.join(run_dir, SWEEP_FILE)
    if not os.path.isfile(path):
        raise TrainingError(f"{run_dir} holds no {SWEEP_FILE}; pass the run_dir of a sweep (a config with `sweep:`).")
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def write_index(run_dir: str, runs: list[dict]) -> None:
    """RUN_DIR/sweep.json, written whole or not at all."""
    path = os.path.join(run_dir, SWEEP_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump({"runs": runs}, file, indent=1)
    os.replace(path + ".tmp", path)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (Simpson's rule on the density)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda x: math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))
    steps = 2000
    h = abs(t) / steps
    area = density(0) + density(abs(t)) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    half = area * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p (bisection on `t_cdf`), for 0.5 <= p < 1."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def mean_interval(values) -> tuple[float, float]:
    """(mean, half-width of its Student-t 95% interval); the half-width is nan below two values."""
    x = np.asarray(values, np.float64)
    if x.size < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), t_quantile(0.975, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)


def paired(a: dict, b: dict) -> dict:
    """The paired comparison of two configurations' {seed: value}: mean difference a − b, its 95%
    interval, the two-sided p-value of the paired t-test, and the seeds used."""
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], np.float64)
    mean, half = mean_interval(d) if seeds else (math.nan, math.nan)
    p = math.nan
    if len(seeds) >= 2:
        n, sd = len(seeds), float(d.std(ddof=1))
        if sd == 0:  # every seed moved by the same amount
            p = 0.0 if mean else 1.0
        else:
            p = 2 * (1 - t_cdf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return {"mean": mean, "low": mean - half, "high": mean + half, "p": p, "seeds": len(seeds)}


def holm(p_values: list[float], alpha: float = 0.05) -> list[bool]:
    """Which hypotheses Holm's step-down rule rejects at family-wise level `alpha`."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if not p_values[i] <= alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


def configurations(index: dict) -> dict[str, list[dict]]:
    """The sweep's runs grouped by configuration (their axis values but the seed), in order."""
    groups: dict[str, list[dict]] = {}
    for run in index["runs"]:
        name = " ".join(f"{k}={v}" for k, v in run["setting"].items() if k != "seed") or "(one configuration)"
        groups.setdefault(name, []).append(run)
    return groups


def final_values(run_dir: str, index: dict, metric: str | None = None) -> tuple[str, dict[str, dict]]:
    """(metric, {configuration: {seed: the metric in the run's summary}}) of the finished runs."""
    summaries = {}
    for run in index["runs"]:
        folder = os.path.join(run_dir, run["run_dir"])
        if os.path.isfile(os.path.join(folder, "summary.json")):
            summaries[run["index"]] = metrics_lib.read_summary(folder)
    if metric is None:
        present = [m for m in FINAL_METRICS if any(m in s for s in summaries.values())]
        if not present:
            raise TrainingError(f"no run of {run_dir} has finished with a summary.json yet; nothing to compare.")
        metric = present[0]
    values = {
        name: {run["seed"]: summaries[run["index"]][metric] for run in runs
               if metric in summaries.get(run["index"], {})}
        for name, runs in configurations(index).items()
    }
    return metric, values


def report(run_dir: str, metric: str | None = None) -> str:
    """The comparison table of a sweep: each configuration's mean with its 95% interval over seeds,
    then every pair's paired difference, interval and whether it is significant."""
    index = read_index(run_dir)
    metric, values = final_values(run_dir, index, metric)
    lines = [f"sweep {run_dir}: {len(index['runs'])} runs, {len(values)} configurations; final {metric}, "
             "mean ± 95% interval over seeds"]
    width = max(len(name) for name in values)
    for name, by_seed in values.items():
        mean, half = mean_interval(list(by_seed.values())) if by_seed else (math.nan, math.nan)
        lines.append(f"  {name:<{width}}  {mean:.4f} ± {half:.4f}  ({len(by_seed)} seeds)")
    pairs = [(a, b, paired(values[a], values[b])) for a, b in itertools.combinations(values, 2)]
    pairs = [pair for pair in pairs if pair[2]["seeds"] >= 2]
    if not pairs:
        lines.append("no paired comparison: it needs two configurations run on at least two common seeds "
                     "(sweep seed too, e.g. sweep.seed=[0,1,2,3]).")
        return "\n".join(lines)
    rejected = holm([c["p"] for _, _, c in pairs])
    lines.append(f"paired differences (A − B on the seeds both ran; {len(pairs)} comparisons):")
    for (a, b, c), holm_rejects in zip(pairs, rejected):
        verdict = "significant" if c["low"] > 0 or c["high"] < 0 else "not significant"
        verdict += ", also after Holm's correction" if holm_rejects else (
            ", not after Holm's correction" if verdict == "significant" else "")
        lines.append(f"  {a} − {b}: {c['mean']:+.4f}, 95% CI [{c['low']:+.4f}, {c['high']:+.4f}], "
                     f"p = {c['p']:.3g}, {c['seeds']} seeds: {verdict}")
    significant = [f"{a} − {b}" for (a, b, c), h in zip(pairs, rejected) if h]
    lines.append("significant after Holm's correction: " + ("; ".join(significant) if significant else "none")
                 + " (a difference is significant when its paired 95% interval excludes 0).")
    return "\n".join(lines)


def plot_sweep(run_dir: str, out: str, names: list[str]) -> str:
    """A panel per metric: a thin line per run and, per configuration, the mean over seeds with its 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = read_index(run_dir)
    groups = configurations(index)
    rows_of = {run["index"]: metrics_lib.read_metrics(os.path.join(run_dir, run["run_dir"])) for run in index["runs"]
               if os.path.isfile(os.path.join(run_dir, run["run_dir"], "metrics.jsonl"))}
    names = [name for name in names if any(name in row for rows in rows_of.values() for row in rows)]
    if not names:
        raise ValueError(f"no run of {run_dir} logged any of the metrics to plot.")
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax in axes.flat[len(names):]:
        ax.remove()
    for ax, name in zip(axes.flat, names):
        for color, (config_name, runs) in zip(itertools.cycle(colors), groups.items()):
            curves = []
            for run in runs:
                rows = [r for r in rows_of.get(run["index"], []) if name in r]
                if rows:
                    ax.plot([r["step"] for r in rows], [r[name] for r in rows], color=color, alpha=0.25, lw=0.7)
                    curves.append({r["step"]: r[name] for r in rows})
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            stats = [mean_interval([c[s] for c in curves]) for s in steps]
            mean = np.array([m for m, _ in stats])
            half = np.nan_to_num(np.array([h for _, h in stats]))
            ax.plot(steps, mean, color=color, lw=1.8, label=f"{config_name} ({len(curves)})")
            ax.fill_between(steps, mean - half, mean + half, color=color, alpha=0.2)
        ax.set_title(name)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
