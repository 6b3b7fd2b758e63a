"""LoRA and QLoRA: the adapted model against the base and the merged one, steps that move only the
adapters, the base as the reference, quantisation against NumPy, sampler parity, PEFT both ways,
and runs that checkpoint only the adapters and resume exactly."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxrl_llm.algorithms.common import score_tokens
from jaxrl_llm.algorithms.grpo import GRPOState, make_grpo_step
from jaxrl_llm.algorithms.sft import make_sft_step
from jaxrl_llm.config import GRPOSection, load_config
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.models import lora, peft, quantize
from jaxrl_llm.models.transformer import LoraConfig, ModelConfig, Transformer, init_params, positions_from_mask
from jaxrl_llm.sampling import SamplingConfig, generate
from jaxrl_llm.state import TrainState, make_optimizer

pytestmark = pytest.mark.usefixtures("xla_disk_cache")  # see conftest.py

BASE = ModelConfig(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, initializer_range=0.2, max_position_embeddings=64,
)
CONFIG = BASE.replace(lora=LoraConfig(rank=4, alpha=8.0))
TOKENS = np.random.default_rng(0).integers(1, 64, (3, 12)).astype(np.int32)
MASK = (np.arange(12)[None] >= np.array([0, 4, 9])[:, None]).astype(np.int32)  # left-padded rows


def logits(params, config, tokens=TOKENS, mask=MASK):
    out, _ = Transformer(config).apply({"params": params}, tokens, positions_from_mask(mask), mask)
    return np.asarray(out, np.float64)


def trained_adapters(seed=1):
    """Adapters as after some training: B ≠ 0, so the update is not zero."""
    adapters = lora.init_adapters(CONFIG, jax.random.key(seed))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed + 1), x.shape), adapters)


@pytest.fixture(scope="module")
def base():
    return init_params(BASE, jax.random.key(0))


def test_fresh_adapters_give_the_base_models_logits_exactly(base):
    adapters = lora.init_adapters(CONFIG, jax.random.key(1))
    np.testing.assert_array_equal(logits(lora.combine(base, adapters), CONFIG), logits(base, BASE))
    # PEFT's initialisation: B = 0, A ~ U(±1/√fan_in) (o_proj's fan-in is H·E), every target adapted.
    q, o = adapters["layers"]["attn"]["q_proj"], adapters["layers"]["attn"]["o_proj"]
    assert not np.any(q["lora_b"]) and q["lora_a"].shape == (2, 64, 4) and o["lora_a"].shape == (2, 4, 16, 4)
    assert 0.8 / 8 < np.abs(q["lora_a"]).max() <= 1 / 8 and np.abs(o["lora_a"]).max() <= 1 / 8
    assert set(adapters["layers"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("rslora", [False, True])
def test_the_adapted_forward_equals_the_merged_weights_and_unmerge_restores_the_base(base, rslora):
    config = CONFIG.replace(lora=LoraConfig(4, 8.0, rslora=rslora))
    adapters = trained_adapters()
    adapted = logits(lora.combine(base, adapters), config)
    merged = lora.merge(lora.combine(base, adapters), config)
    np.testing.assert_allclose(logits(merged, BASE), adapted, atol=2e-5)
    assert np.abs(adapted - logits(base, BASE)).max() > 0.1  # the adapters do change the model
    # W + s·A·B per layer against a float64 product, with s = α/r or α/√r
    a, b = (np.asarray(adapters["layers"]["mlp"]["up_proj"][n], np.float64) for n in ("lora_a", "lora_b"))
    scale = 8.0 / (2.0 if rslora else 4.0)
    want = np.asarray(base["layers"]["mlp"]["up_proj"]["kernel"], np.float64) + scale * np.einsum("lir,lro->lio", a, b)
    np.testing.assert_allclose(merged["layers"]["mlp"]["up_proj"]["kernel"], want, atol=1e-5)
    restored = lora.unmerge(merged, adapters, config)
    for got, was in zip(jax.tree.leaves(restored), jax.tree.leaves(base)):
        np.testing.assert_allclose(got, was, atol=1e-6)


def test_targets_names_and_patterns(base):
    config = BASE.replace(lora=LoraConfig(2, 4.0, targets=("(q|v)_proj",)))
    adapters = lora.init_adapters(config, jax.random.key(0))
    assert set(adapters["layers"]) == {"attn"} and set(adapters["layers"]["attn"]) == {"q_proj", "v_proj"}
    assert lora.count_params(adapters) == 2 * (64 * 2 + 2 * 64 + 64 * 2 + 2 * 32)


def test_a_step_moves_only_the_adapters_and_keeps_the_base_bit_identical(base):
    from test_algorithms_offline import sequence_batch

    batch = sequence_batch(0, B=4)
    batch = batch.replace(tokens_BxT=batch.tokens_BxT % 64)
    state = TrainState.create(trained_adapters(), make_optimizer(1e-2, 10), frozen=base)
    host_base = jax.device_get(base)
    step = jax.jit(make_sft_step(CONFIG, num_microbatches=2))
    new, metrics = step(state, batch, jax.random.key(0))
    for got, was in zip(jax.tree.leaves(new.frozen), jax.tree.leaves(host_base)):
        np.testing.assert_array_equal(got, was)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params))]
    assert all(changed) and np.isfinite(metrics["loss"])
    # Optimizer state exists for the adapters only.
    assert lora.count_params(new.opt_state) == 2 * lora.count_params(new.params) + 2
    # The same step in full fine-tuning of the merged tree has the same loss (same model).
    full = jax.jit(make_sft_step(CONFIG))(TrainState.create(lora.combine(base, state.params), make_optimizer(1e-2, 10)),
                                          batch, jax.random.key(0))[1]
    np.testing.assert_allclose(metrics["loss"], full["loss"], rtol=1e-6)


def test_the_base_with_adapters_off_is_the_reference(base):
    """A LoRA GRPO step with no reference params uses the base: identical to passing a separately
    made copy of the base as the reference."""
    from test_grpo import rollout

    batch = rollout(0, prompts=2)
    batch = batch.replace(tokens_RxT=batch.tokens_RxT % 64)
    cfg = GRPOSection(group_size=4, kl_coef=0.1, num_iterations=2)
    step = jax.jit(make_grpo_step(CONFIG, cfg))
    adapters = trained_adapters()
    policy = TrainState.create(adapters, make_optimizer(1e-3, 10), frozen=base)
    with_base, m1 = step(GRPOState(policy, None), batch, jax.random.key(0))
    separate = jax.tree.map(jnp.array, init_params(BASE, jax.random.key(0)))  # loaded again, own buffers
    with_copy, m2 = step(GRPOState(policy, separate), batch, jax.random.key(0))
    assert m1["kl"] > 0
    for name in m1:
        np.testing.assert_allclose(m1[name], m2[name], rtol=1e-6, atol=1e-7, err_msg=name)
    for a, b in zip(jax.tree.leaves(with_base.policy.params), jax.tree.leaves(with_copy.policy.params)):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_dropout_draws_from_the_step_key_only_when_on(base):
    from test_algorithms_offline import sequence_batch

    batch = sequence_batch(0, B=4)
    batch = batch.replace(tokens_BxT=batch.tokens_BxT % 64)
    loss = lambda config, key: jax.jit(make_sft_step(config))(
        TrainState.create(trained_adapters(), make_optimizer(1e-2, 10), frozen=base), batch, key)[1]["loss"]
    dropping = CONFIG.replace(lora=LoraConfig(4, 8.0, dropout=0.5))
    assert loss(dropping, jax.random.key(0)) != loss(dropping, jax.random.key(1))
    assert loss(dropping, jax.random.key(0)) == loss(dropping, jax.random.key(0))
    assert loss(CONFIG, jax.random.key(0)) == loss(CONFIG, jax.random.key(1))
    # Scoring (no key) is deterministic: dropout is a training-forward thing.
    params = lora.combine(base, trained_adapters())
    np.testing.assert_array_equal(score_tokens(params, dropping, TOKENS, MASK),
                                  score_tokens(params, CONFIG, TOKENS, MASK))


# ---------------------------------------------------------------- quantisation


def numpy_blockwise(w, kind, axis):
    """Float64 reference: blocks of min(64, 2^k | n) along `axis`, absmax scale, nearest code."""
    w = np.moveaxis(np.asarray(w, np.float64), axis, 0)
    n = w.shape[0]
    block = int(np.gcd(n, 64))
    blocks = w.reshape(n // block, block, *w.shape[1:])
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    normed = blocks / np.where(absmax == 0, 1, absmax)
    if kind == "int8":
        values = np.clip(np.round(normed * 127), -127, 127) / 127
    else:
        book = quantize.NF4_CODEBOOK.astype(np.float64)
        values = book[np.abs(normed[..., None] - book).argmin(-1)]
    return np.moveaxis((values * absmax).reshape(w.shape), 0, axis)


@pytest.mark.parametrize("kind", quantize.KINDS)
@pytest.mark.parametrize("shape,axis", [((128, 4, 16), 0), ((4, 16, 64), 1), ((96, 40), 0)])
def test_quantise_dequantise_matches_numpy(kind, shape, axis):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    codes, scales = quantize.quantize(jnp.asarray(w), kind, axis)
    expected_codes = list(shape)
    expected_codes[axis] //= 2 if kind == "nf4" else 1
    assert codes.shape == tuple(expected_codes) and codes.dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
    assert scales.shape[axis] == shape[axis] // np.gcd(shape[axis], 64)
    got = quantize.dequantize(codes, scales, kind, axis)
    np.testing.assert_allclose(got, numpy_blockwise(w, kind, axis), rtol=1e-6, atol=1e-6)
    # Each weight is within half the largest code gap of its block's absmax.
    gap = 1 / 127 if kind == "int8" else np.diff(quantize.NF4_CODEBOOK).max()
    assert np.abs(np.asarray(got) - w).max() <= gap / 2 * np.abs(w).max() + 1e-6


@pytest.mark.parametrize("kind,weight_bound,logit_bound", [("int8", 0.007, 0.01), ("nf4", 0.1, 0.15)])
def test_a_quantised_base_stays_close_to_fp32_and_takes_adapters(base, kind, weight_bound, logit_bound):
    """On Gaussian weights (std 0.02, as initialised) a kernel's relative error ‖Ŵ − W‖/‖W‖ is ≤ 0.7% in
    int8 and ≤ 10% in NF4 (4 bits a weight), and the logits move by ≤ 1% / 15% of their largest value;
    adapters on a quantised base merge exactly as on a full-precision one."""
    config = BASE.replace(initializer_range=0.02)
    fp32 = init_params(config, jax.random.key(0))
    quantized = lora.quantize_base(fp32, kind)
    assert lora.is_quantized(quantized) and not lora.is_quantized(fp32)
    w = fp32["layers"]["mlp"]["up_proj"]["kernel"]
    error = jnp.linalg.norm(quantize.kernel_of(quantized["layers"]["mlp"]["up_proj"], 1) - w) / jnp.linalg.norm(w)
    assert error <= weight_bound
    ref = logits(fp32, config)
    assert np.abs(logits(quantized, config) - ref).max() / np.abs(ref).max() <= logit_bound
    assert lora.bytes_of(quantized) < lora.bytes_of(fp32) * (0.4 if kind == "int8" else 0.3)
    adapted = lora.combine(lora.quantize_base(base, kind), trained_adapters())
    np.testing.assert_allclose(logits(lora.merge(adapted, CONFIG), BASE), logits(adapted, CONFIG), atol=2e-5)


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("quantized", [False, True])
def test_sampler_logprobs_equal_the_trainers_with_adapters(base, quantized):
    params = lora.combine(lora.quantize_base(base, "nf4") if quantized else base, trained_adapters())
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, n=2)
    prompts = [[5, 17, 3], [9, 8, 7, 6, 5], [42]]
    out = generate(params, prompts, jax.random.key(3), sampling, CONFIG)
    tokens = np.concatenate([out.prompt_tokens_RxP, out.tokens_RxN], 1)
    mask = np.concatenate([out.prompt_mask_RxP, out.mask_RxN], 1)
    P = out.prompt_tokens_RxP.shape[1]
    trainer_RxN = np.asarray(score_tokens(params, CONFIG, tokens, mask))[:, P:]
    np.testing.assert_allclose(np.asarray(out.logp_RxN) * out.mask_RxN, trainer_RxN * out.mask_RxN, atol=2e-5)
    if not quantized:  # merged once for the rollout: the same tokens
        merged = generate(lora.merge(params, CONFIG), prompts, jax.random.key(3), sampling, BASE)
        np.testing.assert_array_equal(merged.tokens_RxN, out.tokens_RxN)


# ---------------------------------------------------------------- PEFT both ways


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """(torch LlamaForCausalLM with random weights, its folder, our loaded copy)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from test_hf_parity import TINY, randomize_

    from jaxrl_llm.models.load import load_model

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    randomize_(model, seed=1)
    folder = tmp_path_factory.mktemp("base")
    model.save_pretrained(folder)
    return model, folder, load_model(folder)


