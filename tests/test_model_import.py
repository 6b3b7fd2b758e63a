"""`import jaxrl_llm`, loading a model and a GGUF tokenizer never import torch."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax

from jaxrl_llm.models.load import export_hf
from jaxrl_llm.models.transformer import ModelConfig, init_params

REPO = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig(
    vocab_size=49152, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
    num_kv_heads=1, head_dim=8, tie_word_embeddings=True,
)


def run_python(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_does_not_import_torch():
    run_python(
        "import jaxrl_llm, sys; jaxrl_llm.load_model; from jaxrl_llm import tokenizer; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )


def test_loading_folder_and_gguf_tokenizer_does_not_import_torch(smollm2, smollm2_gguf, tmp_path):
    params = init_params(CONFIG, jax.random.key(0))
    export_hf(params, tmp_path, config=CONFIG, tokenizer=smollm2.tokenizer)
    run_python(textwrap.dedent(f"""
        import sys, jaxrl_llm
        from jaxrl_llm import tokenizer
        model = jaxrl_llm.load_model({str(tmp_path)!r})
        from_gguf = tokenizer.load_tokenizer({str(smollm2_gguf)!r})
        chat = [[{{"role": "user", "content": "hi"}}]]
        tokens, mask = tokenizer.encode_prompts(model.tokenizer, chat, 64)
        assert tokenizer.encode_prompts(from_gguf, chat, 64)[0].tolist() == tokens.tolist()
        model.logits(model.params, tokens, mask).block_until_ready()
        assert "torch" not in sys.modules, "torch was imported"
    """))


def test_the_command_lines_do_not_say_pytorch_is_missing(tmp_path):
    """Where torch is not installed transformers warns on import; jaxrl_llm needs no torch, so its
    command lines keep that line off the console."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import importlib.util
        _find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, package=None: (
            None if name.split(".")[0] == "torch" else _find_spec(name, package))
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    shown = subprocess.run(
        [sys.executable, "-c", "import transformers"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert "PyTorch was not found" in shown.stderr  # the probe hides torch from transformers
    quiet = subprocess.run(  # a typo: the run layer (and transformers) load, then one error line
        [sys.executable, "train.py", "grpo.eps_hihg=0.3"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert quiet.returncode == 2 and "error: unknown key 'grpo.eps_hihg'" in quiet.stderr, quiet.stderr
    assert "PyTorch was not found" not in quiet.stderr, quiet.stderr
