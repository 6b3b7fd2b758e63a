"""Weight-only quantisation of a frozen base: int8 and NF4 with blockwise absmax scales.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, §3) stores each block of 64 consecutive weights as
4-bit indices into the NormalFloat4 codebook (quantiles of N(0, 1) scaled to [-1, 1], with an exact
0) and one fp32 absmax per block; int8 stores round(127·w/absmax). A weight is dequantised as
code·absmax, in the compute dtype, inside the matmul that uses it (`transformer.Projection`), so
the full-precision kernel only ever exists for one layer at a time.

A kernel's blocks run along its last contracted axis (the input features: `embed` for q/k/v/
gate/up, `head_dim` for o_proj, `mlp` for down_proj), as bitsandbytes blocks the rows of a torch
weight; a block is 64 weights, or the largest power of two dividing that axis when it is smaller.
The codes keep the kernel's rank (NF4 packs two codes per byte along the blocked axis) and the
scales too, so both share the kernel's logical axes and sharding. QLoRA's double quantisation of
the scales is not done: at 64 weights a block it adds 0.5 bit per weight.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("int8", "nf4")
BLOCK_SIZE = 64  # QLoRA §3
# QLoRA Appendix E (bitsandbytes' NF4 table): 2^3 + 1 positive and 2^3 negative N(0,1) quantiles.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)
CODE_NAMES = {"int8": "kernel_int8", "nf4": "kernel_nf4"}
SCALE_NAME = "kernel_scale"


def block_size(axis_size: int) -> int:
    """64, or the largest power of two dividing `axis_size` when that is smaller."""
    return math.gcd(axis_size, BLOCK_SIZE)


def _blocks(x: jax.Array, axis: int, block: int) -> jax.Array:
    """x with `axis` moved first and split as [n/block, block, ...rest]."""
    x = jnp.moveaxis(x, axis, 0)
    return x.reshape(x.shape[0] // block, block, *x.shape[1:])


def _unblock(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of `_blocks`."""
    x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return jnp.moveaxis(x, 0, axis)


def quantize(kernel: jax.Array, kind: str, axis: int, block: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(codes, fp32 scales) of `kernel` blocked along `axis`: int8 codes of the kernel's shape, or
    NF4 codes packed two per uint8 (the axis halved); scales have the axis divided by the block
    (`block_size` by default; the whole axis gives one scale per output channel)."""
    if kind not in KINDS:
        raise ValueError(f"quantisation {kind!r} is not one of {KINDS}.")
    block = block or block_size(kernel.shape[axis])
    w = _blocks(kernel.astype(jnp.float32), axis, block)
    absmax = jnp.max(jnp.abs(w), axis=1, keepdims=True)
    normed = w / jnp.where(absmax == 0, 1.0, absmax)
    if kind == "int8":
        codes = jnp.clip(jnp.round(normed * 127), -127, 127).astype(jnp.int8)
        return _unblock(codes, axis), jnp.moveaxis(absmax[:, 0], 0, axis)
    index = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4_CODEBOOK)), axis=-1).astype(jnp.uint8)
    index = _unblock(index, axis)
    return _pack_pairs(index, axis), jnp.moveaxis(absmax[:, 0], 0, axis)


def dequantize(codes: jax.Array, scales: jax.Array, kind: str, axis: int, dtype=jnp.float32) -> jax.Array:
    """The kernel `quantize` encoded, as code·absmax in `dtype`."""
    if kind == "int8":
        values = codes.astype(jnp.float32) / 127
    else:
        values = jnp.asarray(NF4_CODEBOOK)[_unpack_pairs(codes, axis)]
    block = values.shape[axis] // scales.shape[axis]
    w = _blocks(values, axis, block) * jnp.moveaxis(scales, axis, 0)[:, None]
    return _unblock(w, axis).astype(dtype)


def _pack_pairs(index: jax.Array, axis: int) -> jax.Array:
    """4-bit indices, two per byte along `axis`: element 2i in the low nibble, 2i + 1 in the high."""
    pairs = _blocks(index, axis, 2)
    return jnp.moveaxis(pairs[:, 0] | (pairs[:, 1] << 4), 0, axis)


def _unpack_pairs(packed: jax.Array, axis: int) -> jax.Array:
    """Inverse of `_pack_pairs`."""
    x = jnp.moveaxis(packed, axis, 0)
    pairs = jnp.stack([x & 0xF, x >> 4], axis=1)
    return _unblock(pairs, axis)


def kind_of(node: dict) -> str | None:
    """The quantisation of a projection's param dict, or None for a plain kernel."""
    for kind, name in CODE_NAMES.items():
        if name in node:
            return kind
    return None


def quantize_kernel(node: dict, kind: str, axis: int, block: int | None = None) -> dict:
    """A projection's params with its kernel replaced by codes and scales (other leaves kept)."""
    codes, scales = quantize(node["kernel"], kind, axis, block)
    rest = {name: value for name, value in node.items() if name != "kernel"}
    return {**rest, CODE_NAMES[kind]: codes, SCALE_NAME: scales}


def kernel_of(node: dict, axis: int, dtype=jnp.float32) -> jax.Array:
    """A projection's kernel in `dtype`, dequantised when it is stored quantised."""
    kind = kind_of(node)
    if kind is None:
        return node["kernel"].astype(dtype)
    return dequantize(node[CODE_NAMES[kind]], node[SCALE_NAME], kind, axis, dtype)
