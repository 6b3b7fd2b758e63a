"""Environments and tools: call parsing per format, the tool runner's failures as messages, and the
turn-by-turn loop driven by a scripted policy through errors, timeouts, malformed calls and both limits,
with every rendered conversation equal to `apply_chat_template` of the whole conversation."""

import concurrent.futures
import copy
import threading

import jax
import pytest
from chat_templates import HERMES, LLAMA3

from jaxrl_llm.config import schema as config_schema
from jaxrl_llm.envs import (
    TOOL_FORMATS,
    EpisodeLimits,
    ToolCall,
    ToolEnvironment,
    ToolRunner,
    parse_tool_calls,
    run_episodes,
    start_episodes,
    tool_schema,
)
from jaxrl_llm.envs.episodes import DONE, TOKEN_LIMIT, TURN_LIMIT, ReplaySampler, episode_metrics
from jaxrl_llm.envs.tools import detect_format, format_tool_calls, lists_tools
from jaxrl_llm.errors import ConfigError, EnvError
from jaxrl_llm.tokenizer import load_tokenizer

RELEASE = threading.Event()  # set at teardown, so the hanging tool's thread ends


def multiply(a: int, b: int) -> int:
    """Multiply two integers exactly.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def fails(x: str) -> str:
    """Always raises.

    Args:
        x: anything
    """
    raise RuntimeError(f"no {x}")


def hangs(x: str) -> str:
    """Never answers in time.

    Args:
        x: anything
    """
    RELEASE.wait(30)
    return x


TOOLS = {"multiply": multiply, "fails": fails, "hangs": hangs}


@pytest.fixture(scope="module")
def runner():
    runner = ToolRunner(TOOLS, timeout_s=0.5)
    yield runner
    RELEASE.set()
    runner.close()


@pytest.fixture(scope="module")
def tokenizers(smollm2_gguf):
    """SmolLM2's tokenizer under its own template, a hermes (Qwen) one and a Llama-3.1 one."""
    smol = load_tokenizer(smollm2_gguf)
    hermes = copy.deepcopy(smol)
    hermes.chat_template = HERMES
    llama = copy.deepcopy(smol)
    llama.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                            "<|end_header_id|>", "<|eot_id|>"]})
    llama.chat_template = LLAMA3
    return {"chatml_json": (smol, "<|im_end|>"), "hermes": (hermes, "<|im_end|>"), "llama3_json": (llama, "<|eot_id|>")}


def call_text(tool_format: str, calls: list[dict]) -> str:
    return format_tool_calls(calls, tool_format)


@pytest.mark.parametrize("tool_format", ["hermes", "chatml_json"])
def test_tag_formats_parse_calls_and_report_malformed_ones(tool_format):
    text = call_text(tool_format, [{"name": "multiply", "arguments": {"a": 3, "b": 4}},
                                   {"name": "fails", "arguments": {"x": "y"}}])
    assert parse_tool_calls("Thinking... " + text, tool_format) == [
        ToolCall("multiply", {"a": 3, "b": 4}), ToolCall("fails", {"x": "y"})]
    assert parse_tool_calls("The answer is 12.", tool_format) == []
    (bad,) = parse_tool_calls('<tool_call>{"name": "multiply", "arguments": {"a": 3,</tool_call>', tool_format)
    assert bad.error.startswith("the tool call is not valid JSON")
    (bad,) = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>', tool_format)
    assert "name" in bad.error
    (bad,) = parse_tool_calls('<tool_call>{"name": "multiply", "arguments": [1, 2]}</tool_call>', tool_format)
    assert bad.name == "multiply" and "JSON object" in bad.error
    # An unclosed tag at the end of a reply still counts, and quoted arguments are read.
    quoted = '<tool_call>{"name": "m", "arguments": "{\\"a\\": 1}"}'
    assert parse_tool_calls(quoted, tool_format) == [ToolCall("m", {"a": 1})]


