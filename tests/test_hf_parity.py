"""Our decoder against transformers' PyTorch models: fp32, same weights, every family.

Shape letters: B batch, T length, D embed.

Each case builds a tiny random HF config, draws torch weights with a fixed seed (larger than
HF's init, so attention is far from uniform and RoPE, norms and biases all matter), saves it with
`save_pretrained` (or as a GGUF, the way llama.cpp's converter writes one) and loads it with our
loader.
"""

import functools

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers

from jaxrl_llm.errors import ModelLoadError
from jaxrl_llm.models.hf_config import config_from_hf, config_to_hf
from jaxrl_llm.models.load import export_hf, forward, init_scalar_params_from_lm, load_model, load_scalar_model
from jaxrl_llm.models.transformer import ScalarModel, init_params

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
    high_freq_factor=4.0, original_max_position_embeddings=16,
)
CASES = {
    "llama": ("llama", {}),
    "llama-llama3rope-tied": ("llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "llama-linearrope": ("llama", dict(rope_parameters=dict(rope_type="linear", factor=2.0))),
    "mistral-window": ("mistral", dict(sliding_window=4)),
    "qwen2-tied-sharded": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=32)),
}
LENGTHS = (12, 7, 3)  # left-padded rows; 12 > the mistral window and the llama3 original length


