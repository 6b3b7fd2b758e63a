"""Flax Linen decoder for the Llama / Mistral / Qwen2 / Qwen3 family, plus a scalar head.

Shape letters: B batch, T query length, S key/cache length, D embed, H query heads,
K key/value heads, G query heads per kv head (H // K), E head dim, F mlp, V vocab, L layers.

The model names only logical axes (`batch, length, embed, heads, kv_heads, head_dim, mlp,
vocab, layers`); `sharding.py` maps them to mesh axes.

One attention code path serves training, prefill and decoding: queries sit at cache slots
`cache_index + arange(T)`, keys at slots `arange(S)`, and a key is visible when its slot is
valid (`kv_mask_BxS`), not after the query's slot, and inside the sliding window if any.
Without a cache S = T and `cache_index` = 0, which is plain causal attention with padding.
With the cuDNN kernel (`attention="cudnn"`, or "auto" in bf16/fp16 on a GPU), the passes where
S = T (training, scoring, prefill) run the same mask through cuDNN's flash kernel instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxrl_llm.models import quantize

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
ATTENTION_KINDS = ("auto", "xla", "cudnn")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTIZED_NAMES = (*quantize.CODE_NAMES.values(), quantize.SCALE_NAME)
# The one name of the layer values the backward pass keeps (`_remat_policy`): every matmul's output
# the gradient needs, the rotated queries and keys, and each norm's [.., 1] statistics.
SAVED = "saved"
Cache = dict[str, jax.Array]  # {"k": [L,B,S,K,E], "v": [L,B,S,K,E]}
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


def contracted_axes(projection: str) -> int:
    """How many leading kernel axes a projection contracts: o_proj's (heads, head_dim), else one."""
    return 2 if projection == "o_proj" else 1


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the projections named by `targets` (names, "all-linear", or regular
    expressions matched against the projection names, as PEFT's `target_modules`)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all-linear",)
    rslora: bool = False  # scale α/√r (Kalajdzievski 2023) instead of α/r

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def targets_module(self, name: str) -> bool:
        return any(t == "all-linear" or re.fullmatch(t, name) for t in self.targets)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a decoder; hashable so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "llama"
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    qk_norm: bool = False  # Qwen3 normalises q and k per head before RoPE
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # one of REMAT_POLICIES
    # "xla": softmax(q·kᵀ)·v as einsums, on any backend. "cudnn": cuDNN's fused flash attention
    # for the full-sequence passes (training, scoring, prefill) on an NVIDIA GPU in bf16/fp16;
    # decoding steps keep the einsums. "auto": cudnn where it can run, else xla (`attention_kernel`).
    attention: str = "auto"
    lora: LoraConfig | None = None  # adapters on the projections; None: full fine-tuning

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})."
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is not one of {REMAT_POLICIES}.")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION_KINDS}.")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ValueError(
                "attention 'cudnn' needs bfloat16 or float16 compute; set dtype (model.dtype) to "
                "bfloat16, or use attention 'xla' for float32."
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_type {self.rope_type!r} is not supported; use {', '.join(ROPE_TYPES)}."
            )
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field} must be one of {', '.join(DTYPES)}.")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def attention_kernel(self) -> str:
        """The kernel that runs: "auto" is cuDNN's for half-precision compute on an NVIDIA GPU (it
        matched the einsums there and was the faster, benchmarks/RESULTS.md), else the einsums."""
        if self.attention != "auto":
            return self.attention
        return "cudnn" if self.dtype != "float32" and jax.default_backend() == "gpu" else "xla"


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [E/2], with linear or Llama-3 scaling (HF `rope_init_fn`s)."""
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float32) / config.head_dim
    inv_freq = (1.0 / (config.rope_theta**exponents)).astype(np.float32)
    if config.rope_type == "linear":
        return inv_freq / config.rope_factor
    if config.rope_type == "llama3":
        # Llama 3.1: leave high frequencies, divide low ones by `factor`, blend in between.
        old_len = config.rope_original_max_position
        low_wavelen = old_len / config.rope_low_freq_factor
        high_wavelen = old_len / config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / config.rope_factor, inv_freq)
        smooth = (old_len / wavelen - config.rope_low_freq_factor) / (
            config.rope_high_freq_factor - config.rope_low_freq_factor
        )
        blended = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, blended, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions_BxT: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B,T,E] for the half-rotation convention of HF Llama."""
    angles_BxTxE2 = positions_BxT.astype(jnp.float32)[..., None] * rope_inv_freq(config)
    angles_BxTxE = jnp.concatenate([angles_BxTxE2, angles_BxTxE2], axis=-1)
    return jnp.cos(angles_BxTxE), jnp.sin(angles_BxTxE)


