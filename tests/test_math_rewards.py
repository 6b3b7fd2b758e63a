"""Verifiable math rewards: math_answer (math-verify) and think_format on hand-written answers, from
worker threads and through `combine`; the math data script and configs/math_grpo.yaml."""

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import math_verify  # noqa: F401  (CI installs it: a missing package fails here instead of skipping)
import numpy as np
import pytest

from jaxrl_llm import rewards
from jaxrl_llm.config import load_config
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.rewards import RewardError
from jaxrl_llm.run.registry import check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (completion, gold answer): math-verify reads both as the same number, set or interval.
EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    (r"The answer is $\frac{1}{2}$.", 0.5),
    (r"\boxed{\frac{3}{4}}", "0.75"),
    ("so it is 1/2", "0.5"),
    (r"Hence \boxed{\dfrac{3}{8}}.", r"\frac{3}{8}"),
    (r"$\frac12$", "0.5"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),
    (r"\boxed{\{1, 2\}}", r"\{2, 1\}"),
    (r"\boxed{[0, 1)}", "[0,1)"),
    ("The total is 1,234,567 dollars", 1234567),
    ("First 3 apples, then 4 more: 3 + 4 = 7. Final answer: 7", "7"),
    ("x = 5", 5),
    (r"$x = 5$", "5"),
    (r"\boxed{5}", "x = 5"),
    ("The sale price is 37.50", "37.5"),
    (r"<think>half of 3/4 is 3/8</think> The answer is \boxed{\frac{3}{8}}.", "0.375"),
    (r"<think>3/4 * 1/2</think> It needs 0.375 cups.", r"\frac{3}{8}"),
    (r"\boxed{\frac{\pi}{2}}", r"\pi/2"),
    (r"\boxed{-\frac{5}{2}}", "-2.5"),
    (r"\boxed{37.5\%}", "0.375"),
]

# The last number rule of `arithmetic_exact` fails these; math-verify reads the answer.
ONLY_MATH = [
    (r"\frac{1}{2}", "0.5"),  # last number 2
    (r"\boxed{\frac{3}{4}}", "0.75"),  # last number 4
    ("so it is 1/2", "0.5"),  # last number 2
    (r"The answer is \boxed{4}. Check: 2 + 2 = 4, and 4 < 5", "4"),  # last number 5
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),  # last numbers 2 and 8
    ("It takes 0.375 cups.", r"\frac{3}{8}"),  # gold's last number is 8
]

WRONG = [
    (r"\boxed{\frac{1}{2}}", "0.25"),
    ("8", "7"),
    (r"\boxed{-3}", "3"),
    ("0.333", "1/3"),  # rounded: math-verify compares to 6 decimal places
    (r"\boxed{5} (I first thought 7)", "7"),  # the boxed answer counts, not the last number
    (r"\boxed{2\sqrt{3}}", r"\sqrt{8}"),
    (r"\boxed{(0, 1)}", "[0,1)"),
]

MALFORMED = [
    r"\boxed{\frac{1}{2}",  # never closed: a truncated answer, though its value is right
    r"The answer is \boxed{0.",
    "",
    "   \n\t ",
    "\x00\xff\ufffd garbage }{$$\\frac{",
    r"\boxed{}",
    "\\[" * 30000 + " no answer",  # quadratic in math-verify's regexes without the tail cut
    "no numbers at all, only words",
    "\udcff\ud800 lone surrogates",
]


def math_answer(completions, answers, **kw):
    return rewards.math_answer(None, list(completions), answer=list(answers), **kw)


@pytest.mark.parametrize("completion, gold", EQUIVALENT)
def test_math_answer_accepts_equivalent_forms(completion, gold):
    assert math_answer([completion], [gold])[0] == 1.0


def test_math_answer_succeeds_where_the_last_number_fails():
    completions, golds = zip(*ONLY_MATH)
    np.testing.assert_array_equal(rewards.arithmetic_exact(None, completions, answer=golds), 0.0)
    np.testing.assert_array_equal(math_answer(completions, golds), 1.0)


@pytest.mark.parametrize("completion, gold", WRONG)
def test_math_answer_rejects_wrong_answers(completion, gold):
    assert math_answer([completion], [gold])[0] == 0.0


def test_math_answer_scores_malformed_output_incorrect_without_raising():
    got = math_answer(MALFORMED + ["\\boxed{\\frac{1}{2}}"], ["0.5"] * (len(MALFORMED) + 1), correct=1.0,
                      incorrect=-1.0)
    np.testing.assert_array_equal(got, [-1.0] * len(MALFORMED) + [1.0])
    assert got.dtype == np.float32 and got.shape == (len(MALFORMED) + 1,)
    long = "reasoning 1, 2, 3. " * 20000 + r"so \boxed{\frac{1}{2}}"  # 380,000 characters: the end is read
    assert math_answer([long], ["1/2"])[0] == 1.0


def test_math_answer_times_out_on_the_main_thread(monkeypatch):
    monkeypatch.setattr(rewards, "MATH_TIMEOUT_S", 1)
    assert math_answer([r"\boxed{9^{9^{9}}}"], ["7"])[0] == 0.0  # sympy would compute 9^387420489


