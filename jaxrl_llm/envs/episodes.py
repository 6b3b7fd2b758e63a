"""Batched multi-turn rollouts: every trajectory of a batch advances one turn at a time, each turn
extending its row's KV cache with only the new tokens (`sampling.sample_turn`), and environment
steps (tool calls) run concurrently on a thread pool between turns.

A trajectory's tokens are the prompt, then alternately the model's turn (sampled tokens, loss on)
and what the chat template renders for the environment's messages (context only, loss off). The
template renders the environment's messages exactly as `apply_chat_template` renders the whole
conversation: the tokens appended after a turn are the template's text for the full conversation
past its text for the conversation up to that turn's end-of-turn token.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable

import jax
import numpy as np

from jaxrl_llm import sharding
from jaxrl_llm.envs.base import Environment
from jaxrl_llm.errors import ConfigError, EnvError
from jaxrl_llm.sampling import SamplingConfig, Turn, init_turn_cache, sample_turn
from jaxrl_llm.tokenizer import apply_chat_template

DONE, TURN_LIMIT, TOKEN_LIMIT = "done", "turns", "tokens"


@dataclasses.dataclass(frozen=True)
class EpisodeLimits:
    """max_turns model turns; max_tokens tokens after the prompt (model and environment); prompts up
    to max_prompt_len tokens."""

    max_turns: int
    max_tokens: int
    max_prompt_len: int


@dataclasses.dataclass
class Episode:
    """One trajectory: its conversation, prompt ids, then every later token with whether the model
    sampled it and its sampler log-prob (0 elsewhere); the environment's rewards, summed and per turn
    (at the index of the turn's last token); how it ended (`DONE`, or truncated by `TURN_LIMIT` /
    `TOKEN_LIMIT`)."""

    env: Environment
    messages: list[dict]
    prompt_ids: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    sampled: list[bool] = dataclasses.field(default_factory=list)
    logps: list[float] = dataclasses.field(default_factory=list)
    reward: float = 0.0
    turn_rewards: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (token index, reward)
    turns: int = 0
    ended: str | None = None

    @property
    def final_text(self) -> str:
        """The model's last reply."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")

    def append(self, ids, sampled: bool, logps=None):
        self.tokens += list(ids)
        self.sampled += [sampled] * len(ids)
        self.logps += list(logps) if logps is not None else [0.0] * len(ids)


def render(tokenizer, messages: list[dict], tools, add_generation_prompt: bool) -> str:
    """The chat template's text of a conversation (with the tools it lists, if any)."""
    return tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def continuation_ids(
    tokenizer, history: list[dict], new_messages: list[dict], tools, stop_text: str
) -> list[int] | None:
    """Token ids that follow an assistant turn's end-of-turn token (`stop_text`; the turn is the last
    message of `history`) up to the next reply's generation prompt; None when the template does not
    close the reply with that token (the model stopped on a token of its own)."""
    before = render(tokenizer, history, tools, add_generation_prompt=False)
    after = render(tokenizer, history + new_messages, tools, add_generation_prompt=True)
    if not after.startswith(before):
        raise ConfigError(
            "the chat template renders a conversation differently once messages are appended (it is not "
            "append-only), so turns cannot extend the cache; use a template that keeps earlier turns as they were."
        )
    closed_reply = history[-1]["content"] + stop_text
    end = before.rfind(closed_reply)
    if end < 0:
        return None
    return tokenizer.encode(before[end + len(closed_reply):] + after[len(before):], add_special_tokens=False)


class TurnSampler:
    """The model's side of a batch of conversations: its params and one growing KV cache per row.
    `sampler(blocks, limits, key) -> Turn` extends each row with its block and samples its turn."""

    def __init__(self, params, sampling: SamplingConfig, model_config, rows: int, cache_len: int, mesh=None):
        self.params, self.sampling, self.model_config, self.mesh = params, sampling, model_config, mesh
        self.cache = init_turn_cache(model_config, rows, cache_len, sampling.cache_dtype)

    def __call__(self, blocks: list[list[int]], limits: list[int], key) -> Turn:
        self.cache, turn = sample_turn(
            self.params, self.cache, blocks, limits, key, self.sampling, self.model_config, self.mesh
        )
        return sharding.to_host(turn)


class ReplaySampler:
    """A policy that says given replies: row r's k-th turn is `replies[r][k]`, tokenized and closed
    with `stop_id`, cut at the row's limit (log-probs 0). It drives the loop over reference
    conversations (an SFT warm start on tool use) and scripted tests."""

    def __init__(self, tokenizer, replies: list[list[str]], stop_id: int, max_new_tokens: int | None = None):
        self.tokenizer, self.replies, self.stop_id = tokenizer, replies, stop_id
        self.max_new_tokens = max_new_tokens  # a turn's own cap, as `SamplingConfig.max_new_tokens`
        self.turns = [0] * len(replies)

    def __call__(self, blocks: list[list[int]], limits: list[int], key) -> Turn:
        ids = [self._next(r) if block else [] for r, block in enumerate(blocks)]
        ids = [row[:min(limit, self.max_new_tokens or limit)] for row, limit in zip(ids, limits)]
        N = max(1, *map(len, ids))
        tokens_RxN = np.zeros((len(ids), N), np.int32)
        for r, row in enumerate(ids):
            tokens_RxN[r, :len(row)] = row
        stopped_R = np.array([bool(row) and row[-1] == self.stop_id for row in ids])
        lengths_R = np.array([len(row) for row in ids], np.int32)
        return Turn(tokens_RxN, np.zeros((len(ids), N), np.float32), lengths_R, stopped_R)

    def _next(self, r: int) -> list[int]:
        replies, k = self.replies[r], self.turns[r]
        self.turns[r] += 1
        text = replies[k] if k < len(replies) else ""  # a reference out of replies says nothing more
        return self.tokenizer.encode(text, add_special_tokens=False) + [self.stop_id]


