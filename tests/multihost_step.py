"""One process of the multi-host test (test_sharding.py starts it).

`pair PORT ID OUT`: process ID of 2 on 127.0.0.1:PORT, 2 CPU devices each, a data=2 × fsdp=2
mesh over the 4; runs two SFT steps, saves a checkpoint to OUT/ckpt and, on process 0, writes
the losses and params to OUT/pair.npz; then both run a shortened default training run
(SFT warm start, then GRPO) on the same mesh, process 0 writing OUT/pair_run.
`single OUT`: one process, one device: the same two steps (OUT/single.npz), restores the
pair's checkpoint (OUT/restored.npz), and the same training run (OUT/single_run).
"""

import os
import sys

mode = sys.argv[1]
if mode == "pair":
    os.environ["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=2 --xla_cpu_collective_call_terminate_timeout_seconds=600"
        " --xla_cpu_collective_timeout_seconds=600"
    )  # see sharded_equivalence.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from sharded_equivalence import run_loop  # noqa: E402
from test_algorithms_offline import CONFIG, sequence_batch  # noqa: E402

from jaxrl_llm import checkpoint, sharding  # noqa: E402
from jaxrl_llm.algorithms.sft import make_sft_step  # noqa: E402
from jaxrl_llm.models.transformer import init_params  # noqa: E402
from jaxrl_llm.state import TrainState, make_optimizer  # noqa: E402


def flat(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def train(mesh):
    """Two SFT steps on `mesh` from the same init; (state, losses)."""
    state = TrainState.create(init_params(CONFIG, jax.random.key(0)), make_optimizer(1e-2, 10))
    shardings = sharding.tree_shardings(state, mesh, [CONFIG])
    state = sharding.place(jax.device_get(state), shardings)
    step = sharding.jit_step(make_sft_step(CONFIG), mesh, shardings)
    losses = []
    for i in range(2):
        state, metrics = step(state, sequence_batch(i, B=8), jax.random.key(i))
        losses.append(float(jax.device_get(metrics["loss"])))
    return state, shardings, losses


def main():
    if mode == "pair":
        port, process_id, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        assert sharding.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
        assert jax.device_count() == 4 and jax.local_device_count() == 2
        state, _, losses = train(sharding.make_mesh(2, 2, 1))
        manager = checkpoint.checkpoint_manager(os.path.join(out, "ckpt"))
        checkpoint.save(manager, 1, state, {"step": 1})
        params = sharding.to_host(state.params)  # every process joins the gather
        if jax.process_index() == 0:
            np.savez(os.path.join(out, "pair.npz"), losses=losses, **flat(params))
        run_loop(os.path.join(out, "pair_run"), ["mesh.data=2", "mesh.fsdp=2"])
        jax.distributed.shutdown()
    else:
        out = sys.argv[2]
        state, _, losses = train(sharding.single_device_mesh())
        np.savez(os.path.join(out, "single.npz"), losses=losses, **flat(jax.device_get(state.params)))
        manager = checkpoint.checkpoint_manager(os.path.join(out, "ckpt"))
        step, restored, meta = checkpoint.restore_latest(manager, state)
        assert step == 1 and meta == {"step": 1}
        np.savez(os.path.join(out, "restored.npz"), **flat(jax.device_get(restored.params)))
        run_loop(os.path.join(out, "single_run"), [])


if __name__ == "__main__":
    main()