def apply_rope(x_BxTxNxE: jax.Array, cos_BxTxE: jax.Array, sin_BxTxE: jax.Array) -> jax.Array:
    """x·cos + rotate_half(x)·sin, computed in fp32 and cast back."""
    x = x_BxTxNxE.astype(jnp.float32)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    out = x * cos_BxTxE[:, :, None, :] + rotated * sin_BxTxE[:, :, None, :]
    return out.astype(x_BxTxNxE.dtype)


def attention_mask(
    kv_mask_BxS: jax.Array, cache_index: jax.Array | int, num_queries: int, sliding_window: int | None
) -> jax.Array:
    """Boolean [B,T,S]: key slot valid, not after the query slot, inside the window.

    `cache_index` is one slot for every row, or one per row ([B]: rows of a multi-turn rollout
    fill their caches at their own pace)."""
    query_slot_1xT = jnp.atleast_2d(jnp.asarray(cache_index)[..., None] + jnp.arange(num_queries))
    key_slot_S = jnp.arange(kv_mask_BxS.shape[1])
    visible_1xTxS = key_slot_S <= query_slot_1xT[..., None]
    if sliding_window is not None:
        visible_1xTxS &= query_slot_1xT[..., None] - key_slot_S < sliding_window
    return visible_1xTxS & kv_mask_BxS[:, None, :].astype(bool)


