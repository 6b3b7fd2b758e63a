"""GGUF files (llama.cpp): the config and tokenizer from their metadata, tensors dequantized lazily."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jaxrl_llm import tokenizer as tokenizer_lib
from jaxrl_llm.errors import ModelLoadError
from jaxrl_llm.models.hf_config import REQUIRED_HF_KEYS
from jaxrl_llm.models.hf_weights import Checkpoint, TensorReader

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def read_gguf(path: Path) -> Checkpoint:
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
    missing = [key for key in REQUIRED_HF_KEYS if hf[key] is None]
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
