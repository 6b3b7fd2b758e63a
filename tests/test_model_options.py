"""The model's numerics options: remat policies and the attention kernel give the same math.

The cuDNN comparison needs an NVIDIA GPU and is skipped elsewhere (`benchmarks/gpu_check.sh`
runs it on a lent one); on the CPU the option's errors are checked.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.config import ConfigError, load_config
from jaxrl_llm.models.transformer import REMAT_POLICIES, ModelConfig, Transformer, init_params

TINY = dict(
    vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=64, tie_word_embeddings=True,
)
ON_GPU = jax.default_backend() == "gpu"


def padded_batch(B=4, T=24, seed=0):
    """Tokens and a mask: row 0 unpadded, row 1 left-padded, row 2 right-padded, row 3 both."""
    rng = np.random.default_rng(seed)
    tokens_BxT = rng.integers(0, TINY["vocab_size"], (B, T)).astype(np.int32)
    t_T = np.arange(T)
    mask_BxT = np.stack([t_T >= 0, t_T >= 5, t_T < T - 7, (t_T >= 3) & (t_T < T - 2)]).astype(np.int32)
    return jnp.asarray(tokens_BxT), jnp.asarray(mask_BxT[:B])


def loss_and_grads(config, params, tokens_BxT, mask_BxT):
    """Masked mean log-likelihood of the tokens and its gradient (fp32 reduction)."""
    positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, -1) - 1, 0)

    def loss(p):
        logits_BxTxV, _ = Transformer(config).apply({"params": p}, tokens_BxT, positions_BxT, mask_BxT)
        logp_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), -1)
        picked_BxT = jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], -1)[..., 0]
        weight_BxT = (mask_BxT[:, 1:] * mask_BxT[:, :-1]).astype(jnp.float32)
        return -(picked_BxT * weight_BxT).sum() / weight_BxT.sum()

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", [r for r in REMAT_POLICIES if r != "none"])
def test_remat_policies_change_memory_not_math(remat):
    config = ModelConfig(**TINY)
    params = init_params(config, jax.random.key(0))
    batch = padded_batch()
    loss, grads = loss_and_grads(config, params, *batch)
    remat_loss, remat_grads = loss_and_grads(config.replace(remat=remat), params, *batch)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat_grads, grads)


def test_cudnn_attention_needs_half_precision():
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        ModelConfig(**TINY, attention="cudnn")
    with pytest.raises(ValueError, match="not one of"):
        ModelConfig(**TINY, attention="flash")
    with pytest.raises(ConfigError, match="model.attention=cudnn needs half-precision compute"):
        load_config(overrides=["model.attention=cudnn"])
    assert load_config(overrides=["model.attention=cudnn", "model.dtype=bfloat16"]).model.attention == "cudnn"


def test_auto_attention_is_cudnn_for_half_precision_on_a_gpu(monkeypatch):
    half = ModelConfig(**TINY, dtype="bfloat16")
    assert half.attention == "auto" and load_config().model.attention == "auto"
    assert half.attention_kernel == ("cudnn" if ON_GPU else "xla")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert half.attention_kernel == "cudnn"
    assert half.replace(dtype="float16").attention_kernel == "cudnn"
    assert half.replace(dtype="float32").attention_kernel == "xla"
    assert half.replace(attention="xla").attention_kernel == "xla"


@pytest.mark.skipif(ON_GPU, reason="checks the error off the GPU")
def test_cudnn_attention_off_the_gpu_names_the_fix():
    config = ModelConfig(**TINY, dtype="bfloat16", attention="cudnn")
    params = init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="NVIDIA GPU only.*attention 'xla'"):
        loss_and_grads(config, params, *padded_batch())


@pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("window", [None, 6])
def test_cudnn_attention_matches_xla_on_gpu(window):
    """Same loss, gradients and real-token logits as the einsum attention, within bf16 rounding."""
    xla = ModelConfig(**TINY, dtype="bfloat16", param_dtype="float32", sliding_window=window, attention="xla")
    cudnn = xla.replace(attention="cudnn")
    params = init_params(xla, jax.random.key(1))
    tokens_BxT, mask_BxT = padded_batch(T=64)
    loss, grads = loss_and_grads(xla, params, tokens_BxT, mask_BxT)
    cudnn_loss, cudnn_grads = loss_and_grads(cudnn, params, tokens_BxT, mask_BxT)
    np.testing.assert_allclose(cudnn_loss, loss, rtol=2e-2)

    def relative(a, b):
        return float(jnp.linalg.norm((a - b).ravel()) / (jnp.linalg.norm(b.ravel()) + 1e-12))

    errors = jax.tree.map(relative, cudnn_grads, grads)
    assert max(jax.tree.leaves(errors)) < 5e-2, errors

    positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, -1) - 1, 0)
    logits = {
        name: Transformer(cfg).apply({"params": params}, tokens_BxT, positions_BxT, mask_BxT)[0]
        for name, cfg in (("xla", xla), ("cudnn", cudnn))
    }
    real_BxT = mask_BxT.astype(bool)
    assert relative(logits["cudnn"][real_BxT].astype(jnp.float32), logits["xla"][real_BxT].astype(jnp.float32)) < 2e-2
