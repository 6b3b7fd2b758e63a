"""The real SmolLM2-135M-Instruct GGUF: our loader against transformers' on the same file."""

import numpy as np
import transformers

from jaxrl_llm.models.load import export_hf
from jaxrl_llm.tokenizer import apply_chat_template, encode_prompts

CHATS = [
    [{"role": "user", "content": "What is 7 + 5?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, bigger than 100, please: écrivez-le en français."},
    ],
]


def reference_chat_ids(tokenizer, chat, add_generation_prompt=True) -> list[int]:
    """transformers' own chat-template ids."""
    encoded = tokenizer.apply_chat_template(
        chat, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def chat_batch(tokenizer):
    """The three chats, templated and left-padded to the longest."""
    longest = max(len(apply_chat_template(tokenizer, chat)) for chat in CHATS)
    return encode_prompts(tokenizer, CHATS, max_len=longest)


def test_config_read_from_gguf_metadata(smollm2):
    config = smollm2.config
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and config.rope_theta == 1e5
    assert config.tie_word_embeddings and "lm_head" not in smollm2.params


def test_logits_match_transformers_on_chat_prompts(
    smollm2, smollm2_torch, torch_logits, relative_error
):
    tokens_BxT, mask_BxT = chat_batch(smollm2.tokenizer)
    assert len(set(mask_BxT.sum(-1))) == 3, "rows of different lengths exercise left padding"
    ours_BxTxV = smollm2.logits(smollm2.params, tokens_BxT, mask_BxT)
    ref_BxTxV = torch_logits(smollm2_torch[0], tokens_BxT, mask_BxT)
    assert relative_error(ours_BxTxV, ref_BxTxV, mask_BxT) <= 1e-4


def test_chat_template_ids_match_transformers(smollm2, smollm2_torch):
    ref_tokenizer = smollm2_torch[1]
    for chat in CHATS:
        for add_generation_prompt in (True, False):
            ours = apply_chat_template(smollm2.tokenizer, chat, add_generation_prompt)
            assert ours == reference_chat_ids(ref_tokenizer, chat, add_generation_prompt)
    text = "  Plain text, with\nnewlines, digits 12345 and ünïcödé <|im_end|>."
    assert smollm2.tokenizer.encode(text) == ref_tokenizer.encode(text)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(smollm2.tokenizer, name) == getattr(ref_tokenizer, name)


def test_export_loads_in_transformers(
    smollm2, smollm2_torch, tmp_path, torch_logits, relative_error
):
    export_hf(smollm2, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="float32").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tokens_BxT, mask_BxT = chat_batch(smollm2.tokenizer)
    ref_BxTxV = torch_logits(smollm2_torch[0], tokens_BxT, mask_BxT)
    assert relative_error(torch_logits(model, tokens_BxT, mask_BxT), ref_BxTxV, mask_BxT) <= 1e-6
    for chat in CHATS:
        assert reference_chat_ids(tokenizer, chat) == apply_chat_template(smollm2.tokenizer, chat)
    assert model.generation_config.eos_token_id == smollm2.tokenizer.eos_token_id
    embedding = model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(embedding, np.asarray(smollm2.params["embed"]["embedding"]))
