"""Data: JSONL / HF loading with clear errors, synthetic tasks, resumable batching, padding."""

import json
import re
import sys
import types

import pytest

from jaxrl_llm import data
from jaxrl_llm.config import DataSection, SyntheticSection
from jaxrl_llm.data import DataError
from jaxrl_llm.rewards import count_target
from jaxrl_llm.run.registry import ALGORITHMS

FIELDS = {name: algorithm.fields for name, algorithm in ALGORITHMS.items()}


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
    first, second = data.load_jsonl(path, FIELDS["sft"])
    assert first == {"prompt": "Hi", "completion": "Hello"}
    assert second == {"prompt": [{"role": "user", "content": "2+2?"}], "completion": "4", "id": 7}
    pair_file = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    pairs = data.load_jsonl(pair_file, FIELDS["dpo"])
    assert pairs == [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    prompt_file = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "What is 1 + 2?", "answer": "3"}])
    rows = data.load_jsonl(prompt_file, FIELDS["grpo"])
    assert rows == [{"prompt": "What is 1 + 2?", "answer": "3"}]
    chat = data.load_jsonl(str(tmp_path / "g.jsonl"), FIELDS["grpo"], chat=True)
    assert chat[0]["prompt"] == [{"role": "user", "content": "What is 1 + 2?"}] and chat[0]["answer"] == "3"


def test_custom_field_names_map_to_canonical_ones(tmp_path):
    fields = data.field_map(DataSection(prompt_field="question", chosen_field="good", rejected_field="bad"))
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "good": "a", "bad": "b", "margin": 1.0}])
    want = [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.0}]
    assert data.load_jsonl(path, FIELDS["rm"], fields) == want
    with pytest.raises(DataError, match=r"line 1: missing field 'question'; these examples need question\. If your "
                                        r"data calls it something else, set data.prompt_field\."):
        data.load_jsonl(write_jsonl(tmp_path / "y.jsonl", [{"prompt": "q"}]), FIELDS["grpo"], fields)


def test_jsonl_errors_name_the_file_line_and_field(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=re.escape(f"data file {missing!r} not found")):
        data.load_jsonl(missing, FIELDS["sft"])
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError, match=r"a\.jsonl line 2: missing field 'rejected'; these examples need prompt, "
                                        r"chosen, rejected"):
        data.load_jsonl(path, FIELDS["rm"])
    with pytest.raises(DataError, match=r"line 1: missing field 'completion'; these examples need prompt, completion "
                                        r"\(or 'messages'\)"):
        data.load_jsonl(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q"}]), FIELDS["sft"])
    with pytest.raises(DataError, match=r"c\.jsonl line 2: not valid JSON"):
        data.load_jsonl(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q"}, "{oops"]), FIELDS["grpo"])
    with pytest.raises(DataError, match=r"line 1: expected a JSON object, got list"):
        data.load_jsonl(write_jsonl(tmp_path / "d.jsonl", ["[1, 2]"]), FIELDS["grpo"])
    with pytest.raises(DataError, match=r"line 1: field 'chosen' must be a string, got int"):
        data.load_jsonl(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "chosen": 1, "rejected": "b"}]),
                        FIELDS["dpo"])
    with pytest.raises(DataError, match=r"field 'prompt' must be a string or a list of \{role, content\} messages"):
        data.load_jsonl(write_jsonl(tmp_path / "f.jsonl", [{"prompt": [{"role": "user"}]}]), FIELDS["ppo"])
    bad_chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}
    with pytest.raises(DataError, match=r"line 1: field 'messages' must be a list of .* before a final assistant turn"):
        data.load_jsonl(write_jsonl(tmp_path / "g.jsonl", [bad_chat]), FIELDS["sft"])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl holds no examples"):
        data.load_jsonl(str(tmp_path / "empty.jsonl"), FIELDS["sft"])


