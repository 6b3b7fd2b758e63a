"""From examples to batches: loading and tokenizing a run's examples, the held-out split, the rows
of each step, and the padded training batches of SFT, RM and DPO.

Shapes: B examples, T tokens.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxrl_llm import data
from jaxrl_llm import tokenizer as tok
from jaxrl_llm.algorithms.batches import PairBatch, SequenceBatch
from jaxrl_llm.config import Config
from jaxrl_llm.padding import Bucketing, pad_prompt_completion, widen


def bucketing(config: Config) -> Bucketing:
    """The run's padding policy (`data.bucket`, `data.bucket_size`)."""
    return Bucketing(config.data.bucket, config.data.bucket_size)


def prepare_examples(config: Config, tokenizer, required: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples, each checked for the `required` fields, with prompt ids fitted to the budget."""
    d = config.data
    examples = data.load_examples(d, required, config.seed)
    examples = data.tokenize_prompts(
        examples, lambda prompt: tok.prompt_ids(tokenizer, prompt), d.max_prompt_len, d.prompt_overflow
    )
    return data.split_eval(examples, d.eval_size, config.seed)


def step_rows(examples: list[dict], count: int, step: int, config: Config) -> list[dict]:
    """The `count` examples of step `step`: a function of (seed, step) alone, so resuming replays them."""
    indices = data.batch_indices(len(examples), count, step, config.seed, config.data.shuffle)
    return [examples[i] for i in indices]


def completion_ids(tokenizer, text: str) -> list[int]:
    """A completion's ids, ended with EOS so the model learns to stop."""
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


def sequence_batch(tokenizer, examples: list[dict], config: Config, field: str = "completion") -> SequenceBatch:
    """[left-padded prompt | right-padded `field` + EOS] of each example, bucketed."""
    d = config.data
    tokens_BxT, mask_BxT, completion_BxT = pad_prompt_completion(
        [e["prompt_ids"] for e in examples], [completion_ids(tokenizer, e[field]) for e in examples],
        bucketing(config), d.max_prompt_len, d.max_completion_len, tokenizer.pad_token_id,
    )
    return SequenceBatch(tokens_BxT, mask_BxT.astype(np.int32), completion_BxT.astype(np.int32))


def pair_batch(tokenizer, examples: list[dict], config: Config) -> PairBatch:
    """The chosen and rejected sequences of each pair, right-padded to one common width."""
    chosen = sequence_batch(tokenizer, examples, config, "chosen")
    rejected = sequence_batch(tokenizer, examples, config, "rejected")
    width = max(chosen.tokens_BxT.shape[1], rejected.tokens_BxT.shape[1])
    fill = {"tokens_BxT": tokenizer.pad_token_id, "mask_BxT": 0, "completion_mask_BxT": 0}
    return PairBatch(*(
        batch.replace(**{name: widen(getattr(batch, name), width, left=False, value=v) for name, v in fill.items()})
        for batch in (chosen, rejected)
    ))