def layer_inputs(positions_BxT, kv_mask_BxS, cache_index, num_queries: int, config: "ModelConfig"):
    """(cos_BxTxE, sin_BxTxE, mask_BxTxS): what every layer of one pass shares."""
    cos_BxTxE, sin_BxTxE = rope_cos_sin(positions_BxT, config)
    return cos_BxTxE, sin_BxTxE, attention_mask(kv_mask_BxS, cache_index, num_queries, config.sliding_window)


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _kernel_init(config: ModelConfig, names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · scale, with the statistics in fp32 (as HF does)."""

    eps: float
    dtype: str
    param_dtype: str
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            _dtype(self.param_dtype),
        )
        x32 = x.astype(jnp.float32)
        mean_sq = checkpoint_name(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps, SAVED)
        normed = x32 * checkpoint_name(jax.lax.rsqrt(mean_sq), SAVED)
        return scale.astype(_dtype(self.dtype)) * normed.astype(_dtype(self.dtype))


class Projection(nn.Module):
    """x's trailing axes contracted with the kernel's leading `contract` axes (+ bias), like DenseGeneral,
    plus a LoRA update when the params hold one and a kernel stored quantised (`models.quantize`).

    The product runs as one 2-D matmul over flattened rows and features: XLA CPU lays out the
    backward of a matmul with several batch or contracting axes through slow transposing copies
    (a training step was ~17% slower). Flax's DenseGeneral would flatten its kernel at init, which
    breaks the kernel's logical sharding under a mesh; this kernel keeps its shape.

    LoRA (Hu et al. 2021, arXiv 2106.09685): y = x·W + s·(dropout(x)·A)·B with A [features, r],
    B [r, out], s = α/r (or α/√r, rsLoRA), applied unmerged so that no gradient of W is computed.
    The adapters are params `lora_a`, `lora_b` beside the kernel; init creates them when
    `config.lora` targets this projection, and apply uses them when present, so the same module
    without them is the base model (the reference of a LoRA run).
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    config: ModelConfig
    contract: int = 1
    bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype, param_dtype = _dtype(self.config.dtype), _dtype(self.config.param_dtype)
        features, out_shape = math.prod(self.shape[: self.contract]), self.shape[self.contract :]
        rows = x.shape[: x.ndim - self.contract]
        x_NxF = x.reshape(-1, features).astype(dtype)
        # fp32 accumulation whatever the compute dtype (a bf16 rollout copy's "fp32 accumulate").
        kernel_FxO = self._kernel(param_dtype).reshape(features, -1).astype(dtype)
        y = jnp.dot(x_NxF, kernel_FxO, preferred_element_type=jnp.float32).astype(dtype)
        if self.bias:
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.contract :])
            y = y + self.param("bias", bias_init, out_shape, param_dtype).reshape(-1).astype(dtype)
        lora = self.config.lora
        if lora is not None and lora.targets_module(self.name) and (
            self.is_initializing() or self.has_variable("params", "lora_a")
        ):
            y = y + self._lora_update(x_NxF, lora, features, param_dtype)
        return y.reshape(*rows, *out_shape)

    def _kernel(self, param_dtype) -> jax.Array:
        """The kernel, dequantised in the compute dtype when the params hold it quantised."""
        stored = {name: self.get_variable("params", name) for name in QUANTIZED_NAMES
                  if self.has_variable("params", name)}
        if stored:
            return quantize.kernel_of(stored, self.contract - 1, _dtype(self.config.dtype))
        return self.param("kernel", _kernel_init(self.config, self.axes), self.shape, param_dtype)

    def _lora_update(self, x_NxF, lora: "LoraConfig", features: int, param_dtype) -> jax.Array:
        """s·(dropout(x)·A)·B [N, out]; dropout only when the apply call passes a "dropout" rng."""
        dtype, contract = _dtype(self.config.dtype), self.contract
        # PEFT's default: A ~ kaiming_uniform(a=√5), i.e. U(±1/√fan_in); B = 0 so the update starts at 0.
        bound = 1.0 / math.sqrt(features)
        a_init = nn.with_logical_partitioning(
            lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound),
            self.axes[:contract] + ("lora_rank",),
        )
        a = self.param("lora_a", a_init, self.shape[:contract] + (lora.rank,), param_dtype)
        b = self.param(
            "lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank",) + self.axes[contract:]),
            (lora.rank,) + self.shape[contract:], param_dtype,
        )
        if lora.dropout > 0 and self.has_rng("dropout"):
            x_NxF = nn.Dropout(lora.dropout, deterministic=False)(x_NxF)
        low_NxR = x_NxF @ a.reshape(features, lora.rank).astype(dtype)
        return (low_NxR @ b.reshape(lora.rank, -1).astype(dtype)) * jnp.asarray(lora.scale, dtype)


@jax.checkpoint
def _attend(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS):
    """softmax(q·kᵀ/√E + mask)·v per kv-head group; recomputed in the backward pass."""
    # Rematerialised: keeping the [B,K,G,T,S] scores and probabilities of every layer for the
    # backward costs more memory and copying (on CPU) than recomputing two small matmuls.
    B, T, H, E = q_BxTxHxE.shape
    K = k_BxSxKxE.shape[2]
    q_BxTxKxGxE = q_BxTxHxE.reshape(B, T, K, H // K, E)
    scores_BxKxGxTxS = jnp.einsum(
        "btkge,bske->bkgts", q_BxTxKxGxE, k_BxSxKxE, preferred_element_type=jnp.float32
    ) / math.sqrt(E)
    # A finite fill keeps fully masked rows (padding queries) finite instead of NaN.
    scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(q_BxTxHxE.dtype)
    out_BxTxKxGxE = jnp.einsum("bkgts,bske->btkge", probs_BxKxGxTxS, v_BxSxKxE)
    return out_BxTxKxGxE.reshape(B, T, H, E)


def _attend_cudnn(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, mask_BxTxT):
    """The same attention through cuDNN's flash kernel (GPU, bf16/fp16, keys at the query slots)."""
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"attention 'cudnn' runs on an NVIDIA GPU only; this backend is {jax.default_backend()!r}. "
            "Use attention 'xla' (model.attention) here."
        )
    # is_causal lets the kernel skip the blocks above the diagonal; the boolean mask (padding,
    # sliding window; a bias of large negatives in cuDNN) keeps exactly the keys `_attend` sees.
    return jax.nn.dot_product_attention(
        q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, mask=mask_BxTxT[:, None], is_causal=True, implementation="cudnn"
    )