def test_llama3_json_format():
    assert parse_tool_calls('<|python_tag|>{"name": "multiply", "parameters": {"a": 2, "b": 5}}', "llama3_json") == [
        ToolCall("multiply", {"a": 2, "b": 5})]
    assert parse_tool_calls("10", "llama3_json") == []
    assert parse_tool_calls('{"name": "multiply", "parameters": {', "llama3_json")[0].error


def test_formats_are_detected_from_the_template_and_others_refused(tokenizers):
    assert config_schema.TOOL_FORMATS == ("auto", *TOOL_FORMATS)
    for tool_format, (tokenizer, _) in tokenizers.items():
        assert detect_format(tokenizer.chat_template) == tool_format
    with pytest.raises(ConfigError, match="env.tool_format"):
        detect_format("{% for m in messages %}{{ m.content }}{% endfor %}")


def test_schema_from_type_hints_and_docstring():
    schema = tool_schema(multiply)
    assert schema["function"]["name"] == "multiply"
    assert schema["function"]["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first factor"}

    def undocumented(a: int) -> int:
        return a

    with pytest.raises(ConfigError, match="undocumented.*docstring"):
        tool_schema(undocumented)


def test_runner_turns_every_failure_into_a_message(runner):
    calls = [ToolCall("hangs", {"x": "1"}), ToolCall("multiply", {"a": 6, "b": 7}), ToolCall("fails", {"x": "luck"}),
             ToolCall("divide", {}), ToolCall(error="the tool call is not valid JSON"),
             ToolCall("multiply", {"a": 1, "c": 2})]
    results = runner.run(calls)
    assert [r.failed for r in results] == [True, False, True, True, True, True]
    assert results[0].content == "error: hangs timed out after 0.5 s"
    assert results[1].content == "42"
    assert results[2].content == "error: fails raised RuntimeError: no luck"
    assert results[3].content.startswith("error: unknown tool 'divide'; the tools are: fails, hangs, multiply")
    assert results[4].content == "error: the tool call is not valid JSON"
    assert "unexpected keyword argument 'c'" in results[5].content


def play(tokenizer, stop_text, tool_format, runner, replies, limits, prompts=None):
    tools = {"multiply": multiply, "fails": fails, "hangs": hangs}
    examples = [{"prompt": p} for p in (prompts or ["What is 123 * 45?"] * len(replies))]
    lists = lists_tools(tokenizer.chat_template)
    episodes = start_episodes(examples, lambda: ToolEnvironment(tools, runner, tool_format, lists), tokenizer, limits)
    sampler = ReplaySampler(tokenizer, replies, tokenizer.convert_tokens_to_ids(stop_text), max_new_tokens=64)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return run_episodes(sampler, episodes, tokenizer, limits, jax.random.key(0), pool), sampler


@pytest.mark.parametrize("tool_format", ["chatml_json", "hermes", "llama3_json"])
def test_trajectory_tokens_equal_the_template_of_the_whole_conversation(tokenizers, runner, tool_format):
    tokenizer, stop_text = tokenizers[tool_format]
    call = lambda name, **arguments: call_text(tool_format, [{"name": name, "arguments": arguments}])
    replies = [
        [call("multiply", a=123, b=45), "123 * 45 = 5535"],
        [call("fails", x="it"), call("hangs", x="1"), "I could not compute it."],
        ["5535"],
        ['<tool_call>{"name": "multiply", "arguments": {"a": 1</tool_call>' if tool_format != "llama3_json"
         else '{"name": "multiply", "parameters": {', call("divide", a=1), "No."],
    ]
    limits = EpisodeLimits(max_turns=4, max_tokens=400, max_prompt_len=400)
    episodes, sampler = play(tokenizer, stop_text, tool_format, runner, replies, limits)
    for episode, reply in zip(episodes, replies):
        assert episode.ended == DONE and episode.turns == len(reply)
        assert [m["content"] for m in episode.messages if m["role"] == "assistant"] == reply
        # The text is the template's for the whole conversation, up to the last end-of-turn token. The
        # tokens are what the model saw; re-tokenizing the whole text can split a turn's boundary
        # differently (Llama's "\n\n" before a reply), which is why trajectories keep them.
        full = tokenizer.apply_chat_template(episode.messages, tools=episode.env.tools, tokenize=False)
        ours = tokenizer.decode(episode.prompt_ids + episode.tokens)
        assert full.startswith(ours) and ours.endswith(reply[-1] + stop_text)
        if tool_format != "llama3_json":
            assert tokenizer.encode(full, add_special_tokens=False)[:len(episode.prompt_ids + episode.tokens)] == (
                episode.prompt_ids + episode.tokens)
        # The loss sees exactly the model's tokens: each reply and its end-of-turn token.
        sampled = [t for t, s in zip(episode.tokens, episode.sampled) if s]
        expected = [t for text in reply for t in tokenizer.encode(text, add_special_tokens=False)
                    + [tokenizer.convert_tokens_to_ids(stop_text)]]
        assert sampled == expected
    tool_contents = [m["content"] for m in episodes[1].messages if m["role"] in ("tool", "ipython")]
    assert tool_contents == ["error: fails raised RuntimeError: no it", "error: hangs timed out after 0.5 s"]
    assert [m["content"] for m in episodes[0].messages if m["role"] in ("tool", "ipython")] == ["5535"]
    assert episodes[3].env.tool_errors == 2
    metrics = episode_metrics(episodes)
    assert metrics["env/turns"] == 2.25 and metrics["env/tool_calls"] == 1.25
    assert metrics["env/tool_error_rate"] == 4 / 5