def left_padded_batch(vocab_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    T = max(LENGTHS)
    tokens_BxT = rng.integers(0, vocab_size, (len(LENGTHS), T)).astype(np.int32)
    mask_BxT = (np.arange(T)[None, :] >= T - np.array(LENGTHS)[:, None]).astype(np.int32)
    return tokens_BxT, mask_BxT


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Norm scales 1 + 0.1·N, everything else 0.2·N."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)


def tiny_hf_config(case: str) -> transformers.PretrainedConfig:
    model_type, extra = CASES[case]
    return transformers.CONFIG_MAPPING[model_type](**TINY, **extra)


@pytest.fixture(scope="module", params=list(CASES))
def hf_tiny(request, tmp_path_factory):
    """(case, torch model, its save_pretrained folder)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_hf_config(request.param), attn_implementation="eager"
    ).eval()
    randomize_(model, seed=1)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, max_shard_size="40KB" if "sharded" in request.param else "1GB")
    return request.param, model, folder


def test_logits_match_transformers(hf_tiny, torch_logits, relative_error):
    case, torch_model, folder = hf_tiny
    if "sharded" in case:
        assert (folder / "model.safetensors.index.json").is_file()
    loaded = load_model(folder)
    tokens_BxT, mask_BxT = left_padded_batch(loaded.config.vocab_size)
    ours_BxTxV = loaded.logits(loaded.params, tokens_BxT, mask_BxT)
    ref_BxTxV = torch_logits(torch_model, tokens_BxT, mask_BxT)
    assert relative_error(ours_BxTxV, ref_BxTxV, mask_BxT) <= 1e-4


def test_export_round_trip_of_modified_params(hf_tiny, tmp_path, torch_logits, relative_error):
    _, _, folder = hf_tiny
    loaded = load_model(folder)
    rng = np.random.default_rng(0)
    modified = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32), loaded.params
    )
    export_hf(modified, tmp_path, config=loaded.config)

    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens_BxT, mask_BxT = left_padded_batch(loaded.config.vocab_size, seed=1)
    ours_BxTxV = loaded.logits(modified, tokens_BxT, mask_BxT)
    ref_BxTxV = torch_logits(reloaded.eval(), tokens_BxT, mask_BxT)
    assert relative_error(ours_BxTxV, ref_BxTxV, mask_BxT) <= 1e-4

    ours_again = load_model(tmp_path)
    assert ours_again.config == loaded.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours_again.params, modified)


@pytest.mark.parametrize("case", list(CASES))
def test_config_round_trip(case):
    config = config_from_hf(tiny_hf_config(case).to_dict())
    assert config_from_hf(config_to_hf(config)) == config


def test_config_fields_per_family():
    llama3 = config_from_hf(tiny_hf_config("llama-llama3rope-tied").to_dict())
    assert (llama3.rope_type, llama3.rope_factor) == ("llama3", 8.0)
    assert llama3.rope_original_max_position == 16
    assert llama3.tie_word_embeddings
    assert config_from_hf(tiny_hf_config("mistral-window").to_dict()).sliding_window == 4
    assert config_from_hf(tiny_hf_config("qwen2-tied-sharded").to_dict()).attention_bias
    qwen3 = config_from_hf(tiny_hf_config("qwen3").to_dict())
    assert qwen3.qk_norm and qwen3.head_dim == 32


def test_transformers_4_config_spelling():
    rope_scaling = {"type": "linear", "factor": 4.0}
    hf = dict(model_type="llama", **TINY, rope_theta=5e5, rope_scaling=rope_scaling)
    config = config_from_hf(hf)
    assert (config.rope_theta, config.rope_type, config.rope_factor) == (5e5, "linear", 4.0)
    assert config.num_layers == 2 and config.head_dim == 16 and not config.tie_word_embeddings


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2"), "supported: llama, mistral, qwen2, qwen3"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(attention_bias=True), "attention_bias=true for llama"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
        (dict(num_attention_heads=None), "num_attention_heads"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    hf = {**dict(model_type="llama", **TINY), **change}
    hf = {key: value for key, value in hf.items() if value is not None}
    with pytest.raises(ModelLoadError, match=message):
        config_from_hf(hf)


def test_qwen2_sliding_window_on_some_layers_is_refused():
    window = dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    hf = dict(model_type="qwen2", **TINY, **window)
    with pytest.raises(ModelLoadError, match="only some layers"):
        config_from_hf(hf)


@pytest.mark.parametrize("hf_tiny", ["llama"], indirect=True)
def test_bfloat16_params_and_compute(hf_tiny, relative_error):
    _, _, folder = hf_tiny
    fp32, bf16 = load_model(folder), load_model(folder, dtype="bfloat16")
    assert {x.dtype for x in jax.tree_util.tree_leaves(bf16.params)} == {np.dtype("bfloat16")}
    tokens_BxT, mask_BxT = left_padded_batch(fp32.config.vocab_size)
    ours_BxTxV = bf16.logits(bf16.params, tokens_BxT, mask_BxT)
    ref_BxTxV = fp32.logits(fp32.params, tokens_BxT, mask_BxT)
    assert relative_error(ours_BxTxV, ref_BxTxV, mask_BxT) < 0.1


# ----------------------------------------------------------------------------- scalar models


@pytest.fixture(scope="module")
def hf_reward_model(tmp_path_factory):
    """(transformers LlamaForSequenceClassification with one label, its folder)."""
    config = transformers.LlamaConfig(**TINY, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(
        config, attn_implementation="eager"
    ).eval()
    randomize_(model, seed=2)
    folder = tmp_path_factory.mktemp("reward")
    model.save_pretrained(folder)
    return model, folder


def pad_id_zero_batch(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded batch whose padding is token 0, HF's pad id here, and real tokens are not."""
    tokens_BxT, mask_BxT = left_padded_batch(vocab_size)
    return np.where(mask_BxT == 1, np.maximum(tokens_BxT, 1), 0).astype(np.int32), mask_BxT


def hf_last_token_scores(model, tokens_BxT, mask_BxT) -> np.ndarray:
    """transformers' pooled score: the last non-pad token's, here the last slot of every row."""
    with torch.no_grad():
        return model(
            input_ids=torch.as_tensor(tokens_BxT, dtype=torch.long),
            attention_mask=torch.as_tensor(mask_BxT),
            position_ids=torch.as_tensor(np.maximum(np.cumsum(mask_BxT, -1) - 1, 0)),
        ).logits[:, 0].numpy()


def test_scalar_model_matches_sequence_classification(hf_reward_model):
    torch_model, folder = hf_reward_model
    loaded = load_scalar_model(folder)
    np.testing.assert_array_equal(loaded.params["head"]["bias"], np.zeros(1, np.float32))
    tokens_BxT, mask_BxT = pad_id_zero_batch(loaded.config.vocab_size)
    scores_B = np.asarray(loaded.logits(loaded.params, tokens_BxT, mask_BxT))[:, -1]
    ref_B = hf_last_token_scores(torch_model, tokens_BxT, mask_BxT)
    np.testing.assert_allclose(scores_B, ref_B, rtol=1e-4, atol=1e-4 * np.abs(ref_B).max())


def test_scalar_export_round_trip_keeps_head_bias(hf_reward_model, tmp_path):
    _, folder = hf_reward_model
    loaded = load_scalar_model(folder)
    head = {**loaded.params["head"], "bias": np.full(1, 0.5, np.float32)}
    params = {**loaded.params, "head": head}
    export_hf(params, tmp_path, config=loaded.config)

    again = load_scalar_model(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, params)
    reloaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and set(info["unexpected_keys"]) <= {"score.bias"}
    reloaded.config.pad_token_id = 0
    tokens_BxT, mask_BxT = pad_id_zero_batch(loaded.config.vocab_size)
    scores_B = np.asarray(loaded.logits(params, tokens_BxT, mask_BxT))[:, -1]
    ref_B = hf_last_token_scores(reloaded.eval(), tokens_BxT, mask_BxT)
    np.testing.assert_allclose(scores_B - 0.5, ref_B, rtol=1e-4, atol=1e-4 * np.abs(ref_B).max())


@pytest.mark.parametrize("hf_tiny", ["llama"], indirect=True)
def test_scalar_model_from_causal_lm(hf_tiny):
    _, _, folder = hf_tiny
    lm = load_model(folder)
    key = jax.random.key(3)
    fresh_head = init_params(lm.config, key, scalar_head=True)["head"]

    from_lm = init_scalar_params_from_lm(lm.params, key, lm.config)
    assert "lm_head" not in from_lm["model"] and from_lm["model"]["layers"] is lm.params["layers"]
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), from_lm["head"], fresh_head
    )

    from_folder = load_scalar_model(folder, key=key)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_folder.params, from_lm)
    tokens_BxT, mask_BxT = left_padded_batch(lm.config.vocab_size)
    hidden_BxTxD, _ = jax.jit(functools.partial(lm.module.apply, return_hidden=True))(
        {"params": lm.params}, tokens_BxT, np.maximum(np.cumsum(mask_BxT, -1) - 1, 0), mask_BxT
    )
    expected_BxT = hidden_BxTxD @ fresh_head["kernel"][:, 0] + fresh_head["bias"][0]
    scores_BxT = forward(from_lm, tokens_BxT, mask_BxT, ScalarModel(lm.config))
    np.testing.assert_allclose(scores_BxT, expected_BxT, rtol=1e-5, atol=1e-5)


