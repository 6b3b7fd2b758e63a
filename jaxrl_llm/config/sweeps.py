"""Sweeps: a base config and axes of values, the runs they expand to, and which runs can share one
compiled program.

A `sweep:` section maps dotted config paths to lists of values (`seed: [0, 1, 2]`, `optim.lr:
[1e-5, 3e-5]`), crossed as a grid or zipped (`mode: zip`); on the command line, `sweep.optim.lr=[1e-5,3e-5]`.
Runs whose configs differ only in the numbers of `VMAPPED` (and the host-side fields of `HOST`) train
as one vmapped program; any other difference (a loss kind, an aggregation, a model) is another
structure, and so another program.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

from jaxrl_llm.config.loading import _all_paths, _flat, config_from_dict, config_to_dict, load_values, validate
from jaxrl_llm.config.schema import Config
from jaxrl_llm.errors import ConfigError, did_you_mean

MODES = ("grid", "zip")
OPTIONS = ("mode", "parallel", "run_axis")  # keys of the sweep section that are settings, not axes
RUN_AXES = ("auto", "vmap", "map")

# Numbers the steps only compute with (no Python branch reads them), so runs that differ in them share
# one program: each run's value enters the vmapped step as an array. Switching one off (None; GRPO's
# β = 0, which has no reference model) is structure.
VMAPPED = (
    "optim.lr", "optim.critic_lr", "optim.weight_decay", "optim.b1", "optim.b2", "optim.eps", "optim.grad_clip",
    "grpo.eps_low", "grpo.eps_high", "grpo.dual_clip", "grpo.gspo_eps_low", "grpo.gspo_eps_high",
    "grpo.sapo_tau_pos", "grpo.sapo_tau_neg", "grpo.cispo_eps_max", "grpo.std_eps", "grpo.kl_coef",
    "ppo.eps", "ppo.value_clip", "ppo.vf_coef", "ppo.gamma", "ppo.lam", "ppo.kl_coef", "ppo.entropy_coef",
    "ppo.missing_stop_penalty", "ppo.reward_clip", "dpo.beta", "dpo.label_smoothing", "rm.margin",
    "rm.center_coef", "rollout_correction.is_cap", "rollout_correction.mask_low", "rollout_correction.mask_high",
)
# Fields each run reads on the host only (its data, keys and folder; its reward weights).
HOST = ("seed", "run_dir", "grpo.reward_weights")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A base config and its axes ((dotted path, values), ...), crossed (`grid`) or zipped (`zip`);
    `parallel` caps the runs one program holds (0: as many as are estimated to fit); `run_axis` is
    how a program goes over its runs: vmap (batched together), map (`lax.map`, one after another
    inside the program), or auto (map on CPU, vmap on accelerators)."""

    base: Config
    axes: tuple[tuple[str, tuple], ...]
    mode: str = "grid"
    parallel: int = 0
    run_axis: str = "auto"

    def settings(self) -> list[dict]:
        """Each run's {path: value}, in order (grid: the last axis fastest)."""
        names = [name for name, _ in self.axes]
        columns = [values for _, values in self.axes]
        rows = zip(*columns) if self.mode == "zip" else itertools.product(*columns)
        return [dict(zip(names, row)) for row in rows]

    def runs(self) -> list[Config]:
        """The config of each run, in its own folder RUN_DIR/run_NN, each checked like a single run's."""
        base = config_to_dict(self.base)
        configs = []
        for index, setting in enumerate(self.settings()):
            values = base
            for path, value in setting.items():
                values = _set(values, path.split("."), value)
            values = _set(values, ["run_dir"], os.path.join(self.base.run_dir, run_name(index)))
            try:
                configs.append(validate(config_from_dict(values)))
            except ConfigError as error:
                raise ConfigError(f"sweep run {index} ({label(setting)}): {error}") from None
        return configs


