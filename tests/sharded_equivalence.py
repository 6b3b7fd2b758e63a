"""Run SFT, DPO, GRPO and PPO steps and generation on one device and on meshes of 8 CPU devices;
print one JSON line per (case, mesh) with the largest differences (`steps EXPORT_DIR`), or run a
shortened default training run on a 2×2×2 mesh (`loop RUN_DIR`; `loop_env RUN_DIR`: the multi-turn
calculator run). Run by test_sharding.py in a
subprocess, because the device count must be set before JAX starts."""

import dataclasses
import json
import os
import sys

if __name__ == "__main__":  # before JAX starts; importing `run_loop` elsewhere leaves devices alone
    # 8 fake devices share 2 cores here: a device thread can reach a collective more than XLA's
    # default 40 s after the others, which aborts the process, so the collectives wait longer.
    # XLA's concurrency-optimised CPU schedule let the fake devices of one program enter independent
    # collectives in different orders (devices 0-3 in an all-reduce over all 8 while 4-7 sat in an
    # all-gather among themselves) and the run deadlocked in most LoRA GRPO runs on the (2, 4, 1)
    # mesh; with XLA's default schedule it passed every time (4 of 4 alone, then in CI).
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
        " --xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=600"
        " --xla_cpu_collective_timeout_seconds=600 --xla_cpu_enable_concurrency_optimized_scheduler=false"
    )
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from test_algorithms_offline import pair_batch, sequence_batch  # noqa: E402
from test_grpo import CONFIG, rollout  # noqa: E402

from jaxrl_llm import sharding  # noqa: E402
from jaxrl_llm.algorithms.dpo import DPOState, make_dpo_step  # noqa: E402
from jaxrl_llm.algorithms.grpo import GRPOState, make_grpo_step  # noqa: E402
from jaxrl_llm.algorithms.ppo import PPOState, make_ppo_step  # noqa: E402
from jaxrl_llm.algorithms.sft import make_sft_step  # noqa: E402
from jaxrl_llm.config import DPOSection, GRPOSection, PPOSection  # noqa: E402
from jaxrl_llm.models.lora import init_adapters  # noqa: E402
from jaxrl_llm.models.transformer import LoraConfig, init_params  # noqa: E402
from jaxrl_llm.sampling import SamplingConfig, generate, init_turn_cache, sample_turn  # noqa: E402
from jaxrl_llm.state import TrainState, make_optimizer  # noqa: E402

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
LORA_CONFIG = CONFIG.replace(lora=LoraConfig(rank=4, alpha=8.0))
# A shortened default run (SFT warm start, then GRPO) that test_sharding.py repeats on one device.
LOOP_OVERRIDES = [
    "data.batch_size=16", "grpo.group_size=4", "data.max_completion_len=6", "data.eval_size=8",
    "data.synthetic.num_examples=200", "train.total_steps=2", "train.sft_warmup_steps=2",
    "train.eval_every=0", "train.checkpoint_every=1", "train.export_hf=false",
]

# The multi-turn run on top of LOOP_OVERRIDES: a smaller tiny model, a warm start of 8 conversations.
ENV_LOOP_OVERRIDES = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.head_dim=8", "train.sft_warmup_batch_size=8", "env.max_turns=2",
]


def optimizer():
    return make_optimizer(1e-2, 100, grad_clip=1.0)


