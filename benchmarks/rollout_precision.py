"""Rollout precision: new tokens/s of the sampler on its fp32, bf16 and int8 rollout copies
(`sampling.weights_dtype`), each beside transformers in the same precision and beside the
memory-bandwidth roofline of its own bytes.

    python -m benchmarks.rollout_precision            # CPU: B=8, P=32, N=64, sampling
    python -m benchmarks.rollout_precision --gpu      # B=256, P=128, N=256 on the GPU

Ours: the fp32 policy's rollout copy (`models.precision.rollout_weights`), made once and timed
apart (a run makes it once per training step). transformers: the same weights in fp32, in bf16,
and for int8 (CPU only) torch's dynamically quantised int8 Linear layers (`quantize_dynamic`:
int8 weights and activations, fbgemm kernels), the stock int8 path of a transformers model on CPU.
Each side's time is the median of --repeats calls after a warm-up, the sides alternating. The
roofline is the time to read the copy's weights and the KV cache once per new token at the
bandwidth measured in the same run (a batch-B matmul streaming a weight-sized fp32 matrix).
The row: our int8 against our bf16 (goal 1.6×).
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings

import numpy as np

from benchmarks.common import Result, add_model_arguments, count_compiles, print_table, time_interleaved, write_result
from benchmarks.generate import cpu_read_bandwidth, hf_generate, load_models, ours_sampler

DTYPES = ("float32", "bfloat16", "int8")
GOAL_INT8_OVER_BF16 = 1.6  # issue 21


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="on the GPU, bigger default shapes")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the summary row here (for python -m benchmarks)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.smoke else 256 if args.gpu else 8)
    args.prompt_len = args.prompt_len or (8 if args.smoke else 128 if args.gpu else 32)
    args.new_tokens = args.new_tokens or (8 if args.smoke else 256 if args.gpu else 64)
    # Every weights dtype decodes with float32 compute, which cuDNN attention does not take.
    args.dtype, args.check_tokens, args.attention = "float32", 0, "xla"
    args.device = "cuda" if args.gpu and not args.smoke else "cpu"
    return args


def hf_in(hf, weights_dtype: str, device: str):
    """transformers' model holding the same weights in `weights_dtype` (None: no such path here)."""
    import copy

    import torch

    if weights_dtype == "float32":
        return hf
    if weights_dtype == "bfloat16":
        return copy.deepcopy(hf).to(torch.bfloat16)
    if device != "cpu":
        return None  # torch's dynamic int8 kernels are CPU-only
    with warnings.catch_warnings():  # torch marks these kernels deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(hf), {torch.nn.Linear}, dtype=torch.qint8)


def roofline_s(config, params, args, bandwidth: float) -> float:
    """Seconds to read the copy's weights and the average KV cache once per new token."""
    import jax

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    itemsize = 4 if config.dtype == "float32" else 2
    slots = args.batch * (args.prompt_len + args.new_tokens / 2)
    cache_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * slots * itemsize
    return (weight_bytes + cache_bytes) * args.new_tokens / bandwidth


def measure(args: argparse.Namespace) -> Result:
    import jax

    from jaxrl_llm.models.precision import rollout_config, rollout_weights
    from jaxrl_llm.padding import Bucketing
    from jaxrl_llm.sampling import SamplingConfig

    B, P, N = args.batch, args.prompt_len, args.new_tokens
    config, params, hf = load_models(args)
    tokens_BxP = np.random.default_rng(0).integers(0, config.vocab_size, size=(B, P))
    sampling = SamplingConfig(max_new_tokens=N, temperature=1.0, bucketing=Bucketing("multiple", P))
    bandwidth = None if args.gpu else cpu_read_bandwidth(sum(x.nbytes for x in jax.tree.leaves(params)), B)
    rows, seconds, compiles, recompiles = [], {}, {}, {}
    for weights_dtype in DTYPES:
        jax.block_until_ready(rollout_weights(params, config, weights_dtype))  # compile the cast
        start = time.perf_counter()
        copy, cast_compiles = count_compiles(functools.partial(rollout_weights, params, config, weights_dtype))
        jax.block_until_ready(copy)
        cast_s = time.perf_counter() - start
        copy_config = rollout_config(config, weights_dtype)
        run, compiles[weights_dtype], _ = ours_sampler(copy_config, copy, tokens_BxP, sampling)
        theirs = hf_in(hf, weights_dtype, args.device)
        seeds = iter(range(1, 10**6))
        sides = {"ours": lambda run=run, seeds=seeds: run(next(seeds))}
        if theirs is not None:
            sides["transformers"] = lambda theirs=theirs: hf_generate(theirs, tokens_BxP, N, sample=True)
        timings = time_interleaved(sides, args.repeats)
        seconds[weights_dtype] = timings["ours"].median_s
        recompiles[weights_dtype] = cast_compiles.count + timings["ours"].compiles
        floor = roofline_s(copy_config, copy, args, bandwidth) if bandwidth else None
        hf_rate = B * N / timings["transformers"].median_s if theirs is not None else None
        rows.append([
            weights_dtype, f"{B * N / seconds[weights_dtype]:,.1f}", "-" if hf_rate is None else f"{hf_rate:,.1f}",
            "-" if hf_rate is None else f"{B * N / seconds[weights_dtype] / hf_rate:.2f}×",
            "-" if floor is None else f"{floor / seconds[weights_dtype]:.0%}",
            f"{sum(x.nbytes for x in jax.tree.leaves(copy)) / 2**20:,.0f} MiB", f"{cast_s:.2f}",
            f"{compiles[weights_dtype].seconds:.1f}", str(recompiles[weights_dtype]),
        ])
    print_table(["rollout weights", "ours new tok/s", "transformers new tok/s", "ratio", "of roofline",
                 "weights", "cast s (once a step)", "compile s", "compiles after warm-up"], rows)
    if bandwidth:
        print(f"roofline: weights and KV cache read once per new token at {bandwidth / 1e9:.1f} GB/s "
              "(measured now); whole call, prefill included")
    ratio = seconds["bfloat16"] / seconds["int8"]
    print(f"our int8 / our bf16: {ratio:.2f}x (goal {GOAL_INT8_OVER_BF16}x)")
    return Result(
        row=f"rollout int8 copy, batch {B}, prompt {P}, {N} new tokens", baseline="our bf16 copy",
        ours_s=seconds["int8"], baseline_s=seconds["bfloat16"], work=B * N, unit="new tok/s",
        compile_s=compiles["int8"].seconds, ours_memory="-", baseline_memory="-", repeats=args.repeats,
        notes=tuple(" | ".join(row) for row in rows), compiles_after_warmup=sum(recompiles.values()),
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_result(measure(args), args.json)


if __name__ == "__main__":
    main()
