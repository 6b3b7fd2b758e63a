"""Multi-turn rollouts: environments, tools and their calls, and the batched turn-by-turn loop."""

from jaxrl_llm.envs.base import Environment, ToolEnvironment
from jaxrl_llm.envs.episodes import Episode, EpisodeLimits, TurnSampler, run_episodes, start_episodes
from jaxrl_llm.envs.tools import TOOL_FORMATS, ToolCall, ToolRunner, parse_tool_calls, tool_schema

__all__ = [
    "Environment", "Episode", "EpisodeLimits", "TOOL_FORMATS", "ToolCall", "ToolEnvironment", "ToolRunner",
    "TurnSampler", "parse_tool_calls", "run_episodes", "start_episodes", "tool_schema",
]
