"""LoRA adapters <-> PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`).

PEFT names a causal LM's adapter tensors `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
([r, in]) and `...lora_B.weight` ([out, r]), and computes W·x + (α/r)·B·A·x; ours are `lora_a`
[.., in, r] and `lora_b` [r, out ..] (heads split like the kernels, `hf_weights`), so the layouts
are transposes of each other. Only what PEFT calls plain LoRA is read: no DoRA, no per-layer
ranks or targets, no trained biases or extra modules.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jaxrl_llm.errors import ModelLoadError
from jaxrl_llm.models.hf_weights import TensorSpec, _get_path, _set_path
from jaxrl_llm.models.transformer import PROJECTIONS, LoraConfig, ModelConfig

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _dims(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """{projection: (HF module, our input dims, our output dims)}."""
    D, E, F, H, K = (config.hidden_size, config.head_dim, config.intermediate_size, config.num_heads,
                     config.num_kv_heads)
    attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    return {
        "q_proj": (attn + "q_proj", (D,), (H, E)), "k_proj": (attn + "k_proj", (D,), (K, E)),
        "v_proj": (attn + "v_proj", (D,), (K, E)), "o_proj": (attn + "o_proj", (H, E), (D,)),
        "gate_proj": (mlp + "gate_proj", (D,), (F,)), "up_proj": (mlp + "up_proj", (D,), (F,)),
        "down_proj": (mlp + "down_proj", (F,), (D,)),
    }


def adapter_specs(config: ModelConfig) -> list[TensorSpec]:
    """PEFT tensor <-> ours for every adapter of `config.lora`: A [r, in] <-> [in.., r], B [out, r] <-> [r, out..]."""
    r, specs = config.lora.rank, []
    for name, (module, ins, outs) in _dims(config).items():
        if not config.lora.targets_module(name):
            continue
        path = ("layers", "attn" if "self_attn" in module else "mlp", name)
        n, m = len(ins), len(outs)
        specs += [
            TensorSpec(PREFIX + module + ".lora_A.weight", (*path, "lora_a"), (r, math.prod(ins)), (r, *ins),
                       (*range(1, n + 1), 0)),
            TensorSpec(PREFIX + module + ".lora_B.weight", (*path, "lora_b"), (math.prod(outs), r), (*outs, r),
                       (m, *range(m))),
        ]
    return specs


def save_adapter(folder: str | Path, adapters: dict, config: ModelConfig, base_model: str = "") -> Path:
    """Write `adapters` as a PEFT LoRA folder that `PeftModel.from_pretrained(base, folder)` loads."""
    lora, folder = config.lora, Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for spec in adapter_specs(config):
        ours = np.asarray(_get_path(adapters, spec.path), np.float32)
        tensors.update({spec.hf_name.format(i=i): np.ascontiguousarray(spec.to_hf(ours[i]))
                        for i in range(config.num_layers)})
    targets = sorted({spec.path[2] for spec in adapter_specs(config)})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": lora.rank,
        "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": targets,
        "use_rslora": lora.rslora, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "use_dora": False,
    }
    partial = folder / f".{WEIGHTS_FILE}.partial"
    safetensors.numpy.save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))
    return folder


def read_adapter_config(folder: str | Path) -> tuple[LoraConfig, dict]:
    """(our LoraConfig, PEFT's config dict) of an adapter folder; refuses what plain LoRA is not."""
    path = Path(folder) / CONFIG_FILE
    try:
        peft_config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: cannot read a PEFT adapter config ({error}).") from None
    unsupported = {
        "peft_type": peft_config.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(peft_config.get("use_dora")),
        "bias": peft_config.get("bias", "none") != "none",
        "modules_to_save": bool(peft_config.get("modules_to_save")),
        "layers_to_transform": peft_config.get("layers_to_transform") is not None,
        "rank_pattern": bool(peft_config.get("rank_pattern")),
        "alpha_pattern": bool(peft_config.get("alpha_pattern")),
    }
    bad = [f"{name}={peft_config.get(name)!r}" for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ModelLoadError(f"{path}: {', '.join(bad)} is not plain LoRA, the only kind read here.")
    # The targets are the projections the file holds adapters for (PEFT's target_modules may be a
    # pattern over full module names).
    with safetensors.safe_open(str(Path(folder) / WEIGHTS_FILE), "numpy") as weights:
        names = list(weights.keys())
    targets = tuple(name for name in PROJECTIONS if any(f".{name}.lora_A" in key for key in names))
    lora = LoraConfig(
        int(peft_config["r"]), float(peft_config["lora_alpha"]), float(peft_config.get("lora_dropout", 0.0)),
        targets, bool(peft_config.get("use_rslora", False)),
    )
    return lora, peft_config


def load_adapter(folder: str | Path, config: ModelConfig) -> dict:
    """The adapters of a PEFT folder for `config` (whose lora must match it), in its param dtype."""
    folder = Path(folder)
    file = folder / WEIGHTS_FILE
    if not file.is_file():
        raise ModelLoadError(f"{folder}: no {WEIGHTS_FILE} (a .bin adapter can be re-saved with safe_serialization).")
    tensors = safetensors.numpy.load_file(str(file))
    # Older PEFT versions keep the adapter name in the key ("lora_A.default.weight").
    tensors = {name.replace(".default.weight", ".weight"): value for name, value in tensors.items()}
    adapters: dict = {}
    for spec in adapter_specs(config):
        layers = []
        for i in range(config.num_layers):
            name = spec.hf_name.format(i=i)
            if name not in tensors:
                raise ModelLoadError(f"{file}: tensor {name!r} is missing; the adapter config targets it.")
            if tuple(tensors[name].shape) != spec.hf_shape:
                raise ModelLoadError(
                    f"{file}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but the base model and rank "
                    f"imply {spec.hf_shape}; is this adapter for another base model?"
                )
            layers.append(spec.to_ours(tensors[name].astype(np.float32)))
        _set_path(adapters, spec.path, jnp.asarray(np.stack(layers), config.param_dtype))
    expected = {spec.hf_name.format(i=i) for spec in adapter_specs(config) for i in range(config.num_layers)}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ModelLoadError(f"{file}: tensors {extra[:3]} match no adapter of {', '.join(PROJECTIONS)}.")
    return adapters
