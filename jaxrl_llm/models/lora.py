"""LoRA as pure functions over param pytrees: init, split, combine, merge, unmerge, count, quantise.

A LoRA model's params are the base tree with `lora_a` [.., in, r] and `lora_b` [.., r, out] leaves
beside each targeted projection's kernel (`transformer.Projection` applies them unmerged). A run
trains only the adapters (plus a scalar model's head): `split` takes them out of the tree and
`combine` puts them back, so the frozen base is passed into the step as it is, never
differentiated, never given optimizer state, and — with the adapters left out — it is the
reference model itself.

Initialisation follows the LoRA paper (Hu et al. 2021, arXiv 2106.09685, §4.1: A random, B = 0,
scale α/r) with PEFT's choices (A ~ kaiming_uniform(a=√5) = U(±1/√fan_in); rsLoRA's α/√r).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.models import quantize
from jaxrl_llm.models.transformer import (
    PROJECTIONS,
    QUANTIZED_NAMES,
    ModelConfig,
    contracted_axes,
    init_params,
)

ADAPTER_NAMES = ("lora_a", "lora_b")
Tree = dict[str, Any]


def is_adapter(path: tuple[str, ...]) -> bool:
    """Whether a param path ends in a LoRA leaf."""
    return bool(path) and path[-1] in ADAPTER_NAMES


def partition(tree: Tree, trained: Callable[[tuple[str, ...]], bool], path: tuple[str, ...] = ()) -> tuple[Tree, Tree]:
    """(frozen, trained) subtrees of a nested dict by each leaf's path; empty dicts are dropped."""
    frozen, kept = {}, {}
    for name, value in tree.items():
        here = (*path, name)
        if isinstance(value, dict):
            f, k = partition(value, trained, here)
            if f:
                frozen[name] = f
            if k:
                kept[name] = k
        elif trained(here):
            kept[name] = value
        else:
            frozen[name] = value
    return frozen, kept


def split(params: Tree) -> tuple[Tree, Tree]:
    """(base, adapters) of a LoRA param tree."""
    return partition(params, is_adapter)


def combine(base: Tree, trained: Tree) -> Tree:
    """The union of two disjoint nested dicts: a model's params from its frozen and trained parts."""
    out = dict(base)
    for name, value in trained.items():
        out[name] = combine(base[name], value) if isinstance(value, dict) and name in base else value
    return out


def is_quantized(tree: Any) -> bool:
    """Whether any kernel of a param tree is stored quantised."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return any(getattr(path[-1], "key", None) in QUANTIZED_NAMES for path, _ in paths)


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree (trainable parameters, when given the trained tree)."""
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(tree))


@functools.partial(jax.jit, static_argnames=("config", "scalar_head"))
def init_adapters(config: ModelConfig, key: jax.Array, scalar_head: bool = False) -> Tree:
    """Fresh adapters for `config.lora` (A uniform, B zero); the base's initialisers are pruned by XLA."""
    if config.lora is None:
        raise ValueError("init_adapters needs a ModelConfig with lora set.")
    return split(init_params(config, key, scalar_head))[1]


def _delta(node: Tree, scale: float, stacked: bool) -> jax.Array:
    """s·A·B in the kernel's shape (per layer when the layers are stacked)."""
    def product(a, b):
        return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1) * scale

    return jax.vmap(product)(node["lora_a"], node["lora_b"]) if stacked else product(node["lora_a"], node["lora_b"])


def projection_nodes(tree: Tree, visit: Callable[[str, Tree, bool], Tree], stacked: bool = False) -> Tree:
    """`tree` with each projection's param dict replaced by visit(name, node, stacked)."""
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict) and name in PROJECTIONS:
            out[name] = visit(name, value, stacked)
        elif isinstance(value, dict):
            out[name] = projection_nodes(value, visit, stacked or name == "layers")
        else:
            out[name] = value
    return out


def without(node: Tree, names: tuple[str, ...]) -> Tree:
    return {name: value for name, value in node.items() if name not in names}


def block_axis(name: str, stacked: bool) -> int:
    """The axis a projection's kernel is quantised along: its last contracted one."""
    return contracted_axes(name) - 1 + int(stacked)


def merge(params: Tree, config: ModelConfig) -> Tree:
    """Plain params equal to a LoRA model's: W + s·A·B in each adapted kernel, adapters removed
    (a quantised kernel is dequantised first, so the result is in full precision)."""
    scale = config.lora.scale if config.lora else 1.0

    def visit(name, node, stacked):
        if "lora_a" not in node:
            return node
        kernel = quantize.kernel_of(node, block_axis(name, stacked))
        merged = (kernel + _delta(node, scale, stacked)).astype(jnp.dtype(config.param_dtype))
        return {**without(node, ("kernel", *QUANTIZED_NAMES, *ADAPTER_NAMES)), "kernel": merged}

    return projection_nodes(params, visit)


def unmerge(merged: Tree, adapters: Tree, config: ModelConfig) -> Tree:
    """The base back from `merge`'s output and the adapters merged into it: W = W' − s·A·B."""
    scale = config.lora.scale

    def visit(name, node, stacked):
        if "lora_a" not in node:
            return node
        kernel = node["kernel"].astype(jnp.float32) - _delta(node, scale, stacked)
        return {**without(node, ADAPTER_NAMES), "kernel": kernel.astype(node["kernel"].dtype)}

    base, _ = split(projection_nodes(combine(merged, adapters), visit))
    return base


@functools.partial(jax.jit, static_argnums=1)
def merge_jit(params: Tree, config: ModelConfig) -> Tree:
    """`merge`, compiled."""
    return merge(params, config)


def quantize_base(params: Tree, kind: str | None) -> Tree:
    """The params with every projection kernel quantised to `kind` ("int8" or "nf4"; None: as they are).
    Embeddings, norms, biases and the LM head stay in full precision, as in QLoRA."""
    if kind is None:
        return params
    quantize_jit = jax.jit(quantize.quantize_kernel, static_argnums=(1, 2))

    def visit(name, node, stacked):
        if "kernel" not in node:
            return node
        return quantize_jit(node, kind, block_axis(name, stacked))

    return projection_nodes(params, visit)


def bytes_of(tree: Any) -> int:
    """Bytes held by a pytree's arrays."""
    return sum(int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))
