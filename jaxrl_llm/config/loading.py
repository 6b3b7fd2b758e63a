"""Reading and writing configs: YAML presets with `base:` inheritance, dotted `key.sub=value`
overrides, type coercion with errors that name the field, and the YAML round trip.

`load_config` reads a preset, applies overrides and runs the checks that need no model and no
algorithm (`validate`); the run layer adds the algorithm's own rules (`run.registry.check`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
import warnings
from typing import Literal

import yaml

from jaxrl_llm.config.checks import check_common
from jaxrl_llm.config.schema import Config
from jaxrl_llm.errors import ConfigError, did_you_mean

# Keys that moved, and where to: an old preset or run folder still loads, with a warning.
MOVED = {"sampling.prompt_bucket": "data.bucket", "sampling.prompt_bucket_size": "data.bucket_size"}

# YAML 1.1 reads 1e-6 (no dot) as a string; read it as a float, as YAML 1.2 does.
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads exponent floats without a dot (1e-6) as floats."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings `_Loader` would read as floats."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))

_SCALAR_NAMES = {
    int: ("an int", "ints"), float: ("a float", "floats"), bool: ("a bool", "bools"), str: ("a string", "strings")
}


def _describe(tp, plural=False) -> str:
    """What a type hint accepts, in words: 'an int', 'a list of floats or null', ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return ("values from " if plural else "one of ") + ", ".join(map(str, args))
    if origin is tuple:
        return "a list of " + _describe(args[0], plural=True)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args if arg is not type(None)) + " or null"
    if dataclasses.is_dataclass(tp):
        return "a mapping of its fields"
    return _SCALAR_NAMES[tp][plural]


def _all_paths(cls, prefix="") -> list[str]:
    """Every dotted field path of a section class."""
    paths = []
    for name, tp in typing.get_type_hints(cls).items():
        paths.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            paths += _all_paths(tp, f"{prefix}{name}.")
    return paths


def _unknown_key(path: str, names: list[str], prefix: str) -> ConfigError:
    """The error for an unknown key, with the closest sibling or a same-named key elsewhere."""
    leaf = path[len(prefix):]
    close = difflib.get_close_matches(leaf, names, n=1)
    elsewhere = [p for p in _all_paths(Config) if p.rsplit(".", 1)[-1] == leaf]
    if close:
        hint = f"did you mean {prefix + close[0]!r}?"
    elif elsewhere:
        hint = f"did you mean {elsewhere[0]!r}?"
    else:
        hint = f"valid keys{' of ' + prefix[:-1] if prefix else ''}: {', '.join(names)}."
    return ConfigError(f"unknown key {path!r}, {hint}")


def _coerce(tp, value, path: str, expected=None):
    """`value` checked against type hint `tp`: sections built, lists made tuples, ints widened to floats."""
    expected = expected or tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, str) and hasattr(tp, "SHORTHAND"):
        value = {tp.SHORTHAND: value}  # env: module:Class
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _build(tp, value, path + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(inner, value, path, expected)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ConfigError(f"{path} must be {_describe(tp)}, got {value!r}{did_you_mean(str(value), args)}")
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_coerce(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in _SCALAR_NAMES and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path} must be {_describe(expected)}, got {value!r}.")


def _build(cls, values: dict, prefix: str):
    """A section instance from a mapping; missing keys take their defaults."""
    names = [field.name for field in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise _unknown_key(f"{prefix}{key}", names, prefix)
    hints = typing.get_type_hints(cls)
    return cls(**{key: _coerce(hints[key], value, prefix + key) for key, value in values.items()})


def config_from_dict(values: dict) -> Config:
    """A Config from nested dicts, rejecting unknown keys, wrong types and bad enum values."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {values!r}.")
    return _build(Config, values, "")


def config_to_dict(config) -> dict:
    """Nested dicts and lists (YAML-ready) of a Config or one of its sections."""
    if dataclasses.is_dataclass(config):
        return {field.name: config_to_dict(getattr(config, field.name)) for field in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [config_to_dict(item) for item in config]
    return config




def _flat(values: dict, prefix: str = "") -> dict:
    """{"a.b": value} of nested sections."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat



def changed_fields(saved: Config, config: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """`field: saved -> now` for every leaf that differs, except paths starting with one of `ignore`."""
    old, new = _flat(config_to_dict(saved)), _flat(config_to_dict(config))
    return [
        f"{name}: {old.get(name)!r} -> {new.get(name)!r}" for name in sorted(old.keys() | new.keys())
        if old.get(name) != new.get(name) and not name.startswith(ignore)
    ]


def save_config(config: Config, path: str) -> None:
    """Write a config as YAML that `load_config` reads back equal."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        yaml.dump(config_to_dict(config), file, Dumper=_Dumper, sort_keys=False)


def _merge(base: dict, child: dict) -> dict:
    """`child` laid over `base`, section by section; lists and scalars are replaced."""
    merged = dict(base)
    for key, value in child.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged


def _read_preset(path: str, seen: tuple[str, ...] = ()) -> dict:
    """A preset's mapping with its `base:` chain (paths relative to the preset) merged under it."""
    if os.path.abspath(path) in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself.")
    try:
        with open(path, encoding="utf-8") as file:
            values = yaml.load(file, _Loader)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path!r} not found; presets live in configs/ (e.g. configs/grpo.yaml)."
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path!r} is a folder; pass a YAML preset such as configs/grpo.yaml.") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {error.start}); pass a YAML preset.") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(values).__name__}.")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be the path of another preset, got {base!r}.")
    base_path = os.path.join(os.path.dirname(path), base)
    return _merge(_read_preset(base_path, seen + (os.path.abspath(path),)), values)


