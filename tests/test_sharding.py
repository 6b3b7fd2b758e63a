"""Sharding: the golden layout of every param, clear mesh errors, and one-device equivalence of
every algorithm's step, generation and a training run on 8 fake CPU devices and across 2 processes."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from jaxrl_llm import sharding
from jaxrl_llm.models.transformer import ModelConfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = ModelConfig(
    vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, tie_word_embeddings=False, model_type="qwen2", attention_bias=True,
)
GOLDEN = {  # (data, fsdp, tensor) = (2, 2, 2): FSDP over embed, tensor parallel over heads/mlp/vocab
    "['embed']['embedding']": P("tensor", "fsdp"),
    "['final_norm']['scale']": P("fsdp"),
    "['layers']['attn']['q_proj']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attn']['q_proj']['bias']": P(None, "tensor", None),
    "['layers']['attn']['k_proj']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attn']['k_proj']['bias']": P(None, "tensor", None),
    "['layers']['attn']['v_proj']['kernel']": P(None, "fsdp", "tensor", None),
    "['layers']['attn']['v_proj']['bias']": P(None, "tensor", None),
    "['layers']['attn']['o_proj']['kernel']": P(None, "tensor", None, "fsdp"),
    "['layers']['input_norm']['scale']": P(None, "fsdp"),
    "['layers']['post_attn_norm']['scale']": P(None, "fsdp"),
    "['layers']['mlp']['gate_proj']['kernel']": P(None, "fsdp", "tensor"),
    "['layers']['mlp']['up_proj']['kernel']": P(None, "fsdp", "tensor"),
    "['layers']['mlp']['down_proj']['kernel']": P(None, "tensor", "fsdp"),
    "['lm_head']['kernel']": P("fsdp", "tensor"),
}


def abstract_mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def flat_specs(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]
    return {jax.tree_util.keystr(path): spec for path, spec in leaves}


def test_golden_partition_specs():
    assert flat_specs(sharding.param_specs(TINY, abstract_mesh(2, 2, 2))) == GOLDEN
    scalar = flat_specs(sharding.param_specs(TINY, abstract_mesh(2, 2, 2), scalar_head=True))
    assert scalar["['head']['kernel']"] == P("fsdp", None) and scalar["['head']['bias']"] == P(None)
    assert scalar["['model']['layers']['attn']['q_proj']['kernel']"] == GOLDEN["['layers']['attn']['q_proj']['kernel']"]
    # Specs name mesh axes; on a mesh where fsdp and tensor have size 1 the same specs replicate.
    assert flat_specs(sharding.param_specs(TINY, abstract_mesh(8, 1, 1))) == GOLDEN


def test_optimizer_state_follows_its_params():
    import optax

    from jaxrl_llm.models.transformer import init_params
    from jaxrl_llm.state import TrainState

    state = jax.eval_shape(lambda: TrainState.create(init_params(TINY, jax.random.key(0)), optax.adamw(1e-3)))
    specs = flat_specs(sharding.tree_specs(state, abstract_mesh(2, 2, 2), [TINY]))
    q = "['layers']['attn']['q_proj']['kernel']"
    assert specs[f".params{q}"] == specs[f".opt_state[0].mu{q}"] == specs[f".opt_state[0].nu{q}"] == GOLDEN[q]
    assert specs[".step"] == P() and specs[".opt_state[0].count"] == P()


def test_mesh_errors_name_the_fix():
    assert sharding.mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
    assert sharding.mesh_shape(2, -1, 1, 8) == (2, 4, 1)
    with pytest.raises(sharding.ShardingError, match=r"= 6 devices, but 8 are available"):
        sharding.mesh_shape(3, 2, 1, 8)
    with pytest.raises(sharding.ShardingError, match=r"use 3 devices, which does not divide the 8"):
        sharding.mesh_shape(-1, 3, 1, 8)
    with pytest.raises(sharding.ShardingError, match=r"'kv_heads' dimension of size 2 cannot be split 8 ways over "
                                                     r"mesh.tensor; choose mesh.tensor dividing 2"):
        sharding.param_specs(TINY, abstract_mesh(1, 1, 8))
    with pytest.raises(sharding.ShardingError,
                       match=r"'embed' dimension of size 32 cannot be split 3 ways over mesh.fsdp"):
        sharding.param_specs(TINY, abstract_mesh(1, 3, 1))


def test_a_run_on_a_mesh_larger_than_the_machine_fails_before_compiling(tmp_path):
    from jaxrl_llm.config import load_config
    from jaxrl_llm.run import train

    config = load_config(None, [f"run_dir={tmp_path}", "mesh.data=2", "data.batch_size=16"])
    with pytest.raises(sharding.ShardingError, match=r"1 are available"):
        train(config, quiet=True)


def _run(args, timeout=900):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """The JSON results of tests/sharded_equivalence.py on 8 fake CPU devices, by case."""
    rows = _run([os.path.join(HERE, "sharded_equivalence.py"), "steps", str(tmp_path_factory.mktemp("hf"))])
    return {(row["case"], tuple(row.get("mesh", ()))): row for row in rows}


@pytest.mark.parametrize("case", ["sft", "dpo", "grpo", "ppo", "sft_lora", "grpo_lora", "ppo_lora"])
@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_steps_equal_one_device(eight_devices, case, mesh):
    row = eight_devices[(case, mesh)]
    assert row["placed"], "the updated state left its declared layout"
    assert row["metrics"] < 1e-4, row
    assert row["state"] < 2e-4, row  # two steps of Adam at lr 1e-2 (GRPO/PPO: 4 updates each)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_generation_equals_one_device(eight_devices, mesh):
    row = eight_devices[("generate", mesh)]
    assert row["tokens_equal"] and row["lengths_equal"] and row["logp"] < 1e-5, row


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_multiturn_sampling_equals_one_device(eight_devices, mesh):
    row = eight_devices[("turns", mesh)]
    assert row["tokens_equal"] and row["logp"] < 1e-5, row


def test_init_and_loading_produce_sharded_params(eight_devices):
    row = eight_devices[("init_load", ())]
    assert row["init_placed"] and row["load_placed"], row
    assert row["init"] == 0.0 and row["load"] == 0.0, row


@pytest.mark.parametrize("mode", ["loop", "loop_env"])
def test_training_run_on_a_mesh_equals_one_device(tmp_path, mode):
    """The shortened default run, and the multi-turn calculator run (warm start on conversations,
    GRPO on trajectories with the tool called on the host), on 2×2×2 against one device."""
    sys.path.insert(0, HERE)
    from sharded_equivalence import run_loop

    [sharded] = _run([os.path.join(HERE, "sharded_equivalence.py"), mode, str(tmp_path / "mesh")])
    want = run_loop(str(tmp_path / "one"), [], env=mode == "loop_env")
    timing = ("time/", "tokens_per_s")
    names = [name for name in want if not name.startswith(timing)]
    assert names and sorted(names) == sorted(n for n in sharded["metrics"] if not n.startswith(timing))
    for name in names:
        np.testing.assert_allclose(sharded["metrics"][name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
    for run_dir in (tmp_path / "mesh", tmp_path / "one"):  # on the mesh and on one device, no step compiles again
        with open(run_dir / "metrics.jsonl") as file:
            compiles = [json.loads(line)["time/compiles"] for line in file]
        assert len(compiles) >= 2 and compiles == [compiles[0]] * len(compiles), (run_dir, compiles)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one_and_share_a_checkpoint(tmp_path):
    """2 processes × 2 CPU devices on 127.0.0.1 run a sharded step, save a checkpoint and run a
    short training run; one process alone computes the same and restores the pair's checkpoint."""
    script, port = os.path.join(HERE, "multihost_step.py"), str(_free_port())
    pair = [subprocess.Popen([sys.executable, script, "pair", port, str(i), str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for process in pair:
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-4000:]
    _run([script, "single", str(tmp_path)])
    two, one = np.load(tmp_path / "pair.npz"), np.load(tmp_path / "single.npz")
    restored = np.load(tmp_path / "restored.npz")
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    for name in restored.files:
        np.testing.assert_allclose(two[name], one[name], atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(restored[name], two[name], err_msg=name)
    # The whole training loop across the two processes: process 0 wrote the run's metrics.
    from jaxrl_llm.metrics import read_metrics

    pair_rows, single_rows = read_metrics(tmp_path / "pair_run"), read_metrics(tmp_path / "single_run")
    assert [row["step"] for row in pair_rows] == [row["step"] for row in single_rows] == [0, 1]
    for got, want in zip(pair_rows, single_rows):
        for name, value in want.items():
            if not name.startswith(("time/", "tokens_per_s")):
                np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
