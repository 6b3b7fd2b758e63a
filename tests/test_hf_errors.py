"""Bad model sources: each gives one ModelLoadError naming the file and the problem."""

import json
import shutil

import huggingface_hub
import jax
import numpy as np
import pytest
import safetensors.numpy

from jaxrl_llm.models.load import ModelLoadError, export_hf, load_model, load_scalar_model
from jaxrl_llm.models.transformer import ModelConfig, init_params

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8,
)


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    export_hf(init_params(CONFIG, jax.random.key(0)), folder, config=CONFIG)
    return folder


@pytest.fixture
def folder(good_folder, tmp_path):
    """A fresh copy of a valid HF folder, to break."""
    return shutil.copytree(good_folder, tmp_path / "model")


def edit_config(folder, **changes):
    config_file = folder / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))


def load_error(source) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(source)
    return str(info.value)


def test_valid_folder_loads(folder):
    loaded = load_model(folder)
    assert loaded.config == CONFIG and loaded.tokenizer is None
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, loaded.params, init_params(CONFIG, jax.random.key(0))
    )


def test_missing_folder(tmp_path):
    message = load_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "no such local folder or file" in message


def test_folder_without_config(folder):
    (folder / "config.json").unlink()
    message = load_error(folder)
    assert str(folder) in message and "no config.json" in message


def test_missing_weights_file(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    message = load_error(folder)
    assert "no model.safetensors" in message and "pytorch_model.bin" in message


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_safetensors(folder, damage):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 100 if damage == "garbage" else data[:-100])
    message = load_error(folder)
    assert str(weights) in message and "corrupt or truncated" in message


def test_unsupported_family(folder):
    edit_config(folder, model_type="gpt2")
    message = load_error(folder)
    assert str(folder / "config.json") in message
    assert "'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3" in message


def test_shape_mismatch_names_tensor_and_shapes(folder):
    edit_config(folder, intermediate_size=48)
    message = load_error(folder)
    assert str(folder / "model.safetensors") in message
    assert "'model.layers.0.mlp.gate_proj.weight' has shape (64, 32)" in message
    assert "config.json implies (48, 32)" in message


def test_missing_tensor(folder):
    weights = folder / "model.safetensors"
    tensors = safetensors.numpy.load_file(weights)
    del tensors["model.norm.weight"]
    safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
    message = load_error(folder)
    assert str(folder) in message and "'model.norm.weight' is missing" in message


def test_missing_shard(folder):
    weight_map = {name: "model-00001-of-00002.safetensors" for name in ("model.norm.weight",)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = load_error(folder)
    assert str(folder / "model-00001-of-00002.safetensors") in message and "missing" in message


def test_file_that_is_not_gguf(folder):
    message = load_error(folder / "config.json")
    assert str(folder / "config.json") in message and "not a .gguf file" in message


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf at all" * 10)
    message = load_error(path)
    assert str(path) in message and "not a readable GGUF file" in message


def test_hub_id_offline_says_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = load_error("jaxrl-llm-tests/no-such-model")
    assert message.startswith("jaxrl-llm-tests/no-such-model: no such local folder or file; read as a hub id, fetching")
    assert "pass a local HF folder" in message and ".gguf file" in message


def test_a_mistyped_local_run_folder_is_named_before_the_hub(tmp_path, monkeypatch):
    """`eval runs/defualt`: the missing local folder comes first, with the closest sibling; the hub second."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "runs" / "default").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    message = load_error("runs/defualt")
    assert message.startswith("runs/defualt: no such local folder or file (did you mean 'runs/default'?); read as")


def test_non_finite_weights_name_the_tensor(folder):
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, :2] = [np.nan, np.inf]
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    message = load_error(folder)
    assert f"tensor {name!r} holds 2 non-finite values (nan or inf)" in message and "model.safetensors" in message


def test_scalar_model_without_head_needs_a_key(folder):
    with pytest.raises(ValueError, match="pass key="):
        load_scalar_model(folder)
