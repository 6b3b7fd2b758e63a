"""Tokenizer helpers on SmolLM2's real tokenizer: prompts, padding, budgets, decoding, loading."""

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from jaxrl_llm.tokenizer import (
    TokenizerError,
    apply_chat_template,
    decode,
    encode_prompts,
    load_tokenizer,
    prompt_ids,
    resolve_special_tokens,
)

PROMPTS = ["Hello world", [{"role": "user", "content": "What is 2 + 3?"}], "A"]


def test_encode_prompts_left_pads_strings_and_chats(smollm2):
    tokenizer = smollm2.tokenizer
    tokens_BxP, mask_BxP = encode_prompts(tokenizer, PROMPTS, max_len=48)
    assert tokens_BxP.shape == mask_BxP.shape == (3, 48)
    assert tokens_BxP.dtype == mask_BxP.dtype == np.int32
    for row, prompt in enumerate(PROMPTS):
        ids = prompt_ids(tokenizer, prompt)
        pad = 48 - len(ids)
        assert tokens_BxP[row, pad:].tolist() == ids and mask_BxP[row, pad:].all()
        assert (tokens_BxP[row, :pad] == tokenizer.pad_token_id).all()
        assert not mask_BxP[row, :pad].any()
    assert prompt_ids(tokenizer, PROMPTS[1]) == apply_chat_template(tokenizer, PROMPTS[1])


def test_prompt_over_budget_names_index_length_and_budget(smollm2):
    length = len(prompt_ids(smollm2.tokenizer, PROMPTS[1]))
    message = f"prompt 1 is {length} tokens long, over the budget max_len=5"
    with pytest.raises(TokenizerError, match=message):
        encode_prompts(smollm2.tokenizer, PROMPTS, max_len=5)


def test_decode_reads_each_row_up_to_its_mask(smollm2):
    tokenizer = smollm2.tokenizer
    first, second = tokenizer.encode("The cat sat."), tokenizer.encode("Dogs bark loudly")
    tokens_BxT = np.full((2, 8), tokenizer.eos_token_id, np.int32)
    mask_BxT = np.zeros((2, 8), np.int32)
    tokens_BxT[0, : len(first)], mask_BxT[0, : len(first)] = first, 1
    tokens_BxT[1, : len(second)], mask_BxT[1, : len(second)] = second, 1
    tokens_BxT[1, len(second)] = tokenizer.encode(" trailing")[0]  # past the mask: ignored
    assert decode(tokenizer, tokens_BxT, mask_BxT) == ["The cat sat.", "Dogs bark loudly"]


def test_pad_defaults_to_eos(smollm2):
    no_pad = PreTrainedTokenizerFast(
        tokenizer_object=smollm2.tokenizer.backend_tokenizer, eos_token="<|im_end|>"
    )
    assert no_pad.pad_token_id is None
    resolved = resolve_special_tokens(no_pad)
    assert resolved.pad_token_id == resolved.eos_token_id == smollm2.tokenizer.eos_token_id
    assert resolved.padding_side == "left"


def test_folder_round_trip_and_missing_tokenizer(smollm2, tmp_path):
    smollm2.tokenizer.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    chat = PROMPTS[1]
    assert apply_chat_template(again, chat) == apply_chat_template(smollm2.tokenizer, chat)
    assert again.pad_token_id == smollm2.tokenizer.pad_token_id
    with pytest.raises(TokenizerError, match=f"{tmp_path}: no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_chat_without_template_is_refused(smollm2):
    plain = PreTrainedTokenizerFast(tokenizer_object=smollm2.tokenizer.backend_tokenizer)
    with pytest.raises(TokenizerError, match="no chat template"):
        apply_chat_template(plain, PROMPTS[1])
