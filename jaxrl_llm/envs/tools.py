"""Tools: Python callables described by JSON schemas, tool calls parsed from a model's reply in its
family's format, and calls run with a per-call timeout whose failures become messages.

Formats (`TOOL_FORMATS`):
- `hermes`: Qwen2.5 and Qwen3 (and Hermes-style templates): each call is
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; the chat template lists the tools.
- `llama3_json`: Llama-3.1/3.2/3.3: the whole reply is one `{"name": ..., "parameters": {...}}`
  (optionally after `<|python_tag|>`); the chat template lists the tools, results come back as
  the `ipython` role.
- `chatml_json`: ChatML templates such as SmolLM2's: calls are
  `<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>` (SmolLM2's function-calling
  format; a single object is read too).
A template that renders no `tools` (SmolLM2's) gets them listed in a system message of ours.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import json
import re
import time
from typing import Any, Callable

from transformers.utils import get_json_schema

from jaxrl_llm.errors import ConfigError

TOOL_FORMATS = ("hermes", "llama3_json", "chatml_json")
_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A parsed call, or the reason it could not be parsed (`error`; name and arguments then empty)."""

    name: str = ""
    arguments: dict = dataclasses.field(default_factory=dict)
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a call returned (as text for the tool message), and whether it failed."""

    name: str
    content: str
    failed: bool


def tool_schema(fn: Callable) -> dict:
    """The JSON schema a chat template's `tools` takes, from the callable's type hints and its
    Google-style docstring (transformers' `get_json_schema`, which names what is missing)."""
    try:
        return get_json_schema(fn)
    except Exception as error:  # transformers raises its own DocstringParsingException / TypeHintParsingException
        raise ConfigError(
            f"tool {getattr(fn, '__name__', fn)!r}: {error}; a tool needs type hints on every argument and a "
            "docstring with a description and an `Args:` entry per argument."
        ) from error


def import_object(path: str, what: str) -> Any:
    """The object at 'module:name' (or 'module.name')."""
    module_name, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{what} {path!r} could not be imported ({error}); write it as 'module:name'.") from error


def detect_format(chat_template: str | None) -> str:
    """The tool-call format a chat template implies; an error for a template we cannot serve."""
    template = chat_template or ""
    if "<tool_call>[" in template:  # calls as a JSON list, as SmolLM2's function calling
        return "chatml_json"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    if "<|im_start|>" in template:
        return "chatml_json"
    raise ConfigError(
        "this model's chat template has no tool-call format we know: tools are supported for Qwen2.5/Qwen3 "
        "(hermes <tool_call>), Llama-3.1+ (JSON) and ChatML templates such as SmolLM2's; set env.tool_format "
        f"to one of {TOOL_FORMATS} if the model was trained on one of them."
    )


def _call_of(obj: Any) -> ToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall(error='a tool call must be a JSON object with a "name" string')
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some models quote the arguments object
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(name=obj["name"], error=f'the arguments of {obj["name"]!r} must be a JSON object')
    return ToolCall(name=obj["name"], arguments=arguments)


def _parse_json(text: str) -> list[ToolCall]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        return [ToolCall(error=f"the tool call is not valid JSON ({error.msg} at character {error.pos})")]
    return [_call_of(o) for o in obj] if isinstance(obj, list) else [_call_of(obj)]


def parse_tool_calls(text: str, tool_format: str) -> list[ToolCall]:
    """The calls in a reply (none: the reply is an answer). Malformed calls come back with `error`."""
    if tool_format in ("hermes", "chatml_json"):
        return [call for body in _TOOL_CALL.findall(text) for call in _parse_json(body.strip())]
    if tool_format == "llama3_json":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        return _parse_json(body) if body.startswith("{") else []
    raise ConfigError(f"unknown tool format {tool_format!r}; use one of {TOOL_FORMATS}.")


def format_tool_calls(calls: list[dict], tool_format: str) -> str:
    """A reply making `calls` ({"name", "arguments"} each) in the format, as a model trained on it
    writes them: what a reference conversation of an SFT warm start says."""
    if tool_format == "hermes":
        return "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)
    if tool_format == "llama3_json":
        if len(calls) != 1:
            raise ConfigError(f"the llama3_json format makes one tool call per reply; a reference has {len(calls)}.")
        return json.dumps({"name": calls[0]["name"], "parameters": calls[0]["arguments"]})
    return f"<tool_call>{json.dumps(list(calls))}</tool_call>"


def lists_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders the `tools` it is given (else we list them in a system message)."""
    return "tools" in (chat_template or "")


def system_prompt(schemas: list[dict], tool_format: str) -> str:
    """The system message that lists tools for a template that renders none (SmolLM2's)."""
    listed = "\n".join(json.dumps(schema["function"]) for schema in schemas)
    example = format_tool_calls([{"name": "NAME", "arguments": {"ARGUMENT": "VALUE"}}], tool_format)
    return (
        "You can call tools to help answer. The tools, as JSON schemas:\n<tools>\n" + listed + "\n</tools>\n"
        f"To call a tool, reply with only {example}; the results come back in tool messages. When you know "
        "the answer, reply without a tool call."
    )


def result_message(result: ToolResult, tool_format: str) -> dict:
    """The message that carries a result back, in the role the family's template expects."""
    role = "ipython" if tool_format == "llama3_json" else "tool"
    return {"role": role, "name": result.name, "content": result.content}


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


class ToolRunner:
    """Runs calls on a thread pool, each with a timeout: a slow call holds up nobody else's, and an
    exception, a timeout, an unknown tool or a malformed call becomes an error text for the model.

    A timed-out call's thread runs on (Python cannot stop it); its result is dropped.
    """

    def __init__(self, tools: dict[str, Callable], timeout_s: float = 10.0, workers: int = 32):
        self.tools, self.timeout_s = dict(tools), timeout_s
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jaxrl-tool")

    def run(self, calls: list[ToolCall]) -> list[ToolResult]:
        """The results of `calls`, in order; they run concurrently."""
        futures = [self._submit(call) for call in calls]
        deadline = time.monotonic() + self.timeout_s
        return [self._result(call, future, deadline) for call, future in zip(calls, futures)]

    def _submit(self, call: ToolCall):
        if call.error or call.name not in self.tools:
            return None
        return self.pool.submit(self.tools[call.name], **call.arguments)

    def _result(self, call: ToolCall, future, deadline: float) -> ToolResult:
        if call.error:
            return ToolResult(call.name, f"error: {call.error}", True)
        if future is None:
            known = ", ".join(sorted(self.tools))
            return ToolResult(call.name, f"error: unknown tool {call.name!r}; the tools are: {known}", True)
        try:
            return ToolResult(call.name, _as_text(future.result(max(0.0, deadline - time.monotonic()))), False)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return ToolResult(call.name, f"error: {call.name} timed out after {self.timeout_s:g} s", True)
        except Exception as error:  # a tool's own failure goes back to the model, never up the run
            return ToolResult(call.name, f"error: {call.name} raised {type(error).__name__}: {error}", True)

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
