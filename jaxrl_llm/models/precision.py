"""The rollout copy of a policy: the params a sampler decodes with, in a lower precision.

Made once per training step from the trained params (never per generation call): LoRA adapters are
merged and quantised kernels dequantised (a sampler needs neither), then
- float32: nothing changes; the trained params are sampled as they are, in the model's dtypes;
- bfloat16: every weight cast to bf16, computed in bf16 (matmuls accumulate in fp32);
- int8: weight-only int8 projection kernels with one fp32 scale per output channel (absmax over
  the kernel's last contracted axis: per head for o_proj), the embedding and norms in bf16; a
  kernel is dequantised to bf16 inside the matmul that reads it (`transformer.Projection`); XLA
  hoists that out of a decode loop, which then reads bf16 (docs/rollouts.md).
The sampler's log-probs then differ from the trainer's: `core.correction` measures and corrects it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrl_llm.models import lora, quantize
from jaxrl_llm.models.transformer import QUANTIZED_NAMES, ModelConfig

ROLLOUT_DTYPES = ("float32", "bfloat16", "int8")


def rollout_config(config: ModelConfig, weights_dtype: str) -> ModelConfig:
    """The model config the rollout copy runs under."""
    if weights_dtype not in ROLLOUT_DTYPES:
        raise ValueError(f"weights_dtype must be one of {ROLLOUT_DTYPES}, got {weights_dtype!r}.")
    if weights_dtype == "float32":
        return config
    return config.replace(dtype="bfloat16", param_dtype="bfloat16", lora=None)


def plain_weights(params, config: ModelConfig):
    """Params with LoRA merged and every quantised kernel dequantised (fp32): one plain model."""
    merged = lora.merge(params, config) if config.lora is not None else params

    def visit(name, node, stacked):
        if quantize.kind_of(node) is None:
            return node
        kernel = quantize.kernel_of(node, lora.block_axis(name, stacked))
        return {**lora.without(node, QUANTIZED_NAMES), "kernel": kernel}

    return lora.projection_nodes(merged, visit)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _lower_precision(params, config: ModelConfig, weights_dtype: str):
    plain = plain_weights(params, config)
    if weights_dtype == "int8":  # from the fp32 kernels, so each weight is rounded once

        def per_channel(name, node, stacked):
            axis = lora.block_axis(name, stacked)
            return quantize.quantize_kernel(node, "int8", axis, block=node["kernel"].shape[axis])

        plain = lora.projection_nodes(plain, per_channel)
    # The int8 scales stay fp32: one per output channel, a rounding error there would hit every weight.
    to_bf16 = lambda path, x: x if path[-1].key == quantize.SCALE_NAME or not jnp.issubdtype(x.dtype, jnp.floating) \
        else x.astype(jnp.bfloat16)
    return jax.tree_util.tree_map_with_path(to_bf16, plain)


def rollout_weights(params, config: ModelConfig, weights_dtype: str):
    """The rollout copy of `params` (a `config` model) in `weights_dtype`; run it under
    `rollout_config(config, weights_dtype)`."""
    rollout_config(config, weights_dtype)
    if weights_dtype == "float32":
        return params
    return _lower_precision(params, config, weights_dtype)
