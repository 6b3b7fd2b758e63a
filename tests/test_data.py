"""Data: JSONL / HF loading with clear errors, synthetic tasks, resumable batching, padding."""

import json
import re
import sys
import types

import numpy as np
import pytest

from jaxrl_llm import data
from jaxrl_llm.config import DataSection, SyntheticSection
from jaxrl_llm.data import DataError


def write_jsonl(path, rows):
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return str(path)


def char_tokenize(prompt):
    """A tokenizer stand-in: one id per character of the text (or of each message's content)."""
    text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
    return [ord(c) % 250 + 3 for c in text]


def test_jsonl_per_algorithm(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "Hi", "completion": "Hello"},
        "",
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "id": 7},
    ])
    first, second = data.load_jsonl(path, "sft")
    assert first == {"prompt": "Hi", "completion": "Hello"}
    assert second == {"prompt": [{"role": "user", "content": "2+2?"}], "completion": "4", "id": 7}
    pairs = data.load_jsonl(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}]), "dpo")
    assert pairs == [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    rows = data.load_jsonl(write_jsonl(tmp_path / "g.jsonl", [{"prompt": "What is 1 + 2?", "answer": "3"}]), "grpo")
    assert rows == [{"prompt": "What is 1 + 2?", "answer": "3"}]
    chat = data.load_jsonl(str(tmp_path / "g.jsonl"), "grpo", chat=True)
    assert chat[0]["prompt"] == [{"role": "user", "content": "What is 1 + 2?"}] and chat[0]["answer"] == "3"


def test_custom_field_names_map_to_canonical_ones(tmp_path):
    fields = data.field_map(DataSection(prompt_field="question", chosen_field="good", rejected_field="bad"))
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "good": "a", "bad": "b", "margin": 1.0}])
    assert data.load_jsonl(path, "rm", fields) == [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.0}]
    with pytest.raises(DataError, match=r"line 1: missing field 'question'; grpo examples need question\. If your "
                                        r"data calls it something else, set data.prompt_field\."):
        data.load_jsonl(write_jsonl(tmp_path / "y.jsonl", [{"prompt": "q"}]), "grpo", fields)


def test_jsonl_errors_name_the_file_line_and_field(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(f"data file {missing!r} not found")):
        data.load_jsonl(missing, "sft")
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError, match=r"a\.jsonl line 2: missing field 'rejected'; rm examples need prompt, chosen, "
                                        r"rejected"):
        data.load_jsonl(path, "rm")
    with pytest.raises(DataError, match=r"line 1: missing field 'completion'; sft examples need prompt, completion "
                                        r"\(or 'messages'\)"):
        data.load_jsonl(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q"}]), "sft")
    with pytest.raises(DataError, match=r"c\.jsonl line 2: not valid JSON"):
        data.load_jsonl(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q"}, "{oops"]), "grpo")
    with pytest.raises(DataError, match=r"line 1: expected a JSON object, got list"):
        data.load_jsonl(write_jsonl(tmp_path / "d.jsonl", ["[1, 2]"]), "grpo")
    with pytest.raises(DataError, match=r"line 1: field 'chosen' must be a string, got int"):
        data.load_jsonl(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "chosen": 1, "rejected": "b"}]), "dpo")
    with pytest.raises(DataError, match=r"field 'prompt' must be a string or a list of \{role, content\} messages"):
        data.load_jsonl(write_jsonl(tmp_path / "f.jsonl", [{"prompt": [{"role": "user"}]}]), "ppo")
    bad_chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}
    with pytest.raises(DataError, match=r"line 1: field 'messages' must be a list of .* before a final assistant turn"):
        data.load_jsonl(write_jsonl(tmp_path / "g.jsonl", [bad_chat]), "sft")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl holds no examples"):
        data.load_jsonl(str(tmp_path / "empty.jsonl"), "sft")