def test_hf_datasets_are_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"data.task 'hf:some/set' needs the datasets package \(pip install datasets\)"):
        data.load_hf("some/set", "train", FIELDS["grpo"])
    rows = {"train": [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}], "test": []}

    def load_dataset(name, split):
        if name == "offline/set":
            raise ConnectionError("Couldn't reach 'offline/set' on the Hub (LocalEntryNotFoundError)")
        return rows[split]

    fake = types.SimpleNamespace(load_dataset=load_dataset)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    fields = data.field_map(DataSection(prompt_field="question"))
    expected = [{"prompt": "q1", "answer": "1"}, {"prompt": "q2", "answer": "2"}]
    assert data.load_hf("some/set", "train", FIELDS["grpo"], fields) == expected
    with pytest.raises(DataError, match=r"some/set \[train\] row 0: missing field 'chosen'"):
        data.load_hf("some/set", "train", FIELDS["dpo"], fields)
    with pytest.raises(DataError, match=r"some/set \[test\] holds no examples"):
        data.load_hf("some/set", "test", FIELDS["grpo"], fields)
    with pytest.raises(DataError, match=r"'hf:offline/set' \(split 'train'\) could not be loaded \(ConnectionError: "
                                        r"Couldn't reach.*pass a local .jsonl file or a dataset in the datasets cache"):
        data.load_hf("offline/set", "train", FIELDS["grpo"], fields)


def test_unreadable_jsonl_files_name_the_file_and_line(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl line 2: not UTF-8 text \(byte 15 of the line\)"):
        data.load_jsonl(str(tmp_path / "latin1.jsonl"), FIELDS["grpo"])
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(DataError, match=r"folder.jsonl' is a folder; set data.task to a .jsonl file in it"):
        data.load_jsonl(str(tmp_path / "folder.jsonl"), FIELDS["grpo"])


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
        assert count_target(example["chosen"], "a") > count_target(example["rejected"], "a")
        assert example["completion"] == example["chosen"] and example["preference_target"] == "a"
    assert count_target("banana cat", "a") == 4.0
    other = data.preference_task(20, seed=1, target="o")
    assert all(ex["chosen"].count("o") > ex["rejected"].count("o") for ex in other)
    with pytest.raises(DataError, match=r"preference target 'q' occurs in none of the task's words"):
        data.preference_task(1, seed=0, target="q")


def test_load_examples_dispatches_on_the_task(tmp_path):
    synthetic = SyntheticSection(num_examples=50, digits=1)
    examples = data.load_examples(DataSection(task="arithmetic", synthetic=synthetic), FIELDS["grpo"], seed=0)
    assert len(examples) == 50
    for task, fields in data.TASK_FIELDS.items():  # what the config checks rely on
        loaded = data.load_examples(DataSection(task=task, synthetic=synthetic), ("prompt",), 0)
        assert set(loaded[0]) == set(fields), task
    chats = DataSection(task="preference", synthetic=synthetic, apply_chat_template=True)
    pairs = data.load_examples(chats, FIELDS["dpo"], 0)
    assert pairs[0]["prompt"][0]["role"] == "user" and pairs[0]["chosen"]
    with pytest.raises(DataError, match=r"synthetic task 'arithmetic' example 0: missing field 'chosen'"):
        data.load_examples(DataSection(task="arithmetic", synthetic=synthetic), FIELDS["dpo"], 0)
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": "x", "completion": "y"}])
    loaded = data.load_examples(DataSection(task=path, prompt_field="q"), FIELDS["sft"], 0)
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
    batches = [data.batch_indices(10, 3, step, seed=5).tolist() for step in range(9)]
    for epoch in range(3):
        ids = [i for batch in batches[3 * epoch : 3 * epoch + 3] for i in batch]
        assert len(set(ids)) == 9  # no repeats within an epoch; one example is left over
    assert batches[:3] != batches[3:6]  # each epoch draws its own order
    assert [data.batch_indices(10, 3, step, seed=5).tolist() for step in range(4, 9)] == batches[4:9]
    assert [data.batch_indices(10, 3, step, seed=6).tolist() for step in range(9)] != batches
    assert data.batch_indices(10, 3, step=4, seed=0, shuffle=False).tolist() == [3, 4, 5]
    with pytest.raises(DataError, match=r"the dataset has 2 training examples, fewer than one batch of 3; lower "
                                        r"data.batch_size"):
        data.batch_indices(2, 3, step=0, seed=0)


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
