"""Datasets: JSONL and HF `datasets` loading, built-in synthetic tasks, deterministic batching.

Examples are dicts with canonical field names (a file's own names map to them through
`data.*_field`); each algorithm names the fields it needs (`run.registry`): prompt and
completion (or messages, whose final assistant turn is the completion) for SFT; prompt, chosen
and rejected for preference pairs; a prompt for RL. Every other field (e.g. `answer`) rides along
and reaches the reward functions as a keyword argument. A prompt is a string or a list of chat
messages ({"role", "content"}); completions, chosen and rejected are strings.
"""

from __future__ import annotations

import json
import operator
from typing import Callable, Sequence

import numpy as np

from jaxrl_llm.errors import DataError
from jaxrl_llm.rewards import count_target

CANONICAL_FIELDS = {name: name for name in ("prompt", "completion", "messages", "chosen", "rejected")}
OPERATORS = ("+", "-", "*")
PROMPT_OVERFLOW = ("error", "truncate", "skip")  # what `fit_prompt` does with a prompt over budget
# Built-in synthetic tasks and the fields their examples carry.
TASK_FIELDS = {
    "arithmetic": ("prompt", "completion", "answer"),
    "preference": ("prompt", "chosen", "rejected", "completion", "preference_target"),
    "multiplication": ("prompt", "completion", "answer", "tool_calls"),
}

Tokenize = Callable[[str | list], list[int]]


def field_map(data) -> dict[str, str]:
    """Canonical field name -> the name the data files use."""
    return {name: getattr(data, f"{name}_field") for name in CANONICAL_FIELDS}


def as_chat(prompt: str | list) -> list:
    """A plain-text prompt as a one-message user conversation; a message list passes through."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _is_messages(value) -> bool:
    """Whether `value` is a list of {"role": str, "content": str} messages."""
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _split_messages(row: dict, where: str, fields: dict) -> dict:
    """An SFT conversation as prompt (all turns but the last) and completion (the final assistant turn)."""
    messages = row.pop("messages")
    if not _is_messages(messages) or len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: field {fields['messages']!r} must be a list of {{role, content}} messages with at least one "
            "turn before a final assistant turn."
        )
    return {**row, "prompt": messages[:-1], "completion": messages[-1]["content"]}


def _check_types(row: dict, required: Sequence[str], where: str, fields: dict) -> None:
    """Prompts are text or messages; completions, chosen and rejected are text."""
    for name in required:
        value = row[name]
        if name == "prompt" and not (isinstance(value, str) or _is_messages(value)):
            raise DataError(
                f"{where}: field {fields[name]!r} must be a string or a list of {{role, content}} messages, "
                f"got {type(value).__name__}."
            )
        if name != "prompt" and not isinstance(value, str):
            raise DataError(f"{where}: field {fields[name]!r} must be a string, got {type(value).__name__}.")


def normalize(
    raw, required: Sequence[str], fields: dict | None = None, where: str = "example", chat: bool = False
) -> dict:
    """One raw record as an example with canonical field names, checked for the `required` ones."""
    fields = fields or CANONICAL_FIELDS
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}.")
    canonical = {name: key for key, name in fields.items()}
    # A canonical name the config maps elsewhere (prompt_field: question) is not read from its own key.
    row = {canonical.get(key, key): value for key, value in raw.items() if key in canonical or key not in fields}
    conversation = "completion" in required and "prompt" not in row and "messages" in row
    if conversation:
        row = _split_messages(row, where, fields)
    missing = [name for name in required if name not in row]
    if missing:
        alternative = f" (or {fields['messages']!r})" if "completion" in required else ""
        raise DataError(
            f"{where}: missing field {fields.get(missing[0], missing[0])!r}; these examples need "
            f"{', '.join(fields.get(name, name) for name in required)}{alternative}. If your data calls it "
            f"something else, set data.{missing[0]}_field."
        )
    _check_types(row, required, where, fields)
    return {**row, "prompt": as_chat(row["prompt"])} if chat else row


def load_jsonl(path: str, required: Sequence[str], fields: dict | None = None, chat: bool = False) -> list[dict]:
    """Examples from a JSONL file, one JSON object per line (blank lines skipped)."""
    try:
        with open(path, "rb") as file:
            lines = file.read().split(b"\n")
    except FileNotFoundError:
        raise DataError(
            f"data file {path!r} not found; set data.task to an existing .jsonl file, a built-in task "
            f"({', '.join(TASK_FIELDS)}) or hf:<dataset>."
        ) from None
    except IsADirectoryError:
        raise DataError(f"data file {path!r} is a folder; set data.task to a .jsonl file in it.") from None
    examples = []
    for number, raw_line in enumerate(lines, 1):
        where = f"{path} line {number}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(
                f"{where}: not UTF-8 text (byte {error.start} of the line); save the file as UTF-8."
            ) from None
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None
        examples.append(normalize(raw, required, fields, where, chat))
    if not examples:
        raise DataError(f"{path} holds no examples; write one JSON object per line.")
    return examples


def load_hf(
    name: str, split: str, required: Sequence[str], fields: dict | None = None, chat: bool = False
) -> list[dict]:
    """Examples from an HF `datasets` dataset (needs the optional `datasets` package)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data.task 'hf:{name}' needs the datasets package (pip install datasets), or pass the data as a "
            "local .jsonl file."
        ) from None
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as error:  # no network, no such dataset or split: datasets raises many types
        raise DataError(
            f"data.task 'hf:{name}' (split {split!r}) could not be loaded ({type(error).__name__}: "
            f"{str(error)[:200]}). Without hub access, pass a local .jsonl file or a dataset in the datasets cache."
        ) from None
    examples = [
        normalize(dict(raw), required, fields, f"{name} [{split}] row {i}", chat) for i, raw in enumerate(table)
    ]
    if not examples:
        raise DataError(f"{name} [{split}] holds no examples; check data.split.")
    return examples


_ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def arithmetic_task(num_examples: int, seed: int, digits: int = 2, operators=("+",), chat: bool = False) -> list[dict]:
    """'What is 23 + 58?' -> '81' examples; the answer is also in an `answer` field for reward functions."""
    unknown = [op for op in operators if op not in OPERATORS]
    if unknown or not operators:
        raise DataError(f"arithmetic operators must be among {', '.join(OPERATORS)}, got {list(operators)}.")
    rng = np.random.default_rng(seed)
    a_B, b_B = rng.integers(0, 10**digits, (2, num_examples))
    op_B = rng.integers(0, len(operators), num_examples)
    examples = []
    for a, b, k in zip(a_B.tolist(), b_B.tolist(), op_B.tolist()):
        prompt, answer = f"What is {a} {operators[k]} {b}?", str(_ARITHMETIC[operators[k]](a, b))
        examples.append({"prompt": as_chat(prompt) if chat else prompt, "completion": answer, "answer": answer})
    return examples


def multiplication_task(num_examples: int, seed: int) -> list[dict]:
    """'What is 123 * 45?' (a 3-digit times a 2-digit number), for models with a calculator tool
    (`env.tools: [calculator]`): `tool_calls` and `completion` are a reference conversation's
    call and final answer, for an SFT warm start."""
    rng = np.random.default_rng(seed)
    a_B, b_B = rng.integers(100, 1000, num_examples), rng.integers(10, 100, num_examples)
    examples = []
    for a, b in zip(a_B.tolist(), b_B.tolist()):
        call = {"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}
        examples.append({"prompt": f"What is {a} * {b}?", "completion": f"{a} * {b} = {a * b}",
                         "answer": str(a * b), "tool_calls": [call]})
    return examples


_WORDS = (
    "apple", "banana", "cat", "dog", "sky", "tree", "moon", "sun", "river", "stone", "bird", "cloud", "grass", "rain"
)
_TOPICS = ("the sea", "a city", "winter", "a friend", "music", "the night", "a garden", "the road")


def _word_list(rng: np.random.Generator) -> str:
    """Three to eight random words."""
    return " ".join(str(word) for word in rng.choice(_WORDS, int(rng.integers(3, 9))))


def preference_task(num_examples: int, seed: int, target: str = "a", chat: bool = False) -> list[dict]:
    """Pairs of word lists where `chosen` has more of `target` (ties redrawn).

    `completion` repeats chosen for SFT warm starts; `preference_target` lets reward functions and
    evaluations score completions with `rewards.preference_score`.
    """
    if not target or not any(target in word for word in _WORDS):
        raise DataError(f"preference target {target!r} occurs in none of the task's words {_WORDS}; pick e.g. 'a'.")
    rng = np.random.default_rng(seed)
    examples = []
    while len(examples) < num_examples:
        prompt = f"Write a few words about {_TOPICS[int(rng.integers(len(_TOPICS)))]}."
        first, second = _word_list(rng), _word_list(rng)
        first_score, second_score = count_target(first, target), count_target(second, target)
        if first_score == second_score:
            continue
        chosen, rejected = (first, second) if first_score > second_score else (second, first)
        prompt = as_chat(prompt) if chat else prompt
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        examples.append({**pair, "completion": chosen, "preference_target": target})
    return examples


def _synthetic(data, seed: int) -> list[dict]:
    """The built-in task named by data.task, in plain-text form."""
    synthetic = data.synthetic
    if data.task == "arithmetic":
        return arithmetic_task(synthetic.num_examples, seed, synthetic.digits, synthetic.operators)
    if data.task == "multiplication":
        return multiplication_task(synthetic.num_examples, seed)
    return preference_task(synthetic.num_examples, seed, synthetic.preference_target)


def load_examples(data, required: Sequence[str], seed: int) -> list[dict]:
    """The examples `data.task` names (a `config.DataSection`): a built-in synthetic task, hf:<dataset>,
    or a JSONL file; each checked for the `required` fields."""
    chat = data.apply_chat_template
    if data.task in TASK_FIELDS:
        where = f"synthetic task {data.task!r} example"
        return [normalize(raw, required, None, f"{where} {i}", chat) for i, raw in enumerate(_synthetic(data, seed))]
    if data.task.startswith("hf:"):
        return load_hf(data.task[3:], data.split, required, field_map(data), chat)
    return load_jsonl(data.task, required, field_map(data), chat)


def split_eval(examples: list, eval_size: int, seed: int) -> tuple[list, list]:
    """(train, eval): `eval_size` examples held out by a seeded draw; both keep the original order."""
    if eval_size >= len(examples):
        raise DataError(
            f"data.eval_size ({eval_size}) leaves no training examples out of {len(examples)}; lower data.eval_size."
        )
    held = set(np.random.default_rng(seed).permutation(len(examples))[:eval_size].tolist())
    train = [example for i, example in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches in one epoch (the last partial batch is dropped)."""
    if num_examples < batch_size:
        raise DataError(
            f"the dataset has {num_examples} training examples, fewer than one batch of {batch_size}; "
            "lower data.batch_size or add examples."
        )
    return num_examples // batch_size


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Example indices of batch `step`: a function of the step alone, so a resumed run sees the same batches.

    Each epoch walks a permutation drawn from (seed, epoch); within an epoch no example repeats.
    """
    epoch, index = divmod(step, steps_per_epoch(num_examples, batch_size))
    order = np.random.default_rng((seed, epoch)).permutation(num_examples) if shuffle else np.arange(num_examples)
    return order[index * batch_size : (index + 1) * batch_size]


def fit_prompt(ids: Sequence[int], max_len: int, overflow: str = "error", where: str = "prompt") -> list[int] | None:
    """`ids` if they fit max_len; else the last max_len (truncate), None (skip), or a DataError (error)."""
    if len(ids) <= max_len:
        return list(ids)
    if overflow == "truncate":
        return list(ids[len(ids) - max_len :])
    if overflow == "skip":
        return None
    raise DataError(
        f"{where}: the prompt has {len(ids)} tokens, over data.max_prompt_len={max_len}; raise data.max_prompt_len, "
        "or set data.prompt_overflow=truncate (keep its last tokens) or skip (drop such examples)."
    )


def tokenize_prompts(examples: Sequence[dict], tokenize: Tokenize, max_len: int, overflow: str = "error") -> list[dict]:
    """Examples with `prompt_ids` added and fitted to max_len by `overflow` (skipped ones dropped), once, up front."""
    tokenized = []
    for i, example in enumerate(examples):
        where = f"example {i} ({str(example['prompt'])[:40]!r}...)"
        ids = tokenize(example["prompt"])
        if not ids:
            raise DataError(f"{where}: the prompt has no tokens; a model needs at least one to answer.")
        ids = fit_prompt(ids, max_len, overflow, where)
        if ids is not None:
            tokenized.append({**example, "prompt_ids": ids})
    if not tokenized:
        raise DataError(f"every prompt is longer than data.max_prompt_len={max_len}; raise it.")
    return tokenized
