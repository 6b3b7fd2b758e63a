"""Every algorithm's jitted step for a few steps on a tiny model: finite losses, every trainable
leaf moves by a real optimizer step, every frozen leaf stays bit-identical.

Shapes: B rows (pairs for RM/DPO, rollout rows for GRPO/PPO), D hidden size.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.algorithms.batches import PairBatch, RolloutBatch, SequenceBatch
from jaxrl_llm.algorithms.dpo import DPOState, make_dpo_step
from jaxrl_llm.algorithms.grpo import GRPOState, make_grpo_step
from jaxrl_llm.algorithms.ppo import PPOState, make_ppo_step
from jaxrl_llm.algorithms.rm import make_rm_step, pair_rewards
from jaxrl_llm.algorithms.sft import make_sft_step
from jaxrl_llm.config import DPOSection, GRPOSection, PPOSection, RMSection
from jaxrl_llm.core import reward_model_loss
from jaxrl_llm.models.transformer import ModelConfig, init_params
from jaxrl_llm.state import TrainState, make_optimizer

# Untied lm_head, Qwen2 attention biases (zero-initialised) and Qwen3 q/k norms: every kind of leaf.
# (The tied-embedding model of test_grpo / test_ppo / test_algorithms_offline is checked there.)
CONFIG = ModelConfig(
    vocab_size=24, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
    head_dim=8, attention_bias=True, qk_norm=True,
)
STEPS, G, LR = 3, 4, 1e-2
# LLVM's optimisations off: the same program compiles in about half the time on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def sequences(rng, B=4, P=4, C=5, vocab=24):
    """Left-padded prompts then right-padded completions (each at least one token)."""
    tokens = rng.integers(2, vocab, (B, P + C)).astype(np.int32)
    mask, completion = np.zeros((2, B, P + C), np.int32)
    for b in range(B):
        p, c = rng.integers(1, P + 1), rng.integers(1, C + 1)
        mask[b, P - p:P + c] = 1
        completion[b, P:P + c] = 1
    return SequenceBatch(tokens * mask, mask, completion)


def pairs(rng, B=4):
    return PairBatch(sequences(rng, B), sequences(rng, B))


def rollout(rng, R=2 * G, P=4, C=5):
    """G rows per prompt with host rewards; an answer that fills all C positions counts as truncated."""
    batch = sequences(rng, R, P=P, C=C)
    return RolloutBatch(
        batch.tokens_BxT, batch.mask_BxT, batch.completion_mask_BxT, batch.mask_BxT[:, :P],
        rng.normal(size=R).astype(np.float32), batch.completion_mask_BxT.sum(1) == C,
    )


def optimizer():
    return make_optimizer(LR, 100)


def tiny_params(config, seed, scalar_head=False):
    """Params shaped as `init_params` makes them (norm scales 1, biases 0, kernels N(0, 0.02²), a
    scalar head N(0, 1/(D+1))), filled in NumPy: only traced, so no initialiser is compiled."""
    shapes = jax.eval_shape(functools.partial(init_params, config, scalar_head=scalar_head), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name.endswith("['bias']"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        std = 1 / np.sqrt(config.hidden_size + 1) if name.startswith("['head']") else config.initializer_range
        return jnp.asarray(rng.normal(0, std, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def own_copy(params):
    return jax.tree.map(lambda x: x.copy(), params)


def setup_sft(config):
    state = TrainState.create(tiny_params(config, 0), optimizer())
    return state, make_sft_step(config), sequences, {"policy": lambda s: s.params}, {}


def setup_rm(config, center_coef=0.01):
    # center_coef > 0: without it the head's bias gets no gradient (see the Bradley–Terry test below).
    state = TrainState.create(tiny_params(config, 0, scalar_head=True), optimizer())
    return state, make_rm_step(config, RMSection(center_coef=center_coef)), pairs, {"rm": lambda s: s.params}, {}


def setup_dpo(config):
    params = tiny_params(config, 0)
    state = DPOState(policy=TrainState.create(params, optimizer()), ref_params=own_copy(params))
    return (state, make_dpo_step(config, DPOSection(beta=0.5)), pairs, {"policy": lambda s: s.policy.params},
            {"ref": lambda s: s.ref_params})


def setup_grpo(config):
    params = tiny_params(config, 0)
    state = GRPOState(policy=TrainState.create(params, optimizer()), ref_params=own_copy(params))
    cfg = GRPOSection(group_size=G, kl_coef=0.1, num_iterations=2, num_minibatches=2)
    return (state, make_grpo_step(config, cfg), rollout, {"policy": lambda s: s.policy.params},
            {"ref": lambda s: s.ref_params})


def setup_ppo(config):
    params = tiny_params(config, 0)
    critic = {"model": {k: v for k, v in own_copy(params).items() if k != "lm_head"},
              "head": tiny_params(config, 1, scalar_head=True)["head"]}  # as `init_scalar_params_from_lm`
    reward = tiny_params(config, 2, scalar_head=True)
    state = PPOState.create(
        TrainState.create(params, optimizer()), TrainState.create(critic, optimizer()), own_copy(params), reward, 0.05
    )
    cfg = PPOSection(epochs=2, num_minibatches=2, entropy_coef=0.01)
    trained = {"actor": lambda s: s.actor.params, "critic": lambda s: s.critic.params}
    frozen = {"ref": lambda s: s.ref_params, "reward_model": lambda s: s.reward_params}
    return state, make_ppo_step(config, cfg), rollout, trained, frozen


SETUPS = {"sft": setup_sft, "rm": setup_rm, "dpo": setup_dpo, "grpo": setup_grpo, "ppo": setup_ppo}
LOSSES = {"sft": ("loss",), "rm": ("loss",), "dpo": ("loss",), "grpo": ("loss", "pg_loss"),
          "ppo": ("pg_loss", "vf_loss")}


def snapshot(state, parts):
    """{part: {path: numpy copy}} of the selected param trees (the step donates its state)."""
    return {
        part: {jax.tree_util.keystr(path): np.array(leaf)
               for path, leaf in jax.tree_util.tree_leaves_with_path(get(state))}
        for part, get in parts.items()
    }


def run_steps(setup, config, steps=STEPS):
    """(state before, state after, every step's metrics) of jitted, state-donating steps (as the loop)."""
    state, step, make_batch, trained, frozen = setup(config)
    before = snapshot(state, {**trained, **frozen})
    rng = np.random.default_rng(0)
    step = jax.jit(step, donate_argnums=0, compiler_options=FAST_COMPILE)
    history = []
    for s in range(steps):
        state, metrics = step(state, make_batch(rng), jax.random.key(s))
        history.append(jax.device_get(metrics))
    return before, snapshot(state, {**trained, **frozen}), history, trained, frozen


@pytest.mark.parametrize("algorithm", list(SETUPS))
def test_steps_train_every_trainable_leaf_and_no_frozen_one(algorithm):
    """Adam moves an element with a real gradient (|g| ≫ eps) by about LR per step, rounding noise
    by far less, so each trainable leaf must move somewhere by at least LR/2."""
    before, after, history, trained, frozen = run_steps(SETUPS[algorithm], CONFIG)
    for s, metrics in enumerate(history):
        assert all(name in metrics for name in LOSSES[algorithm]), sorted(metrics)
        bad = [name for name, value in metrics.items() if not np.all(np.isfinite(value))]
        assert not bad, f"{algorithm} step {s}: non-finite {bad}"
    for part in trained:
        moved = {path: float(np.abs(after[part][path] - leaf).max()) for path, leaf in before[part].items()}
        still = {path: change for path, change in moved.items() if change < LR / 2}
        assert not still, f"{algorithm} {part}: leaves not trained in {STEPS} steps (max |change|): {still}"
    for part in frozen:
        changed = [path for path, leaf in before[part].items() if not np.array_equal(leaf, after[part][path])]
        assert not changed, f"{algorithm} {part}: frozen leaves changed: {changed}"


def test_bradley_terry_gives_the_reward_head_bias_no_gradient_without_centering():
    """The BT loss sees only r_chosen − r_rejected, so a shift of every reward (the head's bias) is
    untrained unless center_coef pins the rewards' level; hence the RM case above sets it."""
    params = tiny_params(CONFIG, 0, scalar_head=True)
    batch = pairs(np.random.default_rng(1))

    def loss(p, center_coef):
        r_chosen_B, r_rejected_B = pair_rewards(p, CONFIG, batch)
        return reward_model_loss(r_chosen_B, r_rejected_B, center_coef=center_coef)[0].mean()

    grad = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)
    for center_coef in (0.0, 0.01):
        head = grad(params, center_coef)["head"]
        bias, kernel = abs(float(head["bias"][0])), float(jnp.abs(head["kernel"]).max())
        assert (bias < 1e-6 * kernel) == (center_coef == 0.0), (center_coef, bias, kernel)
