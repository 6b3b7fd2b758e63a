"""Reward functions: built-ins on hand-written examples, lookup by name or path, weighted sums, overlong shaping."""

import numpy as np
import pytest

from jaxrl_llm import rewards
from jaxrl_llm.rewards import RewardError


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "lab_rewards.py").write_text(
        "def brevity(prompts, completions, **fields):\n"
        "    return [-len(c) / 10 for c in completions]\n"
        "def broken(prompts, completions, **fields):\n"
        "    raise KeyError('answer')\n"
        "def short(prompts, completions, **fields):\n"
        "    return [1.0]\n"
        "def nan(prompts, completions, **fields):\n"
        "    return [0.0, float('nan')]\n"
        "THRESHOLD = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "lab_rewards"


def test_last_number():
    assert rewards.last_number("The answer is 81.") == 81.0
    assert rewards.last_number("23 + 58 = 81") == 81.0
    assert rewards.last_number("it is -35") == -35.0
    assert rewards.last_number("1,234 apples and 2.5 pears") == 2.5
    assert rewards.last_number("total: 1,234") == 1234.0
    assert rewards.last_number("no digits here") is None


def test_arithmetic_exact():
    completions = ["81", "The answer is 81.", "80", "I think 81, no wait 80", "", "-35"]
    answers = ["81", "81", "81", "81", "81", -35]
    got = rewards.arithmetic_exact(None, completions, answer=answers)
    np.testing.assert_array_equal(got, [1, 1, 0, 0, 0, 1])
    assert got.dtype == np.float32
    signed = rewards.arithmetic_exact(None, ["81", "7"], answer=["81", "81"], correct=1.0, incorrect=-1.0, extra=[1, 2])
    np.testing.assert_array_equal(signed, [1, -1])
    with pytest.raises(ValueError, match="answer 'n/a' holds no number"):
        rewards.arithmetic_exact(None, ["1"], answer=["n/a"])


def test_arithmetic_format():
    completions = ["81", " -35. ", "1,234", "The answer is 81.", "81 apples", "", "8 1"]
    np.testing.assert_array_equal(rewards.arithmetic_format(None, completions), [1, 1, 1, 0, 0, 0, 0])


def test_preference_score_reward():
    got = rewards.preference_score(None, ["banana", "sky", "moon"], preference_target=["a", "a", "o"])
    np.testing.assert_array_equal(got, [3, 0, 2])


def test_resolve_by_name_and_import_path(user_module):
    assert rewards.resolve("arithmetic_exact") is rewards.arithmetic_exact
    assert rewards.resolve(f"{user_module}:brevity")(None, ["abcd"]) == [-0.4]
    assert rewards.resolve("jaxrl_llm.rewards:arithmetic_format") is rewards.arithmetic_format
    with pytest.raises(RewardError, match=r"unknown reward function 'arithmetic_exct'; did you mean "
                                          r"'arithmetic_exact'\? built-in: arithmetic_exact, arithmetic_format, "
                                          r"math_answer, preference_score, think_format; or give module:function\."):
        rewards.resolve("arithmetic_exct")
    with pytest.raises(RewardError, match=r"reward function 'lab_rewardz:brevity': cannot import module 'lab_rewardz' "
                                          r"\(No module named 'lab_rewardz'\)"):
        rewards.resolve("lab_rewardz:brevity")
    with pytest.raises(RewardError, match=r"module 'lab_rewards' has no function 'brevty'\. did you mean "
                                          r"'lab_rewards:brevity'\?"):
        rewards.resolve(f"{user_module}:brevty")
    with pytest.raises(RewardError, match=r"module 'lab_rewards' has no function 'THRESHOLD'"):
        rewards.resolve(f"{user_module}:THRESHOLD")


def test_combine_sums_weighted_rewards_and_reports_each(user_module):
    score = rewards.combine(["arithmetic_exact", "arithmetic_format", f"{user_module}:brevity"], [1.0, 0.5, 2.0])
    total, parts = score(["p1", "p2"], ["81", "it is 81"], answer=["81", "81"])
    np.testing.assert_allclose(parts["arithmetic_exact"], [1, 1])
    np.testing.assert_allclose(parts["arithmetic_format"], [1, 0])
    np.testing.assert_allclose(parts[f"{user_module}:brevity"], [-0.2, -0.8])
    np.testing.assert_allclose(total, [1 + 0.5 - 0.4, 1 - 1.6], rtol=1e-6)
    assert total.dtype == np.float32
    assert list(parts) == ["arithmetic_exact", "arithmetic_format", f"{user_module}:brevity"]
    total, _ = rewards.combine(["arithmetic_exact"])(["p"], ["3"], answer=["3"])
    np.testing.assert_array_equal(total, [1.0])


def test_combine_takes_extra_registries():
    def reward_model(prompts, completions, **fields):
        return np.full(len(completions), 0.5)

    registry = {**rewards.REGISTRY, "reward_model": reward_model}
    total, parts = rewards.combine(["reward_model", "arithmetic_format"], registry=registry)(["p"], ["7"])
    np.testing.assert_allclose(total, [1.5])
    assert set(parts) == {"reward_model", "arithmetic_format"}


def test_failing_reward_functions_are_named(user_module):
    with pytest.raises(RewardError, match=r"reward function 'lab_rewards:broken' raised KeyError: 'answer'"):
        rewards.combine([f"{user_module}:broken"])(["p"], ["c"])
    with pytest.raises(RewardError, match=r"'lab_rewards:short' returned shape \(1,\) for 2 completions"):
        rewards.combine([f"{user_module}:short"])(["p", "p"], ["a", "b"])
    with pytest.raises(RewardError, match=r"reward function 'lab_rewards:nan' returned nan for completion 1; rewards "
                                          r"must be finite"):
        rewards.combine([f"{user_module}:nan"])(["p", "p"], ["a", "b"])
    with pytest.raises(RewardError, match=r"reward function 'arithmetic_exact' raised TypeError: .*answer"):
        rewards.combine(["arithmetic_exact"])(["p"], ["1"])
    with pytest.raises(RewardError, match=r"2 reward weights for 1 reward functions"):
        rewards.combine(["arithmetic_exact"], [1.0, 2.0])
    with pytest.raises(RewardError, match=r"list one twice"):
        rewards.combine(["arithmetic_exact", "arithmetic_exact"])
    with pytest.raises(RewardError, match=r"no reward functions given"):
        rewards.combine([])