def cases():
    """name -> (state, step, batches): 16-row batches, so every mesh splits them evenly."""
    params = init_params(CONFIG, jax.random.key(0))
    ref = jax.tree.map(lambda p: p * 0.9, params)
    critic = init_params(CONFIG, jax.random.key(1), scalar_head=True)
    reward = init_params(CONFIG, jax.random.key(2), scalar_head=True)
    grpo = GRPOSection(group_size=4, num_iterations=2, num_minibatches=2)
    ppo = PPOSection(epochs=2, num_minibatches=2)
    tokens = lambda b: b.replace(tokens_BxT=b.tokens_BxT % CONFIG.vocab_size)
    # LoRA: adapters with B ≠ 0 (so A gets gradients too) over the frozen base, which is also the
    # reference and, for PPO, the critic's trunk: one base shared by three parts of the state.
    adapters = jax.tree.map(lambda x: x + 0.01, init_adapters(LORA_CONFIG, jax.random.key(3)))
    critic_head = {"model": adapters, "head": critic["head"]}
    trunk = {"model": {k: v for k, v in params.items() if k != "lm_head"}}
    return {
        "sft_lora": (TrainState.create(adapters, optimizer(), params), make_sft_step(LORA_CONFIG, num_microbatches=2),
                     [tokens(sequence_batch(s, B=16)) for s in range(2)]),
        "grpo_lora": (GRPOState(TrainState.create(adapters, optimizer(), params)),
                      make_grpo_step(LORA_CONFIG, grpo, 2, 6),
                      [rollout(s, prompts=4) for s in range(2)]),
        "ppo_lora": (PPOState.create(TrainState.create(adapters, optimizer(), params),
                                     TrainState.create(critic_head, optimizer(), trunk), None, reward, 0.05),
                     make_ppo_step(LORA_CONFIG, ppo, critic_config=LORA_CONFIG, reward_config=CONFIG),
                     [rollout(s, prompts=4) for s in range(2)]),
        "sft": (TrainState.create(params, optimizer()), make_sft_step(CONFIG, num_microbatches=2),
                [tokens(sequence_batch(s, B=16)) for s in range(2)]),
        "dpo": (DPOState(TrainState.create(params, optimizer()), ref), make_dpo_step(CONFIG, DPOSection(), 2),
                [jax.tree.map(lambda x: x % CONFIG.vocab_size if x.dtype == np.int32 else x, pair_batch(s, B=16))
                 for s in range(2)]),
        "grpo": (GRPOState(TrainState.create(params, optimizer()), ref), make_grpo_step(CONFIG, grpo, 2, 6),
                 [rollout(s, prompts=4) for s in range(2)]),
        "ppo": (PPOState.create(TrainState.create(params, optimizer()), TrainState.create(critic, optimizer()),
                                ref, reward, 0.05), make_ppo_step(CONFIG, ppo),
                [rollout(s, prompts=4) for s in range(2)]),
    }


def run_steps(state, step, batches, mesh):
    """(params-like leaves of the final state, metrics of every step) on `mesh`."""
    shardings = sharding.tree_shardings(state, mesh, [CONFIG, LORA_CONFIG])
    state = sharding.place(state, shardings)  # host arrays in: a fresh copy per run (steps donate)
    jitted = sharding.jit_step(step, mesh, shardings)
    metrics = []
    for i, batch in enumerate(batches):
        state, out = jitted(state, batch, jax.random.key(i))
        metrics.append(jax.device_get(out))
    placed = all(leaf.sharding == s for leaf, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
    return jax.device_get(state), metrics, placed


def max_diff(a, b):
    return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), default=0.0)


def main(export_dir):
    one = sharding.single_device_mesh()
    for name, (state, step, batches) in cases().items():
        state = jax.device_get(state)
        want_state, want_metrics, _ = run_steps(state, step, batches, one)
        for shape in MESHES:
            got_state, got_metrics, placed = run_steps(state, step, batches, sharding.make_mesh(*shape))
            print(json.dumps({
                "case": name, "mesh": shape, "state": max_diff(want_state, got_state),
                "metrics": max_diff(want_metrics, got_metrics), "placed": placed,
                "metric_names": sorted(want_metrics[0]),
            }), flush=True)

    check_init_and_load(sharding.make_mesh(2, 2, 2), export_dir)
    params = init_params(CONFIG, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, CONFIG.vocab_size, rng.integers(2, 9))) for _ in range(4)]
    config = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=8, n=4, stop_token_ids=(3,))
    want = generate(params, prompts, jax.random.key(7), config, CONFIG)
    for shape in MESHES:
        mesh = sharding.make_mesh(*shape)
        placed = sharding.place(params, sharding.tree_shardings(params, mesh, [CONFIG]))
        got = generate(placed, prompts, jax.random.key(7), config, CONFIG, mesh=mesh)
        print(json.dumps({
            "case": "generate", "mesh": shape, "tokens_equal": bool(np.array_equal(want.tokens_RxN, got.tokens_RxN)),
            "logp": max_diff(want.logp_RxN, got.logp_RxN),
            "lengths_equal": bool(np.array_equal(want.lengths_R, got.lengths_R)),
        }), flush=True)
    check_turns(params, prompts, config)


