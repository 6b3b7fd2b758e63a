"""The benchmarks run: a tiny-model training step agrees with PyTorch, the runner keeps RESULTS.md's
other section, GRPO's shared reward reads both sides' completions. Nothing here times anything."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ sits beside tests/


@pytest.mark.parametrize("name", ["forward", "generate", "train_step", "grpo_iteration", "__main__"])
def test_benchmark_modules_import(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(getattr(module, "measure", None) or module.main)


def test_train_step_smoke_agrees_with_torch():
    from benchmarks import train_step

    args = train_step.parse_args(["--smoke", "--repeats", "1"])
    result = train_step.measure(args)  # exits when the two steps' losses differ by more than 1e-4
    assert result.work == 2 * 32 and result.unit == "tok/s" and result.ours_s > 0 and result.baseline_s > 0


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
