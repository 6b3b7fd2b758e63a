"""Tokenizers via transformers: HF folders and GGUF files, chat templates, left-padded prompts.

Shape letters: B batch, P prompt length (the budget), T completion length.

Only `PreTrainedTokenizerFast` is used, never `AutoTokenizer`: AutoTokenizer reads the model
config, and transformers' config module imports torch whenever torch is installed. A GGUF's
tokenizer is rebuilt here from its metadata for the same reason (transformers' GGUF reader
imports torch), with transformers' own converter, so the ids match `AutoTokenizer(gguf_file=)`.

Pad token: when a tokenizer has none, pad = eos. Padded slots are always masked out, so the
choice only matters as a filler value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import gguf
import numpy as np
from transformers import PreTrainedTokenizerFast

from jaxrl_llm.errors import TokenizerError
from jaxrl_llm.padding import left_pad

try:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )
except ImportError:  # transformers 4.x keeps them in integrations.ggml
    from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

Messages = Sequence[dict]
Prompt = Union[str, Messages]


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of an HF folder (tokenizer.json) or a .gguf file, pad/eos resolved."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return tokenizer_from_gguf(gguf.GGUFReader(path))
    if not (path / "tokenizer.json").is_file():
        raise TokenizerError(f"{path}: no tokenizer.json here, and it is not a .gguf file.")
    return resolve_special_tokens(PreTrainedTokenizerFast.from_pretrained(str(path)))


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> PreTrainedTokenizerFast:
    """The tokenizer a GGUF's metadata describes, built the way AutoTokenizer(gguf_file=) does."""
    metadata = {key.removeprefix("tokenizer."): field.contents()
                for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    renamed = {
        group: {name: metadata[key] for key, name in renames.items() if key in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    vocab, init_kwargs = renamed["tokenizer"], renamed["tokenizer_config"]
    if "tokens" not in vocab:
        raise TokenizerError(f"{reader.data.filename}: the GGUF has no tokenizer.ggml.tokens.")
    if vocab.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        init_kwargs.setdefault("add_bos_token", True)
    for name in ("bos", "eos", "unk", "pad"):
        token_id = vocab.get(f"{name}_token_id")
        init_kwargs[f"{name}_token"] = None if token_id is None else vocab["tokens"][token_id]
    architecture = reader.fields["general.architecture"].contents()
    backend, extra_kwargs = convert_gguf_tokenizer(architecture, vocab)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **init_kwargs, **extra_kwargs)
    return resolve_special_tokens(tokenizer)


def resolve_special_tokens(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Pad on the left, and pad = eos when the tokenizer has no pad token."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """{bos,eos,pad}_token_id, those the tokenizer has (for config.json, generation_config.json)."""
    names = (f"{kind}_token_id" for kind in ("bos", "eos", "pad"))
    ids = {name: getattr(tokenizer, name) for name in names}
    return {name: value for name, value in ids.items() if value is not None}


def apply_chat_template(
    tokenizer: PreTrainedTokenizerFast, messages: Messages, add_generation_prompt: bool = True, tools=None
) -> list[int]:
    """Token ids of a chat (list of {"role", "content"}), as transformers' chat template gives, with
    the JSON schemas of `tools` for templates that list them."""
    if tokenizer.chat_template is None:
        raise TokenizerError("this tokenizer has no chat template; pass prompts as plain strings.")
    encoded = tokenizer.apply_chat_template(
        list(messages), tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def prompt_ids(
    tokenizer: PreTrainedTokenizerFast, prompt: Prompt, add_generation_prompt: bool = True
) -> list[int]:
    """A plain string encoded with the tokenizer's special tokens, or a chat via its template."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return apply_chat_template(tokenizer, prompt, add_generation_prompt)


def encode_prompts(
    tokenizer: PreTrainedTokenizerFast, prompts: Sequence[Prompt], max_len: int,
    add_generation_prompt: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded int32 tokens_BxP and mask_BxP, P = max_len, for strings or chats."""
    ids_per_prompt = [prompt_ids(tokenizer, p, add_generation_prompt) for p in prompts]
    for index, ids in enumerate(ids_per_prompt):
        if len(ids) > max_len:
            raise TokenizerError(
                f"prompt {index} is {len(ids)} tokens long, over the budget max_len={max_len}; "
                "raise max_len or shorten the prompt."
            )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens_BxP, mask_BxP = left_pad(ids_per_prompt, max_len, pad_id)
    return tokens_BxP, mask_BxP.astype(np.int32)


def decode(
    tokenizer: PreTrainedTokenizerFast, tokens_BxT: np.ndarray, mask_BxT: np.ndarray,
    skip_special_tokens: bool = True,
) -> list[str]:
    """Text of each row's masked-in tokens (completions up to their mask)."""
    tokens_BxT, mask_BxT = np.asarray(tokens_BxT), np.asarray(mask_BxT).astype(bool)
    return [
        tokenizer.decode(row[keep].tolist(), skip_special_tokens=skip_special_tokens)
        for row, keep in zip(tokens_BxT, mask_BxT)
    ]


# The tiny models' chat template: one line per message, each closed by <eos> (printable characters
# only, which is all the character vocabulary holds), listing the tools it is given by name.
CHAR_CHAT_TEMPLATE = (
    "{% if tools %}tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %};"
    ' call as <tool_call>[{"name": .., "arguments": {..}}]</tool_call><eos>{% endif %}'
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, for the built-in tiny models.

    Ids: 0 <pad>, 1 <eos>, 2 <unk>, then the 95 characters from space to '~'. It is a real
    `PreTrainedTokenizerFast`, so it saves with an exported model and transformers loads it. Its chat
    template (`CHAR_CHAT_TEMPLATE`) ends each message with <eos>.
    """
    from tokenizers import Tokenizer, decoders, models

    characters = [chr(code) for code in range(32, 127)]
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *characters])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        chat_template=CHAR_CHAT_TEMPLATE,
    )
    return resolve_special_tokens(tokenizer)
