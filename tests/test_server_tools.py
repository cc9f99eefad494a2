"""`tools` / `tool_calls` on the server: the formatting of completions whose token ids hold
DeepSeek-V3's tool-call markers (whole and streamed), each tool_choice, malformed calls as
content, the 400s, and the cached replay. The live round trip (the openai client against a
model trained to call the calculator) is in tests/test_agent_server.py."""

from __future__ import annotations

import json

import pytest

from nanoseek.text.chat_template import render_chat
from nanoseek.engine.outputs import CompletionOutput
from nanoseek.engine.sampler import SamplingParams
from nanoseek.serve.errors import APIError
from nanoseek.serve.protocol import ChatCompletionRequest
from nanoseek.serve.responses import ChatFormatter, replay_chunks
from nanoseek.serve.tools import apply_tools
from nanoseek.text.special_tokens import EOS, TOOL_TOKENS

CALLS_BEGIN = TOOL_TOKENS[0]
CALC = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}
CALL = {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "123 * 456"}'}}
HI = [{"role": "user", "content": "What is 123 * 456?"}]


@pytest.fixture(scope="module")
def tok():
    from nanoseek.data import load_corpus
    from nanoseek.text.tokenizer import Tokenizer, train_tokenizer
    return Tokenizer.of(train_tokenizer(load_corpus()[:20], 300))


def reply_ids(tok, text: str = "Let me compute.", calls=(CALL,)) -> list[int]:
    """What a model trained on the chat template generates for an assistant turn."""
    turn = render_chat([{"role": "assistant", "content": text, "tool_calls": list(calls)}])
    return tok.encode(turn, add_special_tokens=False)[1:]  # less the conversation's BOS


def output(tok, ids, finish="stop", skip=True) -> CompletionOutput:
    """The engine's cumulative output after `ids` (eos has no text: it is not decoded)."""
    text_ids = ids[:-1] if finish == "stop" and ids and tok.decode(ids[-1:], False) == EOS else ids
    return CompletionOutput(0, tok.decode(text_ids, skip), list(ids), None, None, finish)


def formatter(tok, body: dict, prompt=(1, 2, 3), params=None):
    req = ChatCompletionRequest(model="m", messages=HI, **body)
    prompt, params, reader = apply_tools(req, tok, list(prompt), params or SamplingParams(max_tokens=64))
    return ChatFormatter("m", tok, None, len(prompt), tools=reader), prompt, params


def test_tool_calls_are_parsed_from_ids_not_from_skipped_text(tok):
    fmt, _, _ = formatter(tok, {"tools": [CALC]})
    out = output(tok, reply_ids(tok))
    assert CALLS_BEGIN not in out.text  # the engine's text has lost the markers ...
    choice = fmt.response({0: out})["choices"][0]
    assert choice["finish_reason"] == "tool_calls"  # ... the ids have not
    assert choice["message"]["content"] == "Let me compute."
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "calculator", "arguments": '{"expression": "123 * 456"}'}
    assert json.loads(call["function"]["arguments"]) == {"expression": "123 * 456"}


def test_without_tools_nothing_is_parsed(tok):
    fmt, _, _ = formatter(tok, {})
    out = output(tok, reply_ids(tok))
    choice = fmt.response({0: out})["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": out.text, "tool_calls": None}
    assert choice["finish_reason"] == "stop"


def test_stream_sends_text_then_buffers_the_calls(tok):
    fmt, _, _ = formatter(tok, {"tools": [CALC]})
    ids, chunks = reply_ids(tok, calls=(CALL, {**CALL, "function": {**CALL["function"], "arguments": "{}"}})), []
    for k in range(1, len(ids) + 1):
        chunks += fmt.chunks({0: output(tok, ids[:k], "stop" if k == len(ids) else None)})
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d["content"] or "" for d in deltas) == "Let me compute."
    assert all(d["tool_calls"] is None for d in deltas[:-1])
    assert [c["index"] for c in deltas[-1]["tool_calls"]] == [0, 1]
    assert deltas[-1]["tool_calls"][1]["function"]["arguments"] == "{}"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert len(chunks) < len(ids)  # nothing was sent while the calls were buffered


