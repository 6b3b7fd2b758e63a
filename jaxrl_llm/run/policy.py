"""The models a run starts from: the policy on the run's mesh (the built-in tiny decoder or a loaded
model), its frozen reference, and the reward and value models PPO adds."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxrl_llm import sharding
from jaxrl_llm import tokenizer as tok
from jaxrl_llm.config import Config
from jaxrl_llm.errors import ConfigError, TrainingError
from jaxrl_llm.models.load import LoadedModel, load_model, load_scalar_model
from jaxrl_llm.models.transformer import ModelConfig
from jaxrl_llm.run.keys import INIT, stream_key


@dataclasses.dataclass
class Policy:
    """A model ready to train: architecture, params and tokenizer."""

    config: ModelConfig
    params: Any
    tokenizer: Any


def run_mesh(config: Config):
    """The run's device mesh (`mesh` section; -1 = the remaining devices)."""
    return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def model_numerics(config: Config) -> dict:
    """The model section's dtype, param_dtype, remat and attention, as ModelConfig fields."""
    m = config.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=m.attention)


def tiny_model_config(config: Config, vocab_size: int) -> ModelConfig:
    """The built-in tiny decoder's architecture (`model.tiny`) for a tokenizer of `vocab_size` tokens."""
    tiny = config.model.tiny
    if tiny.vocab_size and tiny.vocab_size < vocab_size:
        raise ConfigError(
            f"model.tiny.vocab_size ({tiny.vocab_size}) is smaller than the character tokenizer's "
            f"{vocab_size} tokens; raise it or leave it unset (null) to match the tokenizer."
        )
    return ModelConfig(
        vocab_size=tiny.vocab_size or vocab_size, hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size, num_layers=tiny.num_layers, num_heads=tiny.num_heads,
        num_kv_heads=tiny.num_kv_heads, head_dim=tiny.head_dim,
        max_position_embeddings=tiny.max_position_embeddings, tie_word_embeddings=True, **model_numerics(config),
    )


def load_policy(config: Config, source: str | None = None) -> Policy:
    """The starting model, its params sharded on the run's mesh: the built-in tiny decoder with a
    character tokenizer, or a loaded one."""
    source = source or config.model.source
    mesh = run_mesh(config)
    if source == "tiny":
        tokenizer = tok.char_tokenizer()
        model_config = tiny_model_config(config, len(tokenizer))
        return Policy(model_config, sharding.init_sharded(model_config, stream_key(config.seed, INIT), mesh), tokenizer)
    loaded = load_model(source, placement=sharding.placement(mesh), **model_numerics(config))
    if loaded.tokenizer is None:
        raise TrainingError(f"{source} has no tokenizer; training needs one to encode prompts.")
    return Policy(loaded.config, loaded.params, loaded.tokenizer)


def load_scalar(config: Config, source: str, key: jax.Array | None = None) -> LoadedModel:
    """A reward or value model from `source` on the run's mesh (a fresh head from `key` if it has none)."""
    return load_scalar_model(source, key, placement=sharding.placement(run_mesh(config)), **model_numerics(config))


def own_copy(tree):
    """A copy with its own buffers: the jitted step donates its state, so no two leaves may share one."""
    return jax.tree.map(jnp.copy, tree)


def reference_params(config: Config, policy: Policy):
    """The frozen reference: model.ref_path when set, else a copy of the starting policy (π_SFT)."""
    if config.model.ref_path:
        return load_policy(config, config.model.ref_path).params
    return own_copy(policy.params)