def write_cache(cache_BxSxKxE, new_BxTxKxE, cache_index) -> jax.Array:
    """The T new keys (or values) written at slot `cache_index` onward: one slot for all rows, or one
    per row ([B]), where slots past S are dropped rather than shifting the write back."""
    new_BxTxKxE = new_BxTxKxE.astype(cache_BxSxKxE.dtype)
    if jnp.ndim(cache_index) == 0:
        return jax.lax.dynamic_update_slice(cache_BxSxKxE, new_BxTxKxE, (0, cache_index, 0, 0))
    slots_BxT = cache_index[:, None] + jnp.arange(new_BxTxKxE.shape[1])
    rows_Bx1 = jnp.arange(cache_BxSxKxE.shape[0])[:, None]
    return cache_BxSxKxE.at[rows_Bx1, slots_BxT].set(new_BxTxKxE, mode="drop")


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional qkv bias and q/k norm, and a KV cache."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, cos_BxTxE, sin_BxTxE, mask_BxTxS, layer_cache, cache_index):
        cfg = self.config
        dtype = _dtype(cfg.dtype)

        def projection(name, heads, head_axis):
            return Projection(
                (cfg.hidden_size, heads, cfg.head_dim), ("embed", head_axis, "head_dim"), cfg,
                bias=cfg.attention_bias, name=name,
            )

        q_BxTxHxE = projection("q_proj", cfg.num_heads, "heads")(x_BxTxD)
        k_BxTxKxE = projection("k_proj", cfg.num_kv_heads, "kv_heads")(x_BxTxD)
        v_BxTxKxE = checkpoint_name(projection("v_proj", cfg.num_kv_heads, "kv_heads")(x_BxTxD), SAVED)
        if cfg.qk_norm:
            # The norms' backward needs q and k as projected: keep them rather than redo the matmuls.
            q_BxTxHxE, k_BxTxKxE = checkpoint_name(q_BxTxHxE, SAVED), checkpoint_name(k_BxTxKxE, SAVED)
            norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
            q_BxTxHxE = RMSNorm(**norm, axis_name="head_dim", name="q_norm")(q_BxTxHxE)
            k_BxTxKxE = RMSNorm(**norm, axis_name="head_dim", name="k_norm")(k_BxTxKxE)
        # Kept after the rotation: recomputing it in the backward let XLA CPU fuse it differently
        # in the forward too, which moved the fp32 loss in its last bits.
        q_BxTxHxE = checkpoint_name(apply_rope(q_BxTxHxE, cos_BxTxE, sin_BxTxE), SAVED)
        k_BxTxKxE = checkpoint_name(apply_rope(k_BxTxKxE, cos_BxTxE, sin_BxTxE), SAVED)
        q_BxTxHxE = nn.with_logical_constraint(q_BxTxHxE, ("batch", "length", "heads", "head_dim"))

        if layer_cache is None:
            k_BxSxKxE, v_BxSxKxE, new_cache = k_BxTxKxE, v_BxTxKxE, None
        else:
            new_cache = {
                "k": write_cache(layer_cache["k"], k_BxTxKxE, cache_index),
                "v": write_cache(layer_cache["v"], v_BxTxKxE, cache_index),
            }
            k_BxSxKxE, v_BxSxKxE = new_cache["k"], new_cache["v"]
        kv_axes = ("batch", "length", "kv_heads", "head_dim")
        k_BxSxKxE = nn.with_logical_constraint(k_BxSxKxE, kv_axes)
        v_BxSxKxE = nn.with_logical_constraint(v_BxSxKxE, kv_axes)

        k_BxSxKxE, v_BxSxKxE = k_BxSxKxE.astype(dtype), v_BxSxKxE.astype(dtype)
        # With S == T the keys sit at the query slots (no cache, or a prefill filling its cache).
        if cfg.attention_kernel == "cudnn" and k_BxSxKxE.shape[1] == q_BxTxHxE.shape[1] > 1:
            out_BxTxHxE = _attend_cudnn(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS)
        else:
            out_BxTxHxE = _attend(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS)
        out_BxTxHxE = checkpoint_name(out_BxTxHxE, SAVED)
        out_BxTxD = Projection(
            (cfg.num_heads, cfg.head_dim, cfg.hidden_size), ("heads", "head_dim", "embed"), cfg,
            contract=2, name="o_proj",
        )(out_BxTxHxE)
        return checkpoint_name(out_BxTxD, SAVED), new_cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)), as 2-D matmuls over the flattened rows (see Projection)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        B, T, D = x_BxTxD.shape
        x_NxD = x_BxTxD.reshape(B * T, D)
        gate_NxF = Projection((D, cfg.intermediate_size), ("embed", "mlp"), cfg, name="gate_proj")(x_NxD)
        up_NxF = Projection((D, cfg.intermediate_size), ("embed", "mlp"), cfg, name="up_proj")(x_NxD)
        gate_NxF, up_NxF = checkpoint_name(gate_NxF, SAVED), checkpoint_name(up_NxF, SAVED)
        hidden_NxF = nn.with_logical_constraint(nn.silu(gate_NxF) * up_NxF, ("batch", "mlp"))
        down_NxD = Projection((cfg.intermediate_size, D), ("mlp", "embed"), cfg, name="down_proj")(hidden_NxF)
        return down_NxD.reshape(B, T, D)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, layer_cache, cos_BxTxE, sin_BxTxE, mask_BxTxS, cache_index):
        cfg = self.config
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        attn_BxTxD, new_cache = Attention(cfg, name="attn")(
            RMSNorm(**norm, name="input_norm")(x_BxTxD),
            cos_BxTxE, sin_BxTxE, mask_BxTxS, layer_cache, cache_index,
        )
        x_BxTxD = x_BxTxD + attn_BxTxD
        x_BxTxD = x_BxTxD + MLP(cfg, name="mlp")(RMSNorm(**norm, name="post_attn_norm")(x_BxTxD))
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))
        return x_BxTxD, new_cache


