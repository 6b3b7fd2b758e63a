"""Models: the Flax decoder and HF/GGUF conversion."""

from jaxrl_llm.models.transformer import (
    ModelConfig,
    ScalarModel,
    Transformer,
    init_cache,
    init_params,
    lm_head_weight,
    param_logical_axes,
    positions_from_mask,
)