def _hf_batch(vocab):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, vocab, (3, 10)).astype(np.int32)
    mask = (np.arange(10)[None] >= np.array([0, 3, 7])[:, None]).astype(np.int32)
    return tokens, mask


def test_our_adapter_loads_in_peft_with_our_logits(hf_base, tmp_path, torch_logits, relative_error):
    peft_lib = pytest.importorskip("peft")
    import copy

    torch_model, folder, ours = hf_base
    config = ours.config.replace(lora=LoraConfig(4, 8.0, targets=("q_proj", "v_proj", "o_proj", "down_proj")))
    adapters = jax.tree.map(lambda x: x + 0.05, lora.init_adapters(config, jax.random.key(0)))
    peft.save_adapter(tmp_path / "adapter", adapters, config, str(folder))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == [
        "down_proj", "o_proj", "q_proj", "v_proj"]
    loaded = peft_lib.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "adapter").eval()
    tokens, mask = _hf_batch(config.vocab_size)
    want = torch_logits(loaded, tokens, mask)
    got = logits(lora.combine(ours.params, adapters), config, tokens, mask)
    assert np.abs(got - torch_logits(torch_model, tokens, mask)).max() > 0.05  # the adapter matters
    assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-4


def test_a_peft_made_adapter_loads_here_with_peft_logits(hf_base, tmp_path, torch_logits):
    peft_lib = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    import copy

    torch_model, folder, ours = hf_base
    peft_config = peft_lib.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True,
                                      init_lora_weights=False)  # random B: a non-trivial adapter
    torch.manual_seed(3)
    made = peft_lib.get_peft_model(copy.deepcopy(torch_model), peft_config).eval()
    made.save_pretrained(tmp_path / "theirs")
    theirs, _ = peft.read_adapter_config(tmp_path / "theirs")
    assert (theirs.rank, theirs.alpha, theirs.rslora) == (8, 16.0, True)
    assert set(theirs.targets) == set(lora.PROJECTIONS)
    config = ours.config.replace(lora=theirs)
    adapters = peft.load_adapter(tmp_path / "theirs", config)
    tokens, mask = _hf_batch(config.vocab_size)
    got = logits(lora.combine(ours.params, adapters), config, tokens, mask)
    assert np.abs(got - torch_logits(made, tokens, mask))[mask.astype(bool)].max() <= 1e-4