def write_gguf(model: torch.nn.Module, path) -> None:
    """An fp32 GGUF of `model`, as llama.cpp's convert_hf_to_gguf.py lays it out."""
    config, model_type = model.config, model.config.model_type
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[model_type]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, model_type)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    rope_heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        module, suffix = name.rsplit(".", 1)
        array = tensor.numpy()
        heads = rope_heads.get(module.rsplit(".", 1)[-1])
        if model_type == "llama" and suffix == "weight" and heads:
            # llama.cpp's `permute`: interleave the two RoPE halves of each head's rows.
            array = array.reshape(heads, 2, -1, array.shape[-1]).swapaxes(1, 2).reshape(array.shape)
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "model_type, extra",
    # transformers' GGUF reader ignores key_length, so Qwen3 keeps its default head_dim 128.
    [("llama", {}), ("qwen2", {}), ("qwen3", dict(head_dim=128))],
)
def test_gguf_matches_transformers_gguf_loader(
    model_type, extra, tmp_path, torch_logits, relative_error
):
    config = transformers.CONFIG_MAPPING[model_type](**TINY, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval()
    randomize_(model, seed=3)
    write_gguf(model, tmp_path / "tiny.gguf")

    loaded = load_model(tmp_path / "tiny.gguf")
    gguf_eps = float(np.float32(config.rms_norm_eps))  # GGUF stores it as float32
    assert loaded.config == config_from_hf(config.to_dict(), rms_norm_eps=gguf_eps)
    assert loaded.tokenizer is None
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="tiny.gguf", attn_implementation="eager"
    ).eval()
    tokens_BxT, mask_BxT = left_padded_batch(config.vocab_size)
    ours_BxTxV = loaded.logits(loaded.params, tokens_BxT, mask_BxT)
    for ref in (reference, model):
        assert relative_error(ours_BxTxV, torch_logits(ref, tokens_BxT, mask_BxT), mask_BxT) <= 1e-4
