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
from jaxrl_llm.models import lora, peft
from jaxrl_llm.models.load import LoadedModel, init_scalar_params_from_lm, load_model, load_scalar_model
from jaxrl_llm.models.transformer import PROJECTIONS, LoraConfig, ModelConfig
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


def lora_config(config: Config) -> LoraConfig | None:
    """The run's LoRA as the model's `lora` field (None: full fine-tuning)."""
    section = config.model.lora
    if section.rank == 0:
        return None
    return LoraConfig(section.rank, section.alpha, section.dropout, section.targets, section.rslora)


def load_policy(config: Config, source: str | None = None) -> Policy:
    """The starting model, its params sharded on the run's mesh: the built-in tiny decoder with a
    character tokenizer, or a loaded one. With LoRA its architecture carries the adapters' settings
    and, with model.lora.quantize, its projection kernels are stored quantised."""
    source = source or config.model.source
    mesh = run_mesh(config)
    if source == "tiny":
        tokenizer = tok.char_tokenizer()
        model_config = tiny_model_config(config, len(tokenizer))
        params = sharding.init_sharded(model_config, stream_key(config.seed, INIT), mesh)
    else:
        loaded = load_model(source, placement=sharding.placement(mesh), **model_numerics(config))
        if loaded.tokenizer is None:
            raise TrainingError(f"{source} has no tokenizer; training needs one to encode prompts.")
        model_config, params, tokenizer = loaded.config, loaded.params, loaded.tokenizer
    params = lora.quantize_base(params, config.model.lora.quantize)
    return Policy(model_config.replace(lora=lora_config(config)), params, tokenizer)


def lora_base(config: Config, policy: Policy) -> Any:
    """The frozen base a LoRA phase starts from: the policy's params, or, when it carries adapters (a
    LoRA warm start's), those merged in and quantised again as configured."""
    base, adapters = lora.split(policy.params)
    if not adapters:
        return base
    return lora.quantize_base(lora.merge_jit(policy.params, policy.config),
                              config.model.lora.quantize)


def lora_parts(config: Config, policy: Policy, key: jax.Array) -> tuple[Any, Any]:
    """(trained, frozen) params of the policy: (all of them, None) in full fine-tuning; with LoRA the
    adapters (model.lora.init_from's on a plain policy, else fresh) and `lora_base`."""
    if policy.config.lora is None:
        return policy.params, None
    base = lora_base(config, policy)
    if config.model.lora.init_from and not lora.split(policy.params)[1]:
        return starting_adapter(config, policy.config), base
    return lora.init_adapters(policy.config, key), base


def starting_adapter(config: Config, model_config: ModelConfig) -> dict:
    """model.lora.init_from's adapters, refused when they differ from the run's LoRA settings."""
    folder = config.model.lora.init_from
    theirs, _ = peft.read_adapter_config(folder)
    ours = model_config.lora
    if (theirs.rank, theirs.alpha, theirs.rslora) != (ours.rank, ours.alpha, ours.rslora) or not all(
        ours.targets_module(name) == (name in theirs.targets) for name in PROJECTIONS
    ):
        raise ConfigError(
            f"model.lora.init_from {folder} holds rank {theirs.rank}, alpha {theirs.alpha}, rslora {theirs.rslora}, "
            f"targets {list(theirs.targets)}; set model.lora.rank={theirs.rank} model.lora.alpha={theirs.alpha} "
            f"model.lora.rslora={str(theirs.rslora).lower()} model.lora.targets=[{','.join(theirs.targets)}] to match."
        )
    return peft.load_adapter(folder, model_config)


def scalar_parts(params: Any, model_config: ModelConfig, key: jax.Array) -> tuple[Any, Any]:
    """(trained, frozen) of a value or reward model grown from LM `params` with a fresh head: with
    LoRA the trunk's adapters and the head are trained and the trunk is the LM's base, shared."""
    if model_config.lora is None:
        return init_scalar_params_from_lm(own_copy(params), key, model_config), None
    base, _ = lora.split(params)
    scalar = init_scalar_params_from_lm(base, key, model_config)
    adapters = lora.init_adapters(model_config, jax.random.fold_in(key, 1))
    return {"model": adapters, "head": scalar["head"]}, {"model": scalar["model"]}


def load_scalar(config: Config, source: str, key: jax.Array | None = None) -> LoadedModel:
    """A reward or value model from `source` on the run's mesh (a fresh head from `key` if it has none)."""
    return load_scalar_model(source, key, placement=sharding.placement(run_mesh(config)), **model_numerics(config))


def own_copy(tree):
    """A copy with its own buffers: the jitted step donates its state, so no two leaves may share one."""
    return jax.tree.map(jnp.copy, tree)


def reference_params(config: Config, policy: Policy):
    """The frozen reference: model.ref_path when set, else a copy of the starting policy (π_SFT), or
    with LoRA None: the policy's base with the adapters off (`algorithms.common.reference_of`)."""
    if config.model.ref_path:
        return lora.split(load_policy(config, config.model.ref_path).params)[0]
    if policy.config.lora is not None:
        return None
    return own_copy(policy.params)