def test_turn_limit_and_token_budget_truncate(tokenizers, runner):
    tokenizer, stop_text = tokenizers["hermes"]
    call = call_text("hermes", [{"name": "multiply", "arguments": {"a": 2, "b": 3}}])
    replies = [[call] * 3, [call, "x " * 80], ["x " * 80]]
    limits = EpisodeLimits(max_turns=2, max_tokens=100, max_prompt_len=400)
    episodes, _ = play(tokenizer, stop_text, "hermes", runner, replies, limits)
    # Row 0: two calls, then the turn limit; row 1's second reply is cut by the budget, row 2's by
    # the turn's own limit (the sampler's 64 tokens).
    assert (episodes[0].ended, episodes[0].turns) == (TURN_LIMIT, 2)
    assert (episodes[1].ended, episodes[1].turns, len(episodes[1].tokens)) == (TOKEN_LIMIT, 2, 100)
    assert (episodes[2].ended, episodes[2].turns, len(episodes[2].tokens)) == (TOKEN_LIMIT, 1, 64)
    # The tool result after the last allowed turn is not appended: the trajectory ends with the model's turn.
    assert episodes[0].messages[-1]["role"] == "assistant" and episodes[0].sampled[-1]
    # A budget too small for the next turn's context ends the episode before it.
    limits = EpisodeLimits(max_turns=4, max_tokens=40, max_prompt_len=400)
    (episode,), _ = play(tokenizer, stop_text, "hermes", runner, [[call] * 4], limits)
    assert episode.ended == TOKEN_LIMIT and episode.turns == 1 and episode.messages[-1]["role"] == "assistant"
    assert episode_metrics([episode])["env/truncated_tokens"] == 1.0


def test_prompt_over_budget_and_failing_environment_are_named(tokenizers, runner):
    tokenizer, stop_text = tokenizers["chatml_json"]
    with pytest.raises(ConfigError, match="data.max_prompt_len=10"):
        play(tokenizer, stop_text, "chatml_json", runner, [["1"]], EpisodeLimits(2, 50, 10))

    class Broken:
        def reset(self, example):
            return [{"role": "user", "content": "hi"}]

        def step(self, messages, text):
            raise KeyError("score")

    limits = EpisodeLimits(2, 50, 200)
    episodes = start_episodes([{}], Broken, tokenizer, limits)
    with concurrent.futures.ThreadPoolExecutor(1) as pool, pytest.raises(EnvError, match="Broken.step raised KeyError"):
        sampler = ReplaySampler(tokenizer, [["a"]], tokenizer.convert_tokens_to_ids(stop_text))
        run_episodes(sampler, episodes, tokenizer, limits, jax.random.key(0), pool)
