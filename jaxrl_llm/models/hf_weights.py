"""Our param tree <-> HF tensor names, layouts and shapes; reading a checkpoint one tensor at a time.

Shape letters: D embed, H query heads, K key/value heads, E head dim, F mlp, V vocab, L layers.

HF stores one [out, in] matrix per layer and module (`model.layers.{i}.self_attn.q_proj.weight`
is [H*E, D]); we stack layers on a leading L axis and split heads (`layers/attn/q_proj/kernel` is
[L, D, H, E]). `TensorSpec` records each correspondence once; loading and export both read it.

A scalar (value / reward) model maps to transformers' `*ForSequenceClassification` with one label:
the backbone under `model.`, our head kernel [D, 1] as `score.weight` [1, D], and its bias as
`score.bias`. transformers has no score bias, so it ignores that tensor (its scores are ours
minus the bias); we read it back when present and use zero when not.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxrl_llm.errors import ModelLoadError
from jaxrl_llm.models.transformer import ModelConfig


class TensorSpec(NamedTuple):
    """One HF tensor and its place in our tree: ours = hf.reshape(split).transpose(perm)."""

    hf_name: str  # "{i}" marks a per-layer tensor, stacked on a leading L axis in our tree
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    split: tuple[int, ...]
    perm: tuple[int, ...]
    optional: bool = False  # a missing optional tensor loads as zeros

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.split[axis] for axis in self.perm)

    def to_ours(self, hf_array: np.ndarray) -> np.ndarray:
        return np.transpose(hf_array.reshape(self.split), self.perm)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return np.transpose(ours, np.argsort(self.perm)).reshape(self.hf_shape)


def _vector(hf_name: str, path: tuple[str, ...], size: int) -> TensorSpec:
    return TensorSpec(hf_name, path, (size,), (size,), (0,))


def _dense(hf_name: str, path: tuple[str, ...], out: int, inp: int) -> TensorSpec:
    """torch Linear weight [out, in] <-> Flax Dense kernel [in, out]."""
    return TensorSpec(hf_name, path, (out, inp), (out, inp), (1, 0))


def _backbone_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every decoder tensor except the LM head."""
    D, E, F, V = config.hidden_size, config.head_dim, config.intermediate_size, config.vocab_size
    H, K = config.num_heads, config.num_kv_heads
    layer, attn, mlp = "model.layers.{i}.", ("layers", "attn"), ("layers", "mlp")
    qkv = (("q", H), ("k", K), ("v", K))
    specs = [
        TensorSpec("model.embed_tokens.weight", ("embed", "embedding"), (V, D), (V, D), (0, 1)),
        _vector("model.norm.weight", ("final_norm", "scale"), D),
        _vector(layer + "input_layernorm.weight", ("layers", "input_norm", "scale"), D),
        _vector(
            layer + "post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"), D
        ),
        *(
            TensorSpec(layer + f"self_attn.{n}_proj.weight", (*attn, f"{n}_proj", "kernel"),
                       (heads * E, D), (heads, E, D), (2, 0, 1))
            for n, heads in qkv
        ),
        TensorSpec(layer + "self_attn.o_proj.weight", (*attn, "o_proj", "kernel"),
                   (D, H * E), (D, H, E), (1, 2, 0)),
        _dense(layer + "mlp.gate_proj.weight", (*mlp, "gate_proj", "kernel"), F, D),
        _dense(layer + "mlp.up_proj.weight", (*mlp, "up_proj", "kernel"), F, D),
        _dense(layer + "mlp.down_proj.weight", (*mlp, "down_proj", "kernel"), D, F),
    ]
    if config.attention_bias:
        specs += [
            TensorSpec(layer + f"self_attn.{n}_proj.bias", (*attn, f"{n}_proj", "bias"),
                       (heads * E,), (heads, E), (0, 1))
            for n, heads in qkv
        ]
    if config.qk_norm:
        specs += [
            _vector(layer + f"self_attn.{n}_norm.weight", (*attn, f"{n}_norm", "scale"), E)
            for n in "qk"
        ]
    return specs


