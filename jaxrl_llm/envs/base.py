"""Environments: what a multi-turn rollout talks to. One instance serves one trajectory.

An environment is any object with
- `reset(example) -> messages`: the conversation the model answers first;
- `step(messages, assistant_text) -> (messages to append, reward, done)`: `messages` is the
  conversation before the assistant's reply `assistant_text`; the returned messages (tool or user
  turns) follow that reply, and the model answers them next unless `done`.
Optional attributes: `tools`, the JSON schemas the chat template lists (None: it lists none), and
`tool_calls` / `tool_errors`, counters the rollout reports.
"""

from __future__ import annotations

from typing import Callable, Protocol

from jaxrl_llm.envs.tools import ToolRunner, parse_tool_calls, result_message, system_prompt, tool_schema


class Environment(Protocol):
    def reset(self, example: dict) -> list[dict]: ...

    def step(self, messages: list[dict], assistant_text: str) -> tuple[list[dict], float, bool]: ...


def as_messages(prompt) -> list[dict]:
    """A chat prompt as given, or a plain one as one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


class ToolEnvironment:
    """The model answers the example's prompt, calling tools as it likes: every reply with tool calls
    gets their results back as tool messages, and the first reply without one ends the trajectory.
    Its reward is the run's reward functions on that last reply (this class gives 0 per step)."""

    def __init__(self, tools: dict[str, Callable], runner: ToolRunner, tool_format: str, template_lists_tools: bool):
        self.runner, self.tool_format = runner, tool_format
        schemas = [tool_schema(fn) for fn in tools.values()]
        # A template that renders tools gets the schemas; for one that does not, we write them out.
        self.tools = schemas if template_lists_tools else None
        self._system = None if template_lists_tools else system_prompt(schemas, tool_format)
        self.tool_calls = self.tool_errors = 0

    def reset(self, example: dict) -> list[dict]:
        messages = as_messages(example["prompt"])
        if self._system is None:
            return messages
        if messages[0]["role"] == "system":
            messages[0]["content"] = messages[0]["content"] + "\n\n" + self._system
            return messages
        return [{"role": "system", "content": self._system}, *messages]

    def step(self, messages: list[dict], assistant_text: str) -> tuple[list[dict], float, bool]:
        calls = parse_tool_calls(assistant_text, self.tool_format)
        if not calls:
            return [], 0.0, True
        results = self.runner.run(calls)
        self.tool_calls += len(results)
        self.tool_errors += sum(r.failed for r in results)
        return [result_message(r, self.tool_format) for r in results], 0.0, False
