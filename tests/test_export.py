"""`jaxrl_llm.export`: any checkpoint of a run exported without resuming it, equal to what a run stopped
there exports; sharded safetensors with an index that transformers loads."""

import json
import os

import jax
import numpy as np
import safetensors.numpy
import torch
import transformers

from jaxrl_llm.config import load_config
from jaxrl_llm.export import export_run
from jaxrl_llm.models.load import export_hf, load_model
from jaxrl_llm.models.transformer import ModelConfig, init_params
from jaxrl_llm.run import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.head_dim=8", "data.synthetic.num_examples=200", "data.eval_size=8", "data.batch_size=8",
    "optim.decay_steps=4",  # one learning-rate schedule for runs of 2 and 4 steps
]


def tensors(folder):
    """{name: array} of an HF folder's safetensors, sharded or not."""
    files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    return {k: v for name in files for k, v in safetensors.numpy.load_file(os.path.join(folder, name)).items()}


def test_export_of_a_step_equals_the_export_of_a_run_stopped_there(tmp_path):
    sft = lambda run_dir, *more: load_config(os.path.join(ROOT, "configs", "sft.yaml"),
                                             [*TINY, f"run_dir={run_dir}", "train.eval_every=2", *more])
    train(sft(tmp_path / "long", "train.total_steps=4", "train.checkpoint_every=2"), quiet=True)
    train(sft(tmp_path / "short", "train.total_steps=2"), quiet=True)
    out = export_run(str(tmp_path / "long"), step=1)
    assert out == str(tmp_path / "long" / "export_step_1")
    stopped, exported = tensors(tmp_path / "short" / "hf"), tensors(os.path.join(out, "hf"))
    assert stopped.keys() == exported.keys()
    for name in stopped:
        np.testing.assert_array_equal(exported[name], stopped[name], err_msg=name)
    with open(tmp_path / "short" / "hf" / "config.json") as a, open(os.path.join(out, "hf", "config.json")) as b:
        assert json.load(a) == json.load(b)
    # The latest checkpoint is what the run itself exported at its end, model card included.
    latest = export_run(str(tmp_path / "long"), out=str(tmp_path / "again"))
    run_hf, again_hf = tmp_path / "long" / "hf", os.path.join(latest, "hf")
    assert tensors(run_hf).keys() == tensors(again_hf).keys()
    for name, array in tensors(run_hf).items():
        np.testing.assert_array_equal(tensors(again_hf)[name], array, err_msg=name)
    card = (run_hf / "README.md").read_text()
    assert "sft policy" in card and "| eval/loss |" in card and "`optim.lr`" in card
    assert card.replace(str(run_hf), "X") == open(os.path.join(again_hf, "README.md")).read().replace(again_hf, "X")


def test_a_sharded_export_round_trips_through_transformers(tmp_path):
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
    export_hf(params, tmp_path, config, max_shard_bytes=20_000)
    with open(tmp_path / "model.safetensors.index.json") as file:
        index = json.load(file)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert all(os.path.getsize(tmp_path / shard) < 20_000 + 1024 for shard in shards)  # + the header
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors(tmp_path).values())
    tokens_BxT = np.arange(1, 9, dtype=np.int32)[None]
    ours = np.asarray(load_model(tmp_path).logits(params, tokens_BxT, np.ones_like(tokens_BxT)))
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()(
            input_ids=torch.as_tensor(tokens_BxT, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    export_hf(params, tmp_path, config)  # one file again: the shards and their index go
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("model")) == ["model.safetensors"]


def test_a_lora_ppo_runs_critic_exports_from_its_checkpoint(tmp_path):
    # The checkpoint holds the critic's adapters and head; the export grows its frozen trunk again.
    config = lambda name, *more: load_config(os.path.join(ROOT, "configs", f"{name}.yaml"), [
        *TINY, "model.source=tiny", f"run_dir={tmp_path / name}", "train.total_steps=1", "train.eval_every=0", *more])
    train(config("rm"), quiet=True)
    ppo = train(config("ppo", f"model.reward_model_path={tmp_path / 'rm' / 'hf'}", "model.lora.rank=4",
                       "ppo.epochs=1", "ppo.num_minibatches=1", "data.max_completion_len=8"), quiet=True)
    exported = export_run(ppo.run_dir, out=str(tmp_path / "again"))
    run_critic, again_critic = tensors(tmp_path / "ppo" / "critic_hf"), tensors(os.path.join(exported, "critic_hf"))
    assert run_critic.keys() == again_critic.keys() and "score.weight" in run_critic
    for name, array in run_critic.items():
        np.testing.assert_array_equal(again_critic[name], array, err_msg=name)