def tensor_specs(config: ModelConfig, scalar: bool = False) -> list[TensorSpec]:
    """HF <-> ours for a causal LM, or (`scalar`) for a ScalarModel {"model", "head"} tree."""
    backbone = _backbone_specs(config)
    if scalar:
        return [spec._replace(path=("model", *spec.path)) for spec in backbone] + [
            _dense("score.weight", ("head", "kernel"), 1, config.hidden_size),
            _vector("score.bias", ("head", "bias"), 1)._replace(optional=True),
        ]
    if config.tie_word_embeddings:
        return backbone
    return backbone + [
        _dense("lm_head.weight", ("lm_head", "kernel"), config.vocab_size, config.hidden_size)
    ]


TensorReader = Callable[[str], "tuple[str, Callable[[], np.ndarray]] | None"]


class Checkpoint(NamedTuple):
    """What a source holds: an HF-style config dict, tensors by HF name, and a tokenizer."""

    path: Path
    config_file: Path  # named in config errors
    hf_config: dict
    find: TensorReader  # HF tensor name -> (file, loader of the [out, in] array), or None
    tokenizer: Any


def params_from_checkpoint(
    ckpt: Checkpoint, specs: list[TensorSpec], config: ModelConfig, place: Callable | None = None
) -> dict:
    """Our param tree, read one HF tensor at a time into `config.param_dtype`; `place(path, array)`
    puts each on its device(s) (default: the default device)."""
    place = place or (lambda path, value: jnp.asarray(value))
    dtype = jnp.dtype(config.param_dtype)
    params: dict = {}
    for spec in specs:
        if spec.stacked:
            value = np.empty((config.num_layers, *spec.shape), dtype)
            for i in range(config.num_layers):
                value[i] = _read_tensor(ckpt, spec, spec.hf_name.format(i=i))
        else:
            value = _read_tensor(ckpt, spec, spec.hf_name).astype(dtype)
        _set_path(params, spec.path, place(spec.path, value))
    return params


def _read_tensor(ckpt: Checkpoint, spec: TensorSpec, name: str) -> np.ndarray:
    """One HF tensor in our layout, checked for its shape and for non-finite values."""
    found = ckpt.find(name)
    if found is None:
        if spec.optional:
            return np.zeros(spec.shape, np.float32)
        raise ModelLoadError(
            f"{ckpt.path}: tensor {name!r} is missing; the config needs it for "
            f"{'/'.join(spec.path)}."
        )
    file, load = found
    hf_array = load()
    if tuple(hf_array.shape) != spec.hf_shape:
        raise ModelLoadError(
            f"{file}: tensor {name!r} has shape {tuple(hf_array.shape)}, but "
            f"{ckpt.config_file.name} implies {spec.hf_shape}."
        )
    bad = np.size(hf_array) - np.count_nonzero(np.isfinite(hf_array))
    if bad:
        raise ModelLoadError(
            f"{file}: tensor {name!r} holds {bad} non-finite values (nan or inf) of {np.size(hf_array)}; the "
            "checkpoint is damaged or was saved from a diverged run. Load an earlier one."
        )
    return spec.to_ours(hf_array)


def hf_tensors(params: dict, config: ModelConfig, scalar: bool = False) -> dict[str, np.ndarray]:
    """Our params as HF-named host arrays (one per layer), in their own dtype."""
    tensors = {}
    for spec in tensor_specs(config, scalar):
        ours = np.asarray(_get_path(params, spec.path))
        if spec.stacked:
            tensors.update({spec.hf_name.format(i=i): np.ascontiguousarray(spec.to_hf(ours[i]))
                            for i in range(config.num_layers)})
        else:
            tensors[spec.hf_name] = np.ascontiguousarray(spec.to_hf(ours))
    return tensors


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get_path(tree: dict, path: tuple[str, ...]) -> Any:
    try:
        return functools.reduce(lambda node, name: node[name], path, tree)
    except (KeyError, TypeError):
        raise ValueError(f"params have no {'/'.join(path)}, which the config needs.") from None