def check_turns(params, prompts, config):
    """Three turns of multi-turn sampling (per-row caches extended by each turn's new tokens) on each
    mesh equal one device; 16 rows so every mesh splits them."""
    rows = [p for p in prompts for _ in range(4)]
    config = dataclasses.replace(config, n=1)

    def turns(mesh):
        placed = params if mesh is None else sharding.place(params, sharding.tree_shardings(params, mesh, [CONFIG]))
        cache = init_turn_cache(CONFIG, len(rows), 96)  # laid out by the first turn, as envs.TurnSampler's
        blocks, out = rows, []
        for t in range(3):
            cache, turn = sample_turn(placed, cache, blocks, [10] * len(rows), jax.random.key(t), config, CONFIG, mesh)
            turn = jax.device_get(turn)
            out.append(turn)
            blocks = [[int(turn.tokens_RxN[r, max(n - 1, 0)]), 5, 6] if n else [] for r, n in enumerate(turn.lengths_R)]
        return out

    want = turns(None)
    for shape in MESHES:
        got = turns(sharding.make_mesh(*shape))
        print(json.dumps({
            "case": "turns", "mesh": shape,
            "tokens_equal": all(np.array_equal(a.tokens_RxN, b.tokens_RxN) for a, b in zip(want, got)),
            "logp": max(max_diff(a.logp_RxN, b.logp_RxN) for a, b in zip(want, got)),
        }), flush=True)


def check_init_and_load(mesh, folder):
    """Params initialised or loaded straight into their layout equal the unsharded ones."""
    from jaxrl_llm.models.load import export_hf, load_model

    params = init_params(CONFIG, jax.random.key(0))
    sharded = sharding.init_sharded(CONFIG, jax.random.key(0), mesh)
    export_hf(params, folder, CONFIG)
    loaded = load_model(folder, placement=sharding.placement(mesh)).params
    want = jax.tree.leaves(sharding.tree_shardings(params, mesh, [CONFIG]))
    laid_out = lambda tree: all(leaf.sharding == s for leaf, s in zip(jax.tree.leaves(tree), want))
    print(json.dumps({
        "case": "init_load", "init": max_diff(params, sharded), "load": max_diff(params, loaded),
        "init_placed": laid_out(sharded), "load_placed": laid_out(loaded),
    }), flush=True)


def run_loop(run_dir, mesh_overrides, env=False):
    """The last metrics row of a shortened default run (or with `env`, of configs/calculator.yaml's
    multi-turn run with the calculator tool) on the given mesh."""
    from jaxrl_llm.config import load_config
    from jaxrl_llm.run import train

    preset = os.path.join(os.path.dirname(HERE), "configs", "calculator.yaml") if env else None
    overrides = (LOOP_OVERRIDES + ENV_LOOP_OVERRIDES) if env else LOOP_OVERRIDES
    config = load_config(preset, overrides + [f"run_dir={run_dir}"] + mesh_overrides)
    return train(config, quiet=True).metrics


if __name__ == "__main__":
    mode, folder = sys.argv[1:3]  # "steps" HF_EXPORT_DIR, or "loop" / "loop_env" RUN_DIR
    if mode in ("loop", "loop_env"):
        row = run_loop(folder, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], env=mode == "loop_env")
        print(json.dumps({"case": mode, "metrics": row}), flush=True)
    else:
        main(folder)