def test_malformed_call_comes_back_as_content_with_a_note(tok):
    fmt, _, _ = formatter(tok, {"tools": [CALC]})
    ids = reply_ids(tok)
    cut = ids[:ids.index(tok.tok.token_to_id(TOOL_TOKENS[3]))]  # cut short before <｜tool▁call▁end｜>
    choice = fmt.response({0: output(tok, cut, "length")})["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["tool_calls"] is None
    content = choice["message"]["content"]
    assert content.startswith("Let me compute." + CALLS_BEGIN) and "calculator" in content
    assert "the tool call could not be read" in content and "cut short" in content
    bad = reply_ids(tok, calls=({**CALL, "function": {**CALL["function"], "arguments": "{oops"}},))
    streamed = formatter(tok, {"tools": [CALC], "stream": True})[0].chunks({0: output(tok, bad)})
    delta = streamed[-1]["choices"][0]["delta"]
    assert "are not JSON" in delta["content"] and delta["tool_calls"] is None


def test_tool_choice_none_stops_at_the_marker(tok):
    fmt, prompt, params = formatter(tok, {"tools": [CALC], "tool_choice": "none"})
    marker = tok.tok.token_to_id(CALLS_BEGIN)
    assert params.stop_token_ids == [marker] and prompt == [1, 2, 3]
    ids = reply_ids(tok)
    stopped = ids[:ids.index(marker) + 1]  # the engine stops on the marker
    choice = fmt.response({0: output(tok, stopped, "stop")})["choices"][0]
    assert choice["message"]["content"] == "Let me compute." and choice["message"]["tool_calls"] is None
    assert choice["finish_reason"] == "stop"


def test_named_tool_choice_prefills_the_call(tok):
    fmt, prompt, _ = formatter(tok, {"tools": [CALC], "tool_choice": {"type": "function",
                                                                      "function": {"name": "calculator"}}})
    opened = tok.decode(prompt[3:], skip_special_tokens=False)
    assert opened == CALLS_BEGIN + TOOL_TOKENS[2] + "function" + TOOL_TOKENS[4] + "calculator\n```json\n"
    rest = tok.encode('{"expression": "2+2"}\n```' + TOOL_TOKENS[3] + TOOL_TOKENS[1] + EOS, add_special_tokens=False)
    choice = fmt.response({0: output(tok, rest)})["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "calculator",
                                                               "arguments": '{"expression": "2+2"}'}
    _, prompt, _ = formatter(tok, {"tools": [CALC], "tool_choice": "required"})
    assert tok.decode(prompt[3:], skip_special_tokens=False).endswith(TOOL_TOKENS[4])


@pytest.mark.parametrize("body, says", [
    ({"tools": [CALC], "tool_choice": {"type": "function", "function": {"name": "search"}}}, "not among the tools"),
    ({"tool_choice": "auto"}, "needs `tools`"),
])
def test_bad_tool_choice_is_a_400(tok, body, says):
    with pytest.raises(APIError) as e:
        formatter(tok, body)
    assert e.value.status == 400 and says in e.value.message and e.value.param == "tool_choice"


def test_cached_tool_calls_replay_as_a_stream(tok):
    fmt, _, _ = formatter(tok, {"tools": [CALC]})
    body = fmt.response({0: output(tok, reply_ids(tok))})
    body["object"] = "chat.completion"
    (chunk,) = replay_chunks(body, include_usage=False)
    delta = chunk["choices"][0]["delta"]
    assert delta["tool_calls"][0]["index"] == 0 and delta["tool_calls"][0]["function"]["name"] == "calculator"
    assert chunk["choices"][0]["finish_reason"] == "tool_calls"