def test_unsupported_adapters_are_refused(tmp_path):
    from jaxrl_llm.errors import ModelLoadError

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "use_dora": True}))
    with pytest.raises(ModelLoadError, match="use_dora=True is not plain LoRA"):
        peft.read_adapter_config(tmp_path)


# ---------------------------------------------------------------- runs


RUN = ["data.batch_size=16", "grpo.group_size=4", "data.max_completion_len=6", "data.eval_size=8",
       "data.synthetic.num_examples=200", "train.sft_warmup_steps=2", "train.eval_every=2",
       "model.lora.rank=4", "model.lora.alpha=8", "grpo.kl_coef=0.05", "grpo.kl_placement=loss"]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"model.lora.targets \['qq_proj'\] match none"):
        load_config(None, ["model.lora.rank=4", "model.lora.targets=[qq_proj]"])
    with pytest.raises(ConfigError, match="model.lora.quantize needs LoRA: set model.lora.rank"):
        load_config(None, ["model.lora.quantize=nf4"])
    with pytest.raises(ConfigError, match="holds no adapter_config.json"):
        load_config(None, ["model.lora.rank=4", f"model.lora.init_from={tmp_path}"])
    with pytest.raises(ConfigError, match="model.lora.dropout must be in"):
        load_config(None, ["model.lora.rank=4", "model.lora.dropout=1.5"])


