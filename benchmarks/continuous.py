"""Continuous batching: new tokens/s of evaluation over many prompts with long-tailed answer lengths,
`sampling.slots` slots refilled as rows stop, against static batches of as many rows (the same KV
cache memory), each decoding until its longest row stops.

    python -m benchmarks.continuous                 # CPU: 512 prompts, P=16, up to 64 new tokens, 64 slots
    python -m benchmarks.continuous --gpu           # 2048 prompts, P=128, up to 512 new tokens, 256 slots

The model is SmolLM2-135M's architecture with random weights (near-uniform next-token
distributions), and a stop set of vocab/`--mean-length` token ids, so every new token ends its row
with probability 1/mean-length: geometric lengths, capped at the budget, the long tail of sampled
reasoning. A static batch numbers its rows from 0 (each batch gets its own key), so its rows draw
other uniforms than the same rows in one continuous call: the two sides emit the same length
distribution, not the same tokens
(`tests/test_continuous.py` checks equal completions for equal calls), and the row is in new
tokens/s. Each side's programs are compiled first; the median of --repeats calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from benchmarks.common import Result, add_model_arguments, count_compiles, print_table, write_result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="on the GPU, bigger default shapes")
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int, help="the answer budget N")
    parser.add_argument("--slots", type=int)
    parser.add_argument("--mean-length", type=float, help="mean answer length before the budget's cap")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", help="also write the summary row here (for python -m benchmarks)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny model and shapes
    add_model_arguments(parser)  # accepted from `python -m benchmarks`; the model is always random weights
    args = parser.parse_args(argv)
    default = (lambda smoke, gpu, cpu: smoke if args.smoke else gpu if args.gpu else cpu)
    args.prompts = args.prompts or default(24, 2048, 512)
    args.prompt_len = args.prompt_len or default(4, 128, 16)
    args.new_tokens = args.new_tokens or default(16, 512, 64)
    args.slots = args.slots or default(6, 256, 64)
    args.mean_length = args.mean_length or default(4.0, 64.0, 12.0)
    return args


def model(args):
    """(ModelConfig, random params): SmolLM2-135M's architecture, or a tiny one for --smoke."""
    import jax

    from jaxrl_llm.models.transformer import ModelConfig, init_params

    if args.smoke:
        config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8, max_position_embeddings=128)
    else:
        config = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                             num_kv_heads=3, head_dim=64, tie_word_embeddings=True, max_position_embeddings=2048,
                             dtype="bfloat16" if args.gpu else "float32")
    return config, init_params(config, jax.random.key(0))


def measure(args: argparse.Namespace) -> Result:
    import jax

    from jaxrl_llm.padding import Bucketing
    from jaxrl_llm.sampling import SamplingConfig, _continuous_loop, _generate, pad_prompts, right_aligned

    config, params = model(args)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (args.prompts, args.prompt_len)).tolist()
    stops = tuple(range(1, 1 + round(config.vocab_size / args.mean_length)))
    static = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, stop_token_ids=stops,
                            bucketing=Bucketing("multiple", args.prompt_len))
    continuous = dataclasses.replace(static, slots=args.slots)
    key = jax.random.key(1)
    batches = [prompts[i:i + args.slots] for i in range(0, len(prompts), args.slots)]

    def compile_both():  # before timing either
        static_calls, programs = [], {}  # one program per padded shape, as a jit cache would hold
        for batch in batches:
            padded = pad_prompts(batch, static, config)
            shapes = tuple(x.shape for x in padded)
            if shapes not in programs:
                programs[shapes] = _generate.lower(params, *padded, key, static, config).compile()
            static_calls.append((programs[shapes], padded))
        # Each static batch numbers its rows from 0: its own key, or every batch would draw row r's uniforms.
        batch_keys = [jax.random.fold_in(key, b) for b in range(len(batches))]
        right_BxP, lengths_B = right_aligned(*pad_prompts(prompts, static, config))
        continuous_call = _continuous_loop.lower(params, right_BxP, lengths_B, key, continuous, config).compile()
        return static_calls, batch_keys, right_BxP, lengths_B, continuous_call

    (static_calls, batch_keys, right_BxP, lengths_B, continuous_call), compiles = count_compiles(compile_both)

    def run_static():
        outs = [call(params, *padded, k) for (call, padded), k in zip(static_calls, batch_keys)]
        return [np.asarray(jax.block_until_ready(o.tokens_RxN)) for o in outs], [np.asarray(o.lengths_R) for o in outs]

    def run_continuous():
        out = continuous_call(params, right_BxP, lengths_B, key)
        return np.asarray(jax.block_until_ready(out.tokens_RxN)), np.asarray(out.length_R)

    seconds, recompiles = {"static": [], "continuous": []}, {"static": 0, "continuous": 0}
    for _ in range(args.repeats):
        for name, fn in (("static", run_static), ("continuous", run_continuous)):
            start = time.perf_counter()
            result, counted = count_compiles(fn)
            seconds[name].append(time.perf_counter() - start)
            recompiles[name] += counted.count
            if name == "static":
                static_lengths = np.concatenate(result[1])
            else:
                continuous_lengths = result[1]
    static_s, continuous_s = float(np.median(seconds["static"])), float(np.median(seconds["continuous"]))
    # Each static batch restarts the row numbering, so its rows draw other uniforms than the same rows
    # in one call: the lengths' distribution is what must agree, not row by row.
    new_tokens = int(continuous_lengths.sum())
    print(f"answer lengths: mean {continuous_lengths.mean():.1f} (static {static_lengths.mean():.1f}), "
          f"median {np.median(continuous_lengths):.0f}, max {continuous_lengths.max()} of {args.new_tokens}; "
          f"{(continuous_lengths == args.new_tokens).mean():.1%} at the budget")
    longest = [int(static_lengths[i:i + args.slots].max()) for i in range(0, len(static_lengths), args.slots)]
    print(f"static batches decode to their longest row: {longest} steps")
    print_table(["", "new tok/s", "median s", "decode steps"], [
        ["static batches", f"{static_lengths.sum() / static_s:,.1f}", f"{static_s:.2f}", f"{sum(longest)}"],
        ["continuous", f"{new_tokens / continuous_s:,.1f}", f"{continuous_s:.2f}",
         f"≈ {int(np.ceil(new_tokens / args.slots))} (full slots)"],
    ])
    ratio = (new_tokens / continuous_s) / (static_lengths.sum() / static_s)
    print(f"continuous / static: {ratio:.2f}x in new tokens/s (compiled {compiles} first, not timed; "
          f"{recompiles['continuous']} compiles in the timed continuous calls, {recompiles['static']} in the static)")
    return Result(
        row=f"evaluation, {args.prompts} prompts, long-tailed answers ≤ {args.new_tokens} tokens, {args.slots} slots",
        # The sides emit about the same number of tokens, not exactly: the baseline's time is scaled to
        # ours' token count, so the ratio is one of new tokens/s.
        baseline=f"static batches of {args.slots}", ours_s=continuous_s,
        baseline_s=static_s * new_tokens / static_lengths.sum(),
        work=new_tokens, unit="new tok/s", compile_s=compiles.seconds, ours_memory="-", baseline_memory="-",
        repeats=args.repeats, compiles_after_warmup=recompiles["continuous"],
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_result(measure(args), args.json)


if __name__ == "__main__":
    main()