def start_episodes(
    examples: list[dict], make_env: Callable[[], Environment], tokenizer, limits: EpisodeLimits
) -> list[Episode]:
    """A fresh environment per example, reset to its first prompt (within the prompt budget)."""
    episodes = []
    for example in examples:
        env = make_env()
        messages = env.reset(example)
        ids = apply_chat_template(tokenizer, messages, tools=getattr(env, "tools", None))
        if len(ids) > limits.max_prompt_len:
            raise ConfigError(
                f"an environment's first prompt is {len(ids)} tokens, over data.max_prompt_len="
                f"{limits.max_prompt_len}; raise it (the tool list counts too) or shorten the prompt."
            )
        episodes.append(Episode(env, messages, ids))
    return episodes


def run_episodes(
    sampler: Callable[..., Turn], episodes: list[Episode], tokenizer, limits: EpisodeLimits, key,
    pool: concurrent.futures.Executor,
) -> list[Episode]:
    """Advance every episode turn by turn until each is done or truncated (`sampler`: a `TurnSampler`
    over as many rows, or anything that answers like one)."""
    blocks = [e.prompt_ids for e in episodes]
    for turn in range(limits.max_turns):
        if not any(blocks):
            break
        limits_R = [max(0, limits.max_tokens - len(e.tokens)) if block else 0 for e, block in zip(episodes, blocks)]
        out = sampler(blocks, limits_R, jax.random.fold_in(key, turn))
        live = [r for r, block in enumerate(blocks) if block]
        for r in live:
            episode, n = episodes[r], int(out.lengths_R[r])
            episode.append(out.tokens_RxN[r, :n], True, out.logp_RxN[r, :n])
            episode.turns += 1
            episode.messages.append({"role": "assistant", "content": _reply(tokenizer, out, r)})
            if not out.stopped_R[r]:
                episode.ended = TOKEN_LIMIT
        stepping = [r for r in live if episodes[r].ended is None]
        futures = {r: pool.submit(_step, episodes[r]) for r in stepping}
        blocks = [[] for _ in episodes]
        for r in stepping:
            blocks[r] = _next_block(episodes[r], futures[r].result(), tokenizer, out, r, turn, limits)
    return episodes


def _step(episode: Episode):
    """The environment's answer to the last reply; its own failure stops the run with its name."""
    env = episode.env
    try:
        return env.step(episode.messages[:-1], episode.messages[-1]["content"])
    except Exception as error:
        raise EnvError(
            f"{type(env).__name__}.step raised {type(error).__name__}: {error}; an environment must turn its "
            "failures into messages for the model (ToolEnvironment does so for tools)."
        ) from error


def _reply(tokenizer, out, r: int) -> str:
    """Row r's reply as text, without the token that ended it."""
    n = int(out.lengths_R[r]) - int(out.stopped_R[r])
    return tokenizer.decode(out.tokens_RxN[r, :n].tolist(), skip_special_tokens=False)


def _next_block(episode: Episode, stepped, tokenizer, out, r: int, turn: int, limits: EpisodeLimits) -> list[int]:
    """After an environment step: the block of the row's next turn, or [] when the episode ended."""
    new_messages, reward, done = stepped
    episode.reward += float(reward)
    episode.turn_rewards.append((len(episode.tokens) - 1, float(reward)))  # at the turn's last token
    if done:
        episode.ended = DONE
        return []
    if turn == limits.max_turns - 1:
        episode.ended = TURN_LIMIT
        return []
    last = int(out.tokens_RxN[r, int(out.lengths_R[r]) - 1])
    tools = getattr(episode.env, "tools", None)
    ids = continuation_ids(tokenizer, episode.messages, list(new_messages), tools, tokenizer.decode([last]))
    if ids is None:  # ended in a stop token the template does not use between turns: nothing follows it
        episode.ended = DONE
        return []
    if len(episode.tokens) + len(ids) + 1 > limits.max_tokens:
        episode.ended = TOKEN_LIMIT
        return []
    episode.messages += list(new_messages)
    episode.append(ids, False)
    return [last, *ids]


def episode_metrics(episodes: list[Episode]) -> dict:
    """Per-trajectory means: turns, tool calls and errors, sampled and environment tokens, truncation."""
    calls = np.array([getattr(e.env, "tool_calls", 0) for e in episodes], float)
    errors = np.array([getattr(e.env, "tool_errors", 0) for e in episodes], float)
    sampled = np.array([sum(e.sampled) for e in episodes], float)
    return {
        "env/turns": float(np.mean([e.turns for e in episodes])),
        "env/tool_calls": float(calls.mean()),
        "env/tool_error_rate": float(errors.sum() / max(calls.sum(), 1.0)),
        "env/generated_tokens": float(sampled.mean()),
        "env/context_tokens": float(np.mean([len(e.tokens) for e in episodes]) - sampled.mean()),
        "env/truncated_turns": float(np.mean([e.ended == TURN_LIMIT for e in episodes])),
        "env/truncated_tokens": float(np.mean([e.ended == TOKEN_LIMIT for e in episodes])),
        "env/step_reward": float(np.mean([e.reward for e in episodes])),  # not eval/reward, the total
    }