def _rows(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "tokens_per_s"))} for row in rows]


def test_a_lora_run_checkpoints_only_adapters_resumes_exactly_and_exports_both_ways(tmp_path):
    import orbax.checkpoint as ocp

    from jaxrl_llm.run import train
    from jaxrl_llm.run.evaluate import evaluate

    straight = load_config(None, [*RUN, f"run_dir={tmp_path / 'a'}", "train.total_steps=4",
                                  "train.checkpoint_every=2", "model.lora.quantize=int8", "train.export_hf=true"])
    result = train(straight, quiet=True)
    halves = [load_config(None, [*RUN, f"run_dir={tmp_path / 'b'}", f"train.total_steps={n}",
                                 "train.checkpoint_every=2", "model.lora.quantize=int8", f"train.resume={n > 2}"])
              for n in (2, 4)]
    for config in halves:
        train(config, quiet=True)
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    # The checkpoint: step, adapters and their Adam moments, nothing of the base.
    manager = ocp.CheckpointManager(str(tmp_path / "a" / "checkpoints"))
    saved = manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    paths = ["/".join(str(getattr(k, "key", k)) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(saved["policy"]["params"])[0]]
    assert paths and all(p.endswith(("lora_a", "lora_b")) for p in paths)
    assert saved["policy"].get("frozen") is None and saved.get("ref_params") is None
    # Exports: a merged HF folder and a PEFT adapter; eval reads the run folder (base + adapters).
    assert os.path.isfile(tmp_path / "a" / "hf" / "model.safetensors")
    assert os.path.isfile(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    assert lora.split(result.policy.params)[1]
    report = evaluate(straight, str(tmp_path / "a"), samples=1)
    np.testing.assert_allclose(report["eval/reward"], result.metrics["eval/reward"])
    # jaxrl_llm.export of the last checkpoint writes the same merged folder and adapter as the run did.
    from jaxrl_llm.export import export_run

    again = export_run(str(tmp_path / "a"), out=str(tmp_path / "again"))
    for name in ("hf/model.safetensors", "adapter/adapter_model.safetensors"):
        ours, theirs = (safetensors.numpy.load_file(os.path.join(d, name)) for d in (again, tmp_path / "a"))
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{name} {key}")


def test_a_run_starts_from_a_saved_adapter_and_eval_takes_one(tmp_path):
    """SFT with LoRA exports RUN_DIR/adapter; a new run with model.lora.init_from starts where it
    ended (its before-training loss is the first run's final one), and eval --adapter agrees."""
    from jaxrl_llm.run import train
    from jaxrl_llm.run.evaluate import evaluate

    common = ["algorithm=sft", "data.batch_size=8", "data.eval_size=8", "data.synthetic.num_examples=100",
              "data.max_completion_len=6", "train.eval_every=2", "model.lora.rank=4", "model.lora.alpha=8",
              "optim.lr=1e-2"]
    first = train(load_config(None, [*common, f"run_dir={tmp_path / 'a'}", "train.total_steps=3",
                                     "train.export_hf=true"]), quiet=True)
    adapter = str(tmp_path / "a" / "adapter")
    second = train(load_config(None, [*common, f"run_dir={tmp_path / 'b'}", "train.total_steps=1",
                                      f"model.lora.init_from={adapter}"]), quiet=True)
    np.testing.assert_allclose(second.metrics["before/eval/loss"], first.metrics["eval/loss"], rtol=1e-5)
    with pytest.raises(ConfigError, match="set model.lora.rank=4 model.lora.alpha=8.0"):
        train(load_config(None, [*common, f"run_dir={tmp_path / 'c'}", "train.total_steps=1", "model.lora.rank=8",
                                 f"model.lora.init_from={adapter}"]), quiet=True)
    # The eval command line: the tiny base plus the adapter scores as the run's folder does.
    config = load_config(None, ["data.eval_size=8", "data.synthetic.num_examples=100", "data.max_completion_len=6"])
    with_adapter = evaluate(config, "tiny", samples=1, adapter=adapter)
    from_run = evaluate(config, str(tmp_path / "a"), samples=1)
    assert with_adapter["eval/reward"] == from_run["eval/reward"]
    assert with_adapter["samples"] == from_run["samples"]


def test_the_7b_gpu_preset_validates_and_its_train_state_fits_one_80gb_card():
    """configs/qwen2_5_7b_grpo_lora_gpu.yaml, sized with Qwen2.5-7B's architecture (no download)."""
    from jaxrl_llm.run.registry import check
    from jaxrl_llm.state import make_optimizer

    config = check(load_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                            "qwen2_5_7b_grpo_lora_gpu.yaml")), 32768)
    section = config.model.lora
    qwen = ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
        head_dim=128, model_type="qwen2", attention_bias=True, dtype=config.model.dtype,
        param_dtype=config.model.param_dtype, lora=LoraConfig(section.rank, section.alpha),
    )

    def state():
        base = lora.quantize_base(init_params(qwen.replace(lora=None), jax.random.key(0)), section.quantize)
        return TrainState.create(lora.init_adapters(qwen, jax.random.key(1)), make_optimizer(1e-5, 10), base)

    abstract = jax.eval_shape(state)
    trained_gb = (lora.bytes_of(abstract.params) + lora.bytes_of(abstract.opt_state)) / 1e9
    base_gb = lora.bytes_of(abstract.frozen) / 1e9
    assert 80e6 < lora.count_params(abstract.params) < 82e6  # rank 32 on the 7 projections of 28 layers
    assert trained_gb < 1.1 and base_gb < 12, (trained_gb, base_gb)
