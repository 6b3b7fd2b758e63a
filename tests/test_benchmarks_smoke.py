"""The benchmarks run: a tiny-model training step agrees with PyTorch, the runner keeps RESULTS.md's
other section, GRPO's shared reward reads both sides' completions. Nothing here times anything."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ sits beside tests/


@pytest.mark.parametrize(
    "name", ["forward", "generate", "rollout_precision", "continuous", "train_step", "grpo_iteration", "overlap",
             "lora", "multiturn", "sweep", "__main__"]
)
def test_benchmark_modules_import(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(getattr(module, "measure", None) or module.main)


def test_train_step_smoke_agrees_with_torch():
    from benchmarks import train_step

    args = train_step.parse_args(["--smoke", "--repeats", "1"])
    result = train_step.measure(args)  # exits when the two steps' losses differ by more than 1e-4
    assert result.work == 2 * 32 and result.unit == "tok/s" and result.ours_s > 0 and result.baseline_s > 0
    assert result.compiles_after_warmup == 0 and result.compile_s > 0


def test_lora_smoke_agrees_with_peft():
    from benchmarks import lora

    args = lora.parse_args(["--smoke", "--repeats", "1", "--no-grpo"])
    result = lora.measure(args)  # exits when our LoRA step's loss and PEFT's differ by more than 1e-4
    assert result.ours_s > 0 and result.baseline_s > 0 and result.compiles_after_warmup == 0


def test_multiturn_smoke_samples_the_same_conversations_both_ways():
    from benchmarks import multiturn

    result = multiturn.measure(multiturn.parse_args(["--smoke", "--repeats", "1"]))  # exits when they differ
    assert result.work == 2 * 4 * 6 and result.ours_s > 0 and result.baseline_s > 0
    assert result.compiles_after_warmup == 0


def test_timing_counts_the_compiles_of_each_call():
    import jax

    from benchmarks.common import time_interleaved

    double = jax.jit(lambda x: x * 2)
    sizes = iter(range(4, 100))
    timings = time_interleaved({
        "steady": lambda: double(np.ones(3)).block_until_ready(),
        "growing": lambda: double(np.ones(next(sizes))).block_until_ready(),  # a new shape, a new program
    }, repeats=3)
    assert timings["steady"].first_compiles.count == timings["growing"].first_compiles.count == 1
    assert timings["steady"].compiles == 0 and timings["growing"].compiles == 3


def test_runner_replaces_only_its_section(tmp_path):
    from benchmarks.__main__ import GPU_NOT_RUN, HEADER, update_results

    path = tmp_path / "RESULTS.md"
    update_results("## CPU\n\ncpu-one\n", gpu=False, path=path)
    assert path.read_text().startswith(HEADER.split("\n")[0]) and GPU_NOT_RUN.strip() in path.read_text()
    update_results("## GPU\n\ngpu-one\n", gpu=True, path=path)
    update_results("## CPU\n\ncpu-two\n", gpu=False, path=path)
    text = path.read_text()
    assert "cpu-two" in text and "gpu-one" in text and "cpu-one" not in text and "Not run yet" not in text
    assert text.index("## CPU") < text.index("## GPU")


def test_grpo_reward_reads_plain_and_chat_completions():
    from benchmarks.grpo_iteration import shaped_reward

    plain = shaped_reward(["q", "q"], ["It is 7", "8"], answer=["7", "7"])
    chat = shaped_reward(["q", "q"], [[{"role": "assistant", "content": c}] for c in ("It is 7", "8")],
                         answer=["7", "7"], completion_ids=[[1], [2]])
    np.testing.assert_allclose(plain, [1 - 7e-3, -1e-3], rtol=1e-6)
    np.testing.assert_array_equal(plain, chat)


def test_random_weights_source_without_the_gguf(smollm2, tmp_path, monkeypatch):
    """--random-weights writes an HF folder of the architecture (tiny here) that both sides load,
    with the tokenizer of --tokenizer; without the flag a missing GGUF is a clear exit."""
    import argparse

    from benchmarks import common
    from jaxrl_llm.models.load import load_model

    monkeypatch.setattr(common, "smollm2_gguf", lambda: None)
    monkeypatch.setattr(common, "SMOLLM2_135M", dict(
        vocab_size=smollm2.config.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True,
    ))
    smollm2.tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(SystemExit, match="pass --random-weights"):
        common.smollm2_source(str(tmp_path / "a"), argparse.Namespace(random_weights=False, tokenizer=None))

    args = argparse.Namespace(random_weights=True, tokenizer=str(tmp_path / "tok"))
    source = common.smollm2_source(str(tmp_path / "b"), args)
    ours = load_model(source)
    theirs = common.hf_model(source, "float32")
    assert ours.config.num_layers == theirs.config.num_hidden_layers == 2
    assert ours.tokenizer.encode("12 + 34 =") == smollm2.tokenizer.encode("12 + 34 =")
    assert not (common.smollm2_source(str(tmp_path / "c"), argparse.Namespace(random_weights=True, tokenizer=None))
                / "tokenizer.json").exists()