def test_hf_datasets_are_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"data.task 'hf:some/set' needs the datasets package: pip install datasets"):
        data.load_hf("some/set", "train", "grpo")
    rows = {"train": [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}], "test": []}
    fake = types.SimpleNamespace(load_dataset=lambda name, split: rows[split])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    fields = data.field_map(DataSection(prompt_field="question"))
    expected = [{"prompt": "q1", "answer": "1"}, {"prompt": "q2", "answer": "2"}]
    assert data.load_hf("some/set", "train", "grpo", fields) == expected
    with pytest.raises(DataError, match=r"some/set \[train\] row 0: missing field 'chosen'"):
        data.load_hf("some/set", "train", "dpo", fields)
    with pytest.raises(DataError, match=r"some/set \[test\] holds no examples"):
        data.load_hf("some/set", "test", "grpo", fields)


def test_arithmetic_task_answers_its_prompts():
    examples = data.arithmetic_task(200, seed=3, digits=2, operators=("+", "-", "*"))
    assert examples == data.arithmetic_task(200, seed=3, digits=2, operators=("+", "-", "*"))
    assert examples != data.arithmetic_task(200, seed=4, digits=2, operators=("+", "-", "*"))
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    seen = set()
    for example in examples:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", example["prompt"]).groups()
        assert 0 <= int(a) < 100 and 0 <= int(b) < 100
        assert example["answer"] == example["completion"] == str(ops[op](int(a), int(b)))
        seen.add(op)
    assert seen == {"+", "-", "*"}
    chat = data.arithmetic_task(3, seed=3, digits=1, chat=True)
    assert chat[0]["prompt"] == [{"role": "user", "content": data.arithmetic_task(3, seed=3, digits=1)[0]["prompt"]}]
    with pytest.raises(DataError, match=r"arithmetic operators must be among \+, -, \*, got \['/'\]"):
        data.arithmetic_task(3, seed=0, operators=("/",))


def test_preference_task_has_a_known_hidden_preference():
    examples = data.preference_task(100, seed=1, target="a")
    assert examples == data.preference_task(100, seed=1, target="a")
    for example in examples:
        assert data.preference_score(example["chosen"]) > data.preference_score(example["rejected"])
        assert example["completion"] == example["chosen"] and example["preference_target"] == "a"
    assert data.preference_score("banana cat", "a") == 4.0
    other = data.preference_task(20, seed=1, target="o")
    assert all(ex["chosen"].count("o") > ex["rejected"].count("o") for ex in other)
    with pytest.raises(DataError, match=r"preference target 'q' occurs in none of the task's words"):
        data.preference_task(1, seed=0, target="q")


def test_load_examples_dispatches_on_the_task(tmp_path):
    synthetic = SyntheticSection(num_examples=50, digits=1)
    examples = data.load_examples(DataSection(task="arithmetic", synthetic=synthetic), "grpo", seed=0)
    assert len(examples) == 50 and set(examples[0]) == {"prompt", "completion", "answer"}
    pairs = data.load_examples(DataSection(task="preference", synthetic=synthetic, apply_chat_template=True), "dpo", 0)
    assert pairs[0]["prompt"][0]["role"] == "user" and pairs[0]["chosen"]
    with pytest.raises(DataError, match=r"synthetic task 'arithmetic' example 0: missing field 'chosen'"):
        data.load_examples(DataSection(task="arithmetic", synthetic=synthetic), "dpo", 0)
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": "x", "completion": "y"}])
    loaded = data.load_examples(DataSection(task=path, prompt_field="q"), "sft", 0)
    assert loaded == [{"prompt": "x", "completion": "y"}]


def test_split_eval_is_seeded_and_disjoint():
    examples = [{"i": i} for i in range(20)]
    train, held = data.split_eval(examples, 5, seed=0)
    assert len(train) == 15 and len(held) == 5
    assert sorted(e["i"] for e in train + held) == list(range(20))
    assert (train, held) == data.split_eval(examples, 5, seed=0)
    assert held != data.split_eval(examples, 5, seed=1)[1]
    with pytest.raises(DataError, match=r"data.eval_size \(20\) leaves no training examples out of 20"):
        data.split_eval(examples, 20, seed=0)