def test_math_answer_rejects_an_unreadable_gold_answer():
    for gold in ["", "\\frac{", None]:
        with pytest.raises(ValueError, match="is no expression math-verify can read"):
            math_answer(["1"], [gold])


def test_math_answer_without_math_verify_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify raises ImportError
    with pytest.raises(RewardError, match=r"pip install 'jaxrl_llm\[math\]'"):
        math_answer(["1"], ["1"])


def test_math_answer_from_worker_threads_matches_the_main_thread():
    cases = EQUIVALENT + WRONG + [(m, "0.5") for m in MALFORMED[:6]]
    completions, golds = zip(*cases)
    main = math_answer(completions, golds)
    with ThreadPoolExecutor(2) as pool:
        assert threading.current_thread() is threading.main_thread()
        futures = [pool.submit(math_answer, completions[i::2], golds[i::2]) for i in range(2)]
        worker = [f.result() for f in futures]
    np.testing.assert_array_equal(worker[0], main[0::2])
    np.testing.assert_array_equal(worker[1], main[1::2])
    box = {}
    thread = threading.Thread(target=lambda: box.update(got=math_answer(completions, golds)))
    thread.start()
    thread.join()
    np.testing.assert_array_equal(box["got"], main)


THINK = [
    ("<think>3/4 of a cup, halved, is 3/8.</think> \\boxed{\\frac{3}{8}}", 1.0),
    ("<think>\nreasoning\n</think>\nThe answer is 7.", 1.0),
    ("\n <think>reasoning</think>7", 1.0),  # leading whitespace is allowed
    ("<think>reasoning</think>", 0.0),  # no answer
    ("<think>reasoning</think>  \n", 0.0),  # blank answer
    ("<think> </think> 7", 0.0),  # blank reasoning
    ("<think>reasoning 7", 0.0),  # never closed
    ("reasoning</think> 7", 0.0),  # opened by the chat template: the completion must open it
    ("The answer <think>is</think> 7", 0.0),  # not at the start
    ("<think>a <think>b</think> c</think> 7", 0.0),  # nested
    ("<think>a</think><think>b</think> 7", 0.0),  # two blocks
    ("<think>a</think> 7 </think>", 0.0),  # a stray closing tag (TRL accepts it)
    ("7", 0.0),
    ("", 0.0),
]


def test_think_format():
    completions, expected = zip(*THINK)
    got = rewards.think_format(None, list(completions))
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(rewards.think_format(None, ["<think>a</think>b", "x"], matched=0.5, unmatched=-1),
                                  [0.5, -1.0])


def test_math_rewards_through_combine():
    assert rewards.resolve("math_answer") is rewards.math_answer
    assert rewards.resolve("think_format") is rewards.think_format
    score = rewards.combine(["math_answer", "think_format"], [1.0, 0.2])
    completions = ["<think>3/4 × 1/2</think> \\boxed{\\frac{3}{8}}", "<think>hmm</think> \\boxed{0.5}", "0.375",
                   "<think>x</think> \\boxed{\\frac{3}{8}"]
    total, parts = score(["p"] * 4, completions, answer=["0.375"] * 4, prompt_ids=[[1]] * 4)
    np.testing.assert_array_equal(parts["math_answer"], [1, 0, 1, 0])
    np.testing.assert_array_equal(parts["think_format"], [1, 1, 0, 1])
    np.testing.assert_allclose(total, [1.2, 0.2, 1.0, 0.2], rtol=1e-6)
    with pytest.raises(RewardError, match=r"reward function 'math_answer' raised ValueError: answer 'n/\{' is no"):
        score(["p"], ["1"], answer=["n/{"])


def make_data(path, n):
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "make_math_data.py"), "--out", str(path),
                    "--n", str(n)], check=True, capture_output=True, timeout=60)
    with open(path) as file:
        return [json.loads(line) for line in file]


def test_math_data_is_deterministic_and_its_worked_answers_earn_both_rewards(tmp_path):
    rows = make_data(tmp_path / "a.jsonl", 60)
    assert rows == make_data(tmp_path / "b.jsonl", 60)
    assert all(set(row) == {"prompt", "answer", "completion"} and "\\boxed{}" in row["prompt"] for row in rows)
    assert any("\\frac" in row["answer"] for row in rows) and any("." in row["answer"] for row in rows)
    completions, answers = [row["completion"] for row in rows], [row["answer"] for row in rows]
    np.testing.assert_array_equal(math_answer(completions, answers), 1.0)
    np.testing.assert_array_equal(rewards.think_format(None, completions), 1.0)
    assert math_answer(completions[1:] + completions[:1], answers).mean() < 0.5


def test_math_grpo_preset_checks_with_the_generated_data(tmp_path):
    data = tmp_path / "math.jsonl"
    make_data(data, 200)
    config = check(load_config(os.path.join(ROOT, "configs", "math_grpo.yaml"), [f"data.task={data}"]))
    assert config.grpo.reward_functions == ("math_answer", "think_format")
    assert config.data.task == str(data) and config.model.source == "smollm2"
    with pytest.raises(ConfigError, match=r"math_answer, whose timeout needs the main thread.*sampling.overlap=false"):
        check(load_config(os.path.join(ROOT, "configs", "math_grpo.yaml"),
                          [f"data.task={data}", "sampling.overlap=true"]))
