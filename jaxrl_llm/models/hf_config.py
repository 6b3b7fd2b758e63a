"""HF config.json <-> ModelConfig, in transformers 4.x and 5.x spelling, for the Llama / Mistral /
Qwen2 / Qwen3 family; options our decoder does not implement are refused, not loaded wrongly."""

from __future__ import annotations

from typing import Any

from jaxrl_llm import tokenizer as tokenizer_lib
from jaxrl_llm.errors import ModelLoadError
from jaxrl_llm.models.transformer import ROPE_TYPES, SUPPORTED_MODEL_TYPES, ModelConfig

FAMILY_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
REQUIRED_HF_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)


def config_from_hf(hf: dict, **overrides: Any) -> ModelConfig:
    """ModelConfig from an HF config.json dict, in transformers 4.x or 5.x spelling."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    missing = [key for key in REQUIRED_HF_KEYS if key not in hf]
    if missing:
        raise ModelLoadError(f"the config lacks {', '.join(missing)}.")
    _check_hf_architecture(hf)
    heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        model_type=model_type,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        sliding_window=_sliding_window_from_hf(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        initializer_range=hf.get("initializer_range", 0.02),
        **_rope_from_hf(hf),
    )
    try:
        return ModelConfig(**{**fields, **overrides})
    except (TypeError, ValueError) as err:  # TypeError: an override that is not a field
        raise ModelLoadError(str(err)) from None


def _check_hf_architecture(hf: dict) -> None:
    """Reject HF options our decoder does not implement, rather than load them wrongly."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(
            f"hidden_act {hf['hidden_act']!r} is not supported; only silu (SwiGLU)."
        )
    if hf.get("mlp_bias"):
        raise ModelLoadError("mlp_bias=true is not supported.")
    if hf.get("attention_bias") and hf["model_type"] != "qwen2":
        raise ModelLoadError(
            f"attention_bias=true for {hf['model_type']} (a bias on o_proj too) is not supported; "
            "only Qwen2's q/k/v biases are."
        )


def _rope_from_hf(hf: dict) -> dict:
    """RoPE fields from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(
            f"rope_type {rope_type!r} is not supported; use {', '.join(ROPE_TYPES)}."
        )
    return dict(
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
    )


def _sliding_window_from_hf(hf: dict) -> int | None:
    """Mistral windows every layer; Qwen2/3 per `layer_types`, of which we support all or none."""
    if hf["model_type"] == "mistral":
        return hf.get("sliding_window")
    if hf["model_type"] == "llama":
        return None
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 0)
        else "full_attention"
        for i in range(hf["num_hidden_layers"])
    ]
    sliding = {kind == "sliding_attention" for kind in layer_types}
    if sliding == {True, False}:
        raise ModelLoadError(
            "sliding-window attention on only some layers (layer_types) is not supported."
        )
    return window if sliding == {True} else None


def config_to_hf(config: ModelConfig, tokenizer: Any = None, scalar: bool = False) -> dict:
    """HF config.json dict for `config` (CausalLM, or SequenceClassification with one label)."""
    head = "SequenceClassification" if scalar else "CausalLM"
    hf = dict(
        architectures=[f"{FAMILY_CLASS_PREFIX[config.model_type]}For{head}"],
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        torch_dtype=config.param_dtype,
        **_rope_to_hf(config),
        **_family_fields_to_hf(config),
    )
    if scalar:
        hf.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if tokenizer is not None:
        hf.update(tokenizer_lib.special_token_ids(tokenizer))
    return hf


def _rope_to_hf(config: ModelConfig) -> dict:
    """Both spellings: `rope_parameters` for transformers 5, `rope_theta`/`rope_scaling` for 4."""
    scaling = {"rope_type": config.rope_type}
    if config.rope_type != "default":
        scaling["factor"] = config.rope_factor
    if config.rope_type == "llama3":
        scaling.update(
            low_freq_factor=config.rope_low_freq_factor,
            high_freq_factor=config.rope_high_freq_factor,
            original_max_position_embeddings=config.rope_original_max_position,
        )
    return dict(
        rope_theta=config.rope_theta,
        rope_scaling=None if config.rope_type == "default" else scaling,
        rope_parameters={"rope_theta": config.rope_theta, **scaling},
    )


def _family_fields_to_hf(config: ModelConfig) -> dict:
    """The per-family switches config_from_hf reads back."""
    if config.model_type == "mistral":
        return {"sliding_window": config.sliding_window}
    if config.model_type == "llama":
        return {"attention_bias": False, "mlp_bias": False}
    windowed = config.sliding_window is not None
    return {
        "use_sliding_window": windowed,
        "sliding_window": config.sliding_window,
        "max_window_layers": 0,
        "layer_types": ["sliding_attention" if windowed else "full_attention"] * config.num_layers,
        **({"attention_bias": False} if config.model_type == "qwen3" else {}),
    }