def test_batches_are_epoch_permutations_and_resume_exactly():
    examples = [{"i": i} for i in range(10)]
    batches = [batch for _, (_, batch) in zip(range(9), data.iterate_batches(examples, 3, seed=5))]
    for epoch in range(3):
        ids = [e["i"] for batch in batches[3 * epoch : 3 * epoch + 3] for e in batch]
        assert len(set(ids)) == 9  # no repeats within an epoch; one example is left over
    assert batches[:3] != batches[3:6]  # each epoch draws its own order
    resumed = data.iterate_batches(examples, 3, seed=5, start_step=4)
    assert [next(resumed) for _ in range(5)] == list(enumerate(batches))[4:9]
    assert [b for _, (_, b) in zip(range(9), data.iterate_batches(examples, 3, seed=6))] != batches
    assert data.batch_indices(10, 3, step=4, seed=0, shuffle=False).tolist() == [3, 4, 5]
    with pytest.raises(DataError, match=r"the dataset has 2 training examples, fewer than one batch of 3; lower "
                                        r"data.batch_size"):
        next(data.iterate_batches(examples[:2], 3, seed=0))


def test_collate_makes_columns():
    columns = data.collate([{"prompt": "a", "answer": "1"}, {"prompt": "b", "extra": 2}])
    assert columns == {"prompt": ["a", "b"], "answer": ["1", None], "extra": [None, 2]}


def test_prompts_over_the_budget_error_truncate_or_skip():
    examples = [{"prompt": "short"}, {"prompt": "a much longer prompt"}]
    with pytest.raises(DataError, match=r"example 1 \('a much longer prompt'...\): the prompt has 20 tokens, over "
                                        r"data.max_prompt_len=8; raise data.max_prompt_len, or set "
                                        r"data.prompt_overflow=truncate"):
        data.tokenize_prompts(examples, char_tokenize, 8)
    truncated = data.tokenize_prompts(examples, char_tokenize, 8, "truncate")
    assert truncated[1]["prompt_ids"] == char_tokenize("a much longer prompt")[-8:]
    assert truncated[0]["prompt_ids"] == char_tokenize("short") and truncated[0]["prompt"] == "short"
    assert [e["prompt"] for e in data.tokenize_prompts(examples, char_tokenize, 8, "skip")] == ["short"]
    with pytest.raises(DataError, match=r"every prompt is longer than data.max_prompt_len=3"):
        data.tokenize_prompts(examples, char_tokenize, 3, "skip")


def test_padding_into_buckets():
    assert [data.bucket_length(n, 100) for n in (0, 1, 16, 17, 33, 64, 65, 99)] == [16, 16, 16, 32, 64, 64, 100, 100]
    ids, mask = data.left_pad([[5, 6, 7], [8], []], 4, pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    assert ids.dtype == np.int32 and mask.dtype == bool
    ids, mask = data.right_pad([[5, 6], [7]], 3, pad_id=1)
    np.testing.assert_array_equal(ids, [[5, 6, 1], [7, 1, 1]])
    np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="sequence 0 has 3 tokens, more than the padded length 2"):
        data.left_pad([[1, 2, 3]], 2, 0)
    ids, mask = data.pad_prompts([list(range(20)), [1]], 64, 0)
    assert ids.shape == (2, 32) and mask.sum() == 21 and ids[1, -1] == 1


def test_prompt_completion_layout():
    tokens, mask, loss_mask = data.pad_prompt_completion([[1, 2], [3]], [[7, 8, 9], list(range(10, 40))], 16, 20, 0)
    assert tokens.shape == (2, 16 + 20)
    np.testing.assert_array_equal(tokens[0, 14:19], [1, 2, 7, 8, 9])
    np.testing.assert_array_equal(tokens[1, 15:17], [3, 10])
    assert mask[1].sum() == 1 + 20 and loss_mask[1].sum() == 20  # completion cut at max_completion_len
    assert loss_mask[0, :16].sum() == 0 and loss_mask[0].sum() == 3 and mask[0].sum() == 5
