"""Padding and the one bucketing policy that training batches, rollouts and the sampler share."""

import numpy as np
import pytest

from jaxrl_llm.padding import Bucketing, left_pad, pad, pad_bucketed, pad_prompt_completion, widen


def test_bucket_widths():
    pow2, multiple = Bucketing("pow2", 16), Bucketing("multiple", 24)
    assert [pow2.length(n) for n in (0, 1, 16, 17, 33, 100)] == [16, 16, 16, 32, 64, 128]
    assert [pow2.length(n, cap=100) for n in (0, 1, 16, 17, 33, 64, 65, 99)] == [16, 16, 16, 32, 64, 64, 100, 100]
    assert [multiple.length(n) for n in (1, 24, 25, 49)] == [24, 24, 48, 72]
    assert multiple.length(25, cap=40) == 40
    with pytest.raises(ValueError, match="kind in"):
        Bucketing("exact", 8)
    with pytest.raises(ValueError, match="size >= 1"):
        Bucketing("pow2", 0)


def test_left_and_right_padding():
    ids, mask = left_pad([[5, 6, 7], [8], []], 4, pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    assert ids.dtype == np.int32 and mask.dtype == bool
    ids, mask = pad([[5, 6], [7]], 3, pad_id=1, left=False)
    np.testing.assert_array_equal(ids, [[5, 6, 1], [7, 1, 1]])
    np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="sequence 0 has 3 tokens, more than the padded length 2"):
        left_pad([[1, 2, 3]], 2, 0)
    ids, mask = pad_bucketed([list(range(20)), [1]], Bucketing(), 0, cap=64)
    assert ids.shape == (2, 32) and mask.sum() == 21 and ids[1, -1] == 1
    np.testing.assert_array_equal(widen(np.array([[1, 2]]), 4, left=True, value=9), [[9, 9, 1, 2]])
    np.testing.assert_array_equal(widen(np.array([[1, 2]]), 3, left=False), [[1, 2, 0]])


@pytest.mark.parametrize("bucketing, width", [(Bucketing("pow2", 16), 16 + 20), (Bucketing("multiple", 8), 8 + 20)])
def test_prompt_completion_layout(bucketing, width):
    completions = [[7, 8, 9], list(range(10, 40))]
    tokens, mask, loss_mask = pad_prompt_completion([[1, 2], [3]], completions, bucketing, 16, 20, 0)
    P = bucketing.length(2, 16)
    assert tokens.shape == (2, width) and P == width - bucketing.length(20, 20)
    np.testing.assert_array_equal(tokens[0, P - 2:P + 3], [1, 2, 7, 8, 9])
    np.testing.assert_array_equal(tokens[1, P - 1:P + 1], [3, 10])
    assert mask[1].sum() == 1 + 20 and loss_mask[1].sum() == 20  # completion cut at max_completion_len
    assert loss_mask[0, :P].sum() == 0 and loss_mask[0].sum() == 3 and mask[0].sum() == 5


def test_sequence_batches_end_each_answer_with_eos():
    """SFT rows: the answer's tokens then EOS, all under the completion mask, after a left-padded prompt;
    pairs share one width."""
    from jaxrl_llm import tokenizer as tok
    from jaxrl_llm.config import load_config
    from jaxrl_llm.run.examples import pair_batch, sequence_batch

    tokenizer = tok.char_tokenizer()
    config = load_config(None, ["data.max_prompt_len=16", "data.max_completion_len=8"])
    examples = [{"prompt_ids": tokenizer.encode("1+2="), "completion": "3", "chosen": "33", "rejected": "4"}]
    batch = sequence_batch(tokenizer, examples, config)
    answer = batch.tokens_BxT[0][batch.completion_mask_BxT[0] > 0].tolist()
    assert answer == [*tokenizer.encode("3"), tokenizer.eos_token_id]
    assert batch.tokens_BxT[0, :16][batch.mask_BxT[0, :16] > 0].tolist() == tokenizer.encode("1+2=")
    pairs = pair_batch(tokenizer, examples, config)
    assert pairs.chosen.tokens_BxT.shape == pairs.rejected.tokens_BxT.shape
    assert pairs.rejected.completion_mask_BxT.sum() == 2 and pairs.chosen.completion_mask_BxT.sum() == 3