def label(setting: dict) -> str:
    """A run's axis values as `path=value` pairs, e.g. `seed=1 optim.lr=3e-05`."""
    return " ".join(f"{path}={value}" for path, value in setting.items())


def run_name(index: int) -> str:
    """The folder of a sweep's run `index` under the sweep's run_dir."""
    return f"run_{index:02d}"


def _set(values: dict, parts: list[str], value) -> dict:
    """A copy of nested `values` with the leaf at `parts` set."""
    head, *rest = parts
    return {**values, head: _set(values.get(head) or {}, rest, value) if rest else value}


def load_sweep(path: str | None = None, overrides=()) -> Sweep | None:
    """The sweep a preset and overrides declare (`sweep:` / `sweep.key=[...]`), or None without one."""
    values = load_values(path, overrides)
    section = values.pop("sweep", None)
    if section is None:
        return None
    base = validate(config_from_dict(values))
    if not isinstance(section, dict):
        raise ConfigError(f"sweep must map config keys to lists of values (e.g. seed: [0, 1, 2]), got {section!r}.")
    options = {key: section.pop(key) for key in OPTIONS if key in section}
    mode, parallel, run_axis = options.get("mode", "grid"), options.get("parallel", 0), options.get("run_axis", "auto")
    if run_axis not in RUN_AXES:
        raise ConfigError(f"sweep.run_axis must be one of {', '.join(RUN_AXES)}, got {run_axis!r}"
                          f"{did_you_mean(str(run_axis), RUN_AXES)}")
    if mode not in MODES:
        raise ConfigError(f"sweep.mode must be one of {', '.join(MODES)}, got {mode!r}{did_you_mean(str(mode), MODES)}")
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 0:
        raise ConfigError(f"sweep.parallel must be an int >= 0 (0: as many runs as fit), got {parallel!r}.")
    axes = tuple((name, _axis_values(name, value)) for name, value in _flat(section).items())
    if not axes:
        raise ConfigError("sweep has no axes; give at least one, e.g. sweep.seed=[0,1,2,3].")
    if mode == "zip" and len({len(values) for _, values in axes}) > 1:
        sizes = ", ".join(f"{name}: {len(values)}" for name, values in axes)
        raise ConfigError(f"sweep.mode=zip pairs the axes value by value, so they need one length; got {sizes}.")
    sweep = Sweep(base, axes, mode, parallel, run_axis)
    sweep.runs()  # every run's config checked now, before anything loads
    return sweep


def _axis_values(name: str, values) -> tuple:
    """An axis's values, checked to be a non-empty list for a real config field."""
    paths = _all_paths(Config)
    if name not in paths or name == "run_dir":
        raise ConfigError(f"sweep.{name}: not a config field a sweep can vary{did_you_mean(name, paths)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"sweep.{name} must be a non-empty list of values, e.g. [1e-5, 3e-5]; got {values!r}.")
    return tuple(values)


def structure(config: Config) -> tuple:
    """What decides a run's compiled program: every field but the vmapped numbers' values (whether
    each is switched off stays) and the host-side fields. Runs with equal structures share a program."""
    flat = _flat(config_to_dict(config))
    key = []
    for path, value in sorted(flat.items()):
        if path in HOST:
            continue
        if path in VMAPPED:
            value = _switched_off(path, value)
        key.append((path, _hashable(value)))
    return tuple(key)


def _switched_off(path: str, value) -> bool:
    """Whether a vmapped number turns its term off: None, a clip norm <= 0, or GRPO's β = 0, which
    drops the reference model from the state."""
    return value is None or (path == "optim.grad_clip" and value <= 0) or (path == "grpo.kl_coef" and value == 0)


def _hashable(value):
    return tuple(map(_hashable, value)) if isinstance(value, list) else value


def varying(configs: list[Config]) -> list[str]:
    """The vmapped numbers whose values differ between `configs` (one structure)."""
    flats = [_flat(config_to_dict(c)) for c in configs]
    return [path for path in VMAPPED if len({flat[path] for flat in flats}) > 1]
