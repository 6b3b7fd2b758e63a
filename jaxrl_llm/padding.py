"""Padding token lists into arrays, and the one bucketing policy every batch follows.

Shape letters: B sequences, L padded length, P prompt length, C completion length, T = P + C.

Prompts are padded on the left, so every prompt ends where its answer (or generation) starts;
completions on the right. Padded widths are rounded up to a bucket so that a stream of batches
compiles a few shapes: the next power of two at or above `size` ("pow2", fewest compiles) or the
next multiple of `size` ("multiple", least padding). Training batches, rollouts and the sampler
all round with `Bucketing.length`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

BUCKETS = ("pow2", "multiple")


@dataclasses.dataclass(frozen=True)
class Bucketing:
    """How padded widths are rounded: `kind` pow2 or multiple, of `size`; hashable (static under jit)."""

    kind: str = "pow2"
    size: int = 16

    def __post_init__(self):
        if self.kind not in BUCKETS or self.size < 1:
            raise ValueError(f"Bucketing needs kind in {BUCKETS} and size >= 1, got {self.kind!r}, {self.size}.")

    def length(self, longest: int, cap: int | None = None) -> int:
        """The padded width for a longest row of `longest` tokens, at most `cap` when given."""
        if self.kind == "pow2":
            width = max(self.size, 1 << max(longest - 1, 0).bit_length())
        else:
            width = max(-(-longest // self.size), 1) * self.size
        return width if cap is None else min(width, cap)


def pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token lists as an int32 [B, length] array aligned right (`left` padding) or left, and the mask."""
    ids_BxL = np.full((len(seqs), length), pad_id, np.int32)
    mask_BxL = np.zeros((len(seqs), length), bool)
    for i, seq in enumerate(seqs):
        if len(seq) > length:
            raise ValueError(f"sequence {i} has {len(seq)} tokens, more than the padded length {length}.")
        cols = slice(length - len(seq), length) if left else slice(0, len(seq))
        ids_BxL[i, cols], mask_BxL[i, cols] = seq, True
    return ids_BxL, mask_BxL


def left_pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, length] ids right-aligned after padding (prompts end where generation starts), and the mask."""
    return pad(seqs, length, pad_id, left=True)


def pad_bucketed(
    seqs: Sequence[Sequence[int]], bucketing: Bucketing, pad_id: int, left: bool = True, cap: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`pad` to the bucket that holds the longest sequence (at most `cap`)."""
    return pad(seqs, bucketing.length(max(map(len, seqs)), cap), pad_id, left)


def widen(x_BxL: np.ndarray, width: int, left: bool, value=0) -> np.ndarray:
    """An already padded [B, L, ...] array padded further to `width` columns with `value`."""
    x_BxL = np.asarray(x_BxL)
    cols = (width - x_BxL.shape[1], 0) if left else (0, width - x_BxL.shape[1])
    return np.pad(x_BxL, ((0, 0), cols) + ((0, 0),) * (x_BxL.ndim - 2), constant_values=value)


def pad_prompt_completion(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    bucketing: Bucketing,
    max_prompt_len: int,
    max_completion_len: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens_BxT, mask_BxT, completion_mask_BxT) of [left-padded prompt | right-padded completion].

    Completions are cut at max_completion_len; both parts are bucketed, each at most its budget.
    """
    completions = [list(ids[:max_completion_len]) for ids in completion_ids]
    prompt_BxP, prompt_mask_BxP = pad_bucketed(prompt_ids, bucketing, pad_id, left=True, cap=max_prompt_len)
    completion_BxC, completion_mask_BxC = pad_bucketed(
        completions, bucketing, pad_id, left=False, cap=max_completion_len
    )
    tokens_BxT = np.concatenate([prompt_BxP, completion_BxC], axis=1)
    mask_BxT = np.concatenate([prompt_mask_BxP, completion_mask_BxC], axis=1)
    completion_mask_BxT = np.concatenate([np.zeros_like(prompt_mask_BxP), completion_mask_BxC], axis=1)
    return tokens_BxT, mask_BxT, completion_mask_BxT