def _apply_override(values: dict, override: str) -> dict:
    """`values` with one `key.sub=value` override set; the value is parsed as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like key.sub=value (e.g. optim.lr=1e-6).")
    try:
        value = yaml.load(text, _Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {error}") from None
    parts = key.strip().split(".")
    if parts[0] == "sweep" and len(parts) > 2:  # sweep.optim.lr=[...]: one axis, named by its whole path
        parts = ["sweep", ".".join(parts[1:])]
    if _is_text_field(parts) and value is not None and not isinstance(value, str):
        value = text.strip()  # run_dir=2024 means the text, not the number
    return _merge(values, _nest(parts, value))


def _is_text_field(parts: list[str]) -> bool:
    """Whether a dotted path names a str (or str-or-null) field of Config."""
    cls = Config
    for part in parts:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return False
        cls = hints[part]
    return cls in (str, str | None)


def _nest(parts: list[str], value) -> dict:
    """{'a': {'b': value}} from ['a', 'b']."""
    for part in reversed(parts):
        value = {part: value}
    return value


def validate(config: Config, max_positions: int | None = None) -> Config:
    """The config type-checked (it may have been built in Python) and checked by every rule that needs
    no algorithm (`checks.check_common`); raises ConfigError."""
    config = config_from_dict(config_to_dict(config))
    check_common(config, max_positions)
    return config


def _move_renamed(values: dict) -> dict:
    """`values` with each MOVED key under its new name (unless that one is set too), and a warning."""
    for old, new in MOVED.items():
        (section, key), (new_section, new_key) = old.split("."), new.split(".")
        if not isinstance(values.get(section), dict) or key not in values[section]:
            continue
        value = values[section][key]
        values = {**values, section: {k: v for k, v in values[section].items() if k != key}}
        values = _merge({new_section: {new_key: value}}, values)
        warnings.warn(f"config key {old} is now {new} (it pads every algorithm's batches); read as {new}.",
                      stacklevel=3)
    return values


def _tensorboard_to_trackers(values: dict) -> dict:
    """`values` with an old `train.tensorboard` as `logging.trackers` (true adds tensorboard, with a warning)."""
    train = values.get("train")
    if not isinstance(train, dict) or "tensorboard" not in train:
        return values
    values = {**values, "train": {k: v for k, v in train.items() if k != "tensorboard"}}
    if train["tensorboard"] is True:
        trackers = list((values.get("logging") or {}).get("trackers", ["jsonl"]))
        trackers += [] if "tensorboard" in trackers else ["tensorboard"]
        values = _merge(values, {"logging": {"trackers": trackers}})
        warnings.warn(f"config key train.tensorboard is now logging.trackers; read as logging.trackers: {trackers}.",
                      stacklevel=3)
    return values


def load_values(path: str | None = None, overrides=()) -> dict:
    """The nested mapping of a YAML preset (or {}) with `key.sub=value` overrides laid over it."""
    values = _read_preset(path) if path else {}
    for override in overrides:
        values = _apply_override(values, override)
    return _tensorboard_to_trackers(_move_renamed(values))


def load_config(path: str | None = None, overrides=(), max_positions: int | None = None) -> Config:
    """A validated Config from a YAML preset (or the defaults) and `key.sub=value` overrides."""
    values = load_values(path, overrides)
    if "sweep" in values:
        raise ConfigError("this config declares a sweep (several runs); load it with config.load_sweep.")
    return validate(config_from_dict(values), max_positions)

