"""The rollout copy of a policy (`models.precision`): fp32 is the policy itself; bf16 and int8 stay
within stated tolerances of fp32; LoRA and QLoRA policies become one plain model; a run samples
with the copy and logs the mismatch it makes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algorithms.common import score_tokens
from jaxrl_llm.config import load_config
from jaxrl_llm.models import lora, quantize
from jaxrl_llm.models.precision import plain_weights, rollout_config, rollout_weights
from jaxrl_llm.models.transformer import init_params
from jaxrl_llm.run import train
from jaxrl_llm.sampling import SamplingConfig, generate
from tests.test_lora import BASE, CONFIG, logits, trained_adapters

pytestmark = pytest.mark.usefixtures("xla_disk_cache")  # see conftest.py

GAUSSIAN = BASE.replace(initializer_range=0.02)  # weights as initialised, so quantisation errors are typical


@pytest.fixture(scope="module")
def fp32():
    return init_params(GAUSSIAN, jax.random.key(0))


def test_float32_is_the_policy_itself(fp32):
    assert rollout_weights(fp32, GAUSSIAN, "float32") is fp32
    assert rollout_config(GAUSSIAN, "float32") is GAUSSIAN
    with pytest.raises(ValueError, match="weights_dtype must be one of"):
        rollout_config(GAUSSIAN, "fp8")


def test_int8_is_weight_only_with_one_scale_per_output_channel(fp32):
    copy = rollout_weights(fp32, GAUSSIAN, "int8")
    up = copy["layers"]["mlp"]["up_proj"]  # stacked [L, D, F]: contracted axis 1
    w = np.asarray(fp32["layers"]["mlp"]["up_proj"]["kernel"], np.float64)
    assert up["kernel_int8"].dtype == jnp.int8 and up["kernel_int8"].shape == w.shape
    assert up["kernel_scale"].shape == (w.shape[0], 1, w.shape[2]) and up["kernel_scale"].dtype == jnp.float32
    absmax = np.abs(w).max(axis=1, keepdims=True)  # float64 reference: codes round(127·w/absmax)
    np.testing.assert_allclose(up["kernel_scale"], absmax, rtol=1e-6)
    want_codes = np.clip(np.round(w / absmax * 127), -127, 127)
    off = np.abs(np.asarray(up["kernel_int8"], np.float64) - want_codes)
    assert off.max() <= 1 and off.mean() < 1e-3  # fp32 rounding may flip an exact .5 tie
    assert np.abs(np.asarray(quantize.kernel_of(up, 1)) - w).max() <= (absmax / 127 / 2).max() * 1.001
    o = copy["layers"]["attn"]["o_proj"]  # [L, H, E, D], contracted (H, E): one scale per head and channel
    assert o["kernel_scale"].shape == (GAUSSIAN.num_layers, GAUSSIAN.num_heads, 1, GAUSSIAN.hidden_size)
    assert copy["embed"]["embedding"].dtype == jnp.bfloat16
    assert lora.bytes_of(copy) < 0.35 * lora.bytes_of(fp32)


@pytest.mark.parametrize("weights_dtype,logit_bound,logp_bound", [("bfloat16", 0.01, 0.01), ("int8", 0.02, 0.02)])
def test_lower_precision_logits_stay_near_fp32(fp32, weights_dtype, logit_bound, logp_bound):
    """Logits move by at most 1% (bf16) / 2% (int8) of their largest value, and the log-probs of the
    same tokens by at most 0.01 / 0.02 nats on average."""
    copy, config = rollout_weights(fp32, GAUSSIAN, weights_dtype), rollout_config(GAUSSIAN, weights_dtype)
    ref, got = logits(fp32, GAUSSIAN), logits(copy, config)
    assert 0 < np.abs(got - ref).max() / np.abs(ref).max() <= logit_bound
    tokens = np.random.default_rng(1).integers(1, 64, (3, 12)).astype(np.int32)
    mask = np.ones_like(tokens)
    copy_logp = np.asarray(score_tokens(copy, config, tokens, mask))
    assert np.abs(copy_logp - np.asarray(score_tokens(fp32, GAUSSIAN, tokens, mask)))[:, 1:].mean() <= logp_bound


@pytest.mark.parametrize("kind", [None, "nf4"])
def test_lora_and_qlora_policies_become_one_plain_model(kind):
    base = init_params(BASE, jax.random.key(0))
    adapted = lora.combine(lora.quantize_base(base, kind), trained_adapters())
    plain = plain_weights(adapted, CONFIG)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(plain)]
    assert not lora.is_quantized(plain) and not any("lora" in p for p in paths)
    np.testing.assert_allclose(logits(plain, BASE), logits(adapted, CONFIG), atol=2e-5)
    copy = rollout_weights(adapted, CONFIG, "bfloat16")
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), plain)
    bf16 = BASE.replace(dtype="bfloat16", param_dtype="bfloat16")
    np.testing.assert_array_equal(logits(copy, rollout_config(CONFIG, "bfloat16")), logits(cast, bf16))


@pytest.mark.parametrize("weights_dtype, tied", [("bfloat16", False), ("int8", False), ("bfloat16", True)])
def test_the_sampler_scores_the_copy_it_decodes(fp32, weights_dtype, tied):
    # The sampler's log-probs are the copy's own (against the copy's full forward pass); against
    # the fp32 trainer they differ: that gap is what `core.correction` measures. A tied bf16 head
    # and token lookup take their own paths in the sampler (`transformer.lm_logits`, `embedding_rows`).
    base = GAUSSIAN.replace(tie_word_embeddings=tied)
    fp32 = init_params(base, jax.random.key(1)) if tied else fp32
    copy, config = rollout_weights(fp32, base, weights_dtype), rollout_config(base, weights_dtype)
    sampling = SamplingConfig(max_new_tokens=8, n=2)
    out = generate(copy, [[5, 17, 3], [9, 8, 7, 6, 5]], jax.random.key(3), sampling, config)
    tokens = np.concatenate([out.prompt_tokens_RxP, out.tokens_RxN], 1)
    mask = np.concatenate([out.prompt_mask_RxP, out.mask_RxN], 1)
    P = out.prompt_tokens_RxP.shape[1]
    own = np.asarray(score_tokens(copy, config, tokens, mask))[:, P:] * out.mask_RxN
    trainer = np.asarray(score_tokens(fp32, base, tokens, mask))[:, P:] * out.mask_RxN
    sampled = np.asarray(out.logp_RxN) * out.mask_RxN
    np.testing.assert_allclose(sampled, own, atol=0.02)  # bf16 rounding of two evaluation orders
    assert np.abs(sampled - trainer).max() > 1e-4


def test_an_int8_run_with_tis_and_mis_logs_its_mismatch(tmp_path):
    config = load_config("configs/default.yaml", [
        f"run_dir={tmp_path}", "train.total_steps=2", "train.sft_warmup_steps=0", "train.eval_every=0",
        "data.eval_size=0", "sampling.weights_dtype=int8", "rollout_correction.is_level=token",
        "rollout_correction.mask_level=geometric", "rollout_correction.mask_low=0.9",
        "rollout_correction.mask_high=1.1",
    ])
    train(config, quiet=True)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if "mismatch/abs_logp_diff" in r]
    assert len(steps) == 2
    for row in steps:
        assert row["mismatch/abs_logp_diff"] > 0 and row["mismatch/ratio/min"] <= 1 <= row["mismatch/ratio/max"]
        assert 0 < row["correction/is_weight_mean"] and 0 <= row["correction/masked_fraction"] < 1