def _remat_policy(name: str):
    """What the backward pass keeps of each layer (None: only its input)."""
    return {
        # No matmul is redone, only the elementwise work between them: the layer keeps its input and
        # the SAVED values (q, k, v, attention output, o/gate/up projections, norm statistics).
        # Saving every intermediate instead (autodiff's default) kept six [B·T, F] MLP arrays
        # (silu's pieces, the product), the normed inputs once per projection that reads them and
        # reshaped copies of the attention kernels: on SmolLM2, batch 4 x 256 fp32, 2.7 GB of
        # temporaries where this keeps 1.5 GB, with the same losses and gradients to the bit.
        "none": jax.checkpoint_policies.save_only_these_names(SAVED),
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[name]


class Transformer(nn.Module):
    """Decoder-only LM. Returns (logits_BxTxV or final hidden_BxTxD, updated cache or None).

    Args of `__call__`:
      tokens_BxT: token ids.
      positions_BxT: RoPE positions (for left padding: cumsum(mask) - 1).
      kv_mask_BxS: 1 where a key slot holds a real token. Without a cache S = T and it is the
        padding mask; with a cache it covers every cache slot, including the new ones.
      cache: {"k","v"} of [L,B,S,K,E] or None; the T new keys are written at `cache_index`.
      return_hidden: return the final-normed hidden states instead of logits (for the chunked
        log-prob path of `core.logprobs` and for scalar heads).
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self, tokens_BxT, positions_BxT, kv_mask_BxS, cache: Cache | None = None,
        cache_index: jax.Array | int = 0, return_hidden: bool = False,
    ):
        cfg = self.config
        dtype, param_dtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")
            ),
            name="embed",
        )
        x_BxTxD = nn.with_logical_constraint(embed(tokens_BxT), ("batch", "length", "embed"))
        cos_BxTxE, sin_BxTxE, mask_BxTxS = layer_inputs(
            positions_BxT, kv_mask_BxS, cache_index, tokens_BxT.shape[1], cfg
        )

        layer = nn.remat(DecoderLayer, policy=_remat_policy(cfg.remat), prevent_cse=False)
        layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        x_BxTxD, new_cache = layers(x_BxTxD, cache, cos_BxTxE, sin_BxTxE, mask_BxTxS, cache_index)
        hidden_BxTxD = RMSNorm(
            cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm"
        )(x_BxTxD)
        if return_hidden:
            return hidden_BxTxD, new_cache
        if cfg.tie_word_embeddings:
            logits_BxTxV = embed.attend(hidden_BxTxD)
        else:
            logits_BxTxV = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                kernel_init=_kernel_init(cfg, ("embed", "vocab")), name="lm_head",
            )(hidden_BxTxD)
        return nn.with_logical_constraint(logits_BxTxV, ("batch", "length", "vocab")), new_cache


class ScalarModel(nn.Module):
    """Backbone + linear head giving one scalar per position: a value or reward model.

    Params are {"model": backbone (an LM's params without `lm_head`), "head": {kernel, bias}},
    so a policy or SFT checkpoint can seed the backbone directly.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, kv_mask_BxS):
        hidden_BxTxD, _ = Transformer(self.config, name="model")(
            tokens_BxT, positions_BxT, kv_mask_BxS, return_hidden=True
        )
        # OpenAI (Ziegler et al. 2019) initialise the reward head with std 1/sqrt(D+1).
        head = nn.Dense(
            1, dtype=jnp.float32, param_dtype=_dtype(self.config.param_dtype),
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(1.0 / math.sqrt(self.config.hidden_size + 1)),
                ("embed", None),
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
            name="head",
        )
        return head(hidden_BxTxD.astype(jnp.float32))[..., 0]


def lm_head_weight(params: dict, config: ModelConfig) -> jax.Array:
    """The [D,V] output projection: the embedding's transpose when tied."""
    if config.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def lm_logits(params: dict, hidden_BxD: jax.Array, config: ModelConfig) -> jax.Array:
    """Logits [B,V] in fp32 from final-normed hidden states."""
    if config.tie_word_embeddings and hidden_BxD.dtype.itemsize == 2:
        # The embedding as the left operand: XLA CPU runs a bf16 matmul contracting the right
        # operand's minor axis in fp32, over an fp32 copy of the whole table made every call.
        embedding_VxD = params["embed"]["embedding"].astype(hidden_BxD.dtype)
        return jnp.einsum("vd,bd->bv", embedding_VxD, hidden_BxD, preferred_element_type=jnp.float32)
    head_DxV = lm_head_weight(params, config).astype(hidden_BxD.dtype)
    return jnp.einsum("bd,dv->bv", hidden_BxD, head_DxV, preferred_element_type=jnp.float32)


def unstack_layers(params: dict, config: ModelConfig) -> list[dict]:
    """The stacked [L, ...] layer params as L per-layer trees, for `decode_step`."""
    # Scanning stacked weights makes XLA CPU copy each layer's slice at every decode step, which
    # took longer than the matmuls; slicing once per generation and unrolling the layers avoids it.
    return [jax.tree.map(operator.itemgetter(i), params["layers"]) for i in range(config.num_layers)]


def embedding_rows(embedding_VxD: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
    """The embedding's rows for `tokens_BxT` [B,T,D]."""
    if embedding_VxD.dtype.itemsize != 2:
        return jnp.take(embedding_VxD, tokens_BxT, axis=0)
    # A 16-bit float table is gathered as its bits: XLA CPU gathers bf16 from an fp32 copy of the
    # whole table, made on every call.
    bits_VxD = jax.lax.bitcast_convert_type(embedding_VxD, jnp.uint16)
    return jax.lax.bitcast_convert_type(jnp.take(bits_VxD, tokens_BxT, axis=0), embedding_VxD.dtype)


def decode_step(
    params: dict, layers: list[dict], tokens_BxT, positions_BxT, kv_mask_BxS, caches: list[Cache],
    cache_index, config: ModelConfig,
) -> tuple[jax.Array, list[Cache]]:
    """`Transformer(config)(..., return_hidden=True)` unrolled over `unstack_layers` and one KV cache
    {"k","v"} [B,S,K,E] per layer: the sampler's step (the same layers, norms and masks)."""
    x_BxTxD = embedding_rows(params["embed"]["embedding"], tokens_BxT).astype(config.dtype)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))
    cos_BxTxE, sin_BxTxE, mask_BxTxS = layer_inputs(
        positions_BxT, kv_mask_BxS, cache_index, tokens_BxT.shape[1], config
    )
    new_caches = []
    for layer_params, cache in zip(layers, caches):
        x_BxTxD, cache = DecoderLayer(config).apply(
            {"params": layer_params}, x_BxTxD, cache, cos_BxTxE, sin_BxTxE, mask_BxTxS, cache_index
        )
        new_caches.append(constrain_layer_cache(cache))
    final_norm = RMSNorm(config.rms_norm_eps, config.dtype, config.param_dtype)
    return final_norm.apply({"params": params["final_norm"]}, x_BxTxD), new_caches


def constrain_layer_cache(cache: Cache) -> Cache:
    """One layer's {"k","v"} [B,S,K,E], named like the model's cache without its layer axis."""
    return jax.tree.map(lambda c_BxSxKxE: nn.with_logical_constraint(c_BxSxKxE, CACHE_AXES[1:]), cache)


def positions_from_mask(mask_BxT: jax.Array) -> jax.Array:
    """RoPE positions for left- or right-padded rows: count of real tokens before each slot."""
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def init_cache(config: ModelConfig, batch_size: int, cache_len: int, dtype: str | None = None) -> Cache:
    """Zeroed KV cache {"k","v"}: [L,B,S,K,E] in the compute dtype unless given."""
    shape = (config.num_layers, batch_size, cache_len, config.num_kv_heads, config.head_dim)
    cache_dtype = _dtype(dtype or config.dtype)
    return {"k": jnp.zeros(shape, cache_dtype), "v": jnp.zeros(shape, cache_dtype)}



@functools.partial(jax.jit, static_argnames=("config", "scalar_head"))
def init_params(config: ModelConfig, key: jax.Array, scalar_head: bool = False) -> dict:
    """Random params (unboxed) for an LM or, with `scalar_head`, a value/reward model."""
    # Jitted: run eagerly, the scanned layers' initialisers dispatch op by op (~10 s on CPU).
    module = ScalarModel(config) if scalar_head else Transformer(config)
    tokens_1x1 = jnp.zeros((1, 1), jnp.int32)
    variables = module.init(key, tokens_1x1, tokens_1x1, jnp.ones((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])


def param_logical_axes(config: ModelConfig, scalar_head: bool = False) -> dict:
    """Pytree of logical axis-name tuples matching `init_params` (shape-only, no compute)."""
    module = ScalarModel(config) if scalar_head else Transformer(config)
    tokens_1x1 = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(
        lambda: module.init(jax.random.key(0), tokens_1x1, tokens_1x1, jnp.ones((1, 1), jnp.int32))
    )
    return nn.get_partition_spec(abstract)["params"]
