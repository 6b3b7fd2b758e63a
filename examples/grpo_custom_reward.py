"""GRPO with a custom reward through the library API, no train.py: reward short answers that
contain the digit 7. Runs on a tiny random model in about a minute on a laptop CPU."""

import jax
import numpy as np

from jaxrl_llm import tokenizer as tok
from jaxrl_llm.algorithms.batches import RolloutBatch
from jaxrl_llm.algorithms.grpo import GRPOState, make_grpo_step
from jaxrl_llm.config import GRPOSection
from jaxrl_llm.models.transformer import ModelConfig, init_params
from jaxrl_llm.sampling import SamplingConfig, generate
from jaxrl_llm.state import TrainState, make_optimizer


def sevens(prompts, completions, **fields):
    """Our reward: the share of 7s in the answer."""
    return np.array([c.count("7") / max(len(c), 1) for c in completions], np.float32)


tokenizer = tok.char_tokenizer()
model = ModelConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
grpo = GRPOSection(group_size=8, kl_coef=0.0, eps_high=0.28, aggregation="token_mean")  # DAPO-style
sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, n=grpo.group_size,
                          stop_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
state = GRPOState(policy=TrainState.create(init_params(model, jax.random.key(0)), make_optimizer(3e-3, 40)))
step = jax.jit(make_grpo_step(model, grpo))  # scores each rollout at the temperature it was sampled at
prompts = [tokenizer.encode(f"Say a number about {topic}:") for topic in ("cats", "rain", "tea", "maps")]

for i in range(40):
    key = jax.random.key(i)
    out = generate(state.policy.params, prompts, key, sampling, model)
    texts = tok.decode(tokenizer, out.tokens_RxN, out.mask_RxN)
    state, metrics = step(state, RolloutBatch.from_completions(out, sevens(None, texts)), key)
    if i % 10 == 0 or i == 39:
        print(f"step {i:2d}  reward {float(metrics['reward/mean']):.3f}  sample {texts[0]!r}")
