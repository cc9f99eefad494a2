"""DeepSeek-V3 tool calls read back from what nanoseek's chat template renders: from text
that kept the special tokens and from token ids of a trained tokenizer."""

import json

import pytest

from nanoseek.agent.tool_parser import parse_tool_call_ids, parse_tool_calls
from nanoseek.text.chat_template import render_chat
from nanoseek.text.special_tokens import EOS


def fn_call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def turn(content, *calls):
    """One assistant turn as the template writes it (no bos, eos kept)."""
    return render_chat([{"role": "assistant", "content": content, "tool_calls": list(calls)}]).removeprefix(
        "<｜begin▁of▁sentence｜>")


def test_single_call():
    p = parse_tool_calls(turn("Let me compute.", fn_call("calculator", {"expression": "123*456"})))
    assert p.content == "Let me compute." and p.errors == []
    assert p.tool_calls == [{"id": "call_0", "type": "function", "function": {
        "name": "calculator", "arguments": '{"expression": "123*456"}'}}]


def test_several_calls_keep_their_order():
    calls = [fn_call("calculator", {"expression": "1+1"}), fn_call("read_file", {"path": "a.txt"}),
             fn_call("python", {"code": "print(1)"})]
    p = parse_tool_calls(turn("", *calls))
    assert [c["function"]["name"] for c in p.tool_calls] == ["calculator", "read_file", "python"]
    assert [json.loads(c["function"]["arguments"]) for c in p.tool_calls] == [
        json.loads(c["function"]["arguments"]) for c in calls]
    assert p.content == "" and [c["id"] for c in p.tool_calls] == ["call_0", "call_1", "call_2"]


def test_arguments_with_newlines_unicode_and_backticks_round_trip():
    args = {"code": "for i in range(3):\n    print('héllo ✓ 你好', i)\n```\n", "note": "a\n\nb"}
    raw = json.dumps(args, ensure_ascii=False, indent=2)  # newlines in the JSON itself
    call = {"type": "function", "function": {"name": "python", "arguments": raw}}
    p = parse_tool_calls(turn("Ünïcode thought\nover two lines", call))
    assert p.tool_calls[0]["function"]["arguments"] == raw and json.loads(raw) == args
    assert p.content == "Ünïcode thought\nover two lines" and p.errors == []


def test_calls_inside_a_whole_conversation_render():
    """The last assistant turn of a rendered multi-turn chat (what a server generates)."""
    convo = render_chat([{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "", "tool_calls": [fn_call("calculator", {"expression": "2+2"})]},
                         {"role": "tool", "content": "4"}])
    gen = turn("Checking again.", fn_call("calculator", {"expression": "4*1"}))
    assert parse_tool_calls(gen).tool_calls[0]["function"]["arguments"] == '{"expression": "4*1"}'
    assert "<｜tool▁outputs▁end｜>" in convo  # the prompt side is not what is parsed


def test_plain_answer_has_no_calls():
    p = parse_tool_calls("The answer is 4." + EOS)
    assert p.content == "The answer is 4." and p.tool_calls == [] and p.errors == []


def test_truncated_and_malformed_calls_are_named():
    full = turn("", fn_call("calculator", {"expression": "1+1"}))
    cut = full[:full.index("<｜tool▁call▁end｜>")]
    p = parse_tool_calls(cut)
    assert p.tool_calls == [] and any("cut short" in e for e in p.errors)
    bad = full.replace('{"expression": "1+1"}', '{"expression": ')
    p = parse_tool_calls(bad)
    assert p.tool_calls[0]["function"]["arguments"] == '{"expression": '
    assert any("not JSON" in e and "calculator" in e for e in p.errors)


@pytest.fixture(scope="module")
def tokenizer():
    from nanoseek.data import load_corpus
    from nanoseek.text.tokenizer import train_tokenizer
    return train_tokenizer(load_corpus()[:40], 400)


def test_from_token_ids(tokenizer):
    """Ids -> calls, though the markers vanish from a skip_special_tokens decode."""
    args = {"code": "print('é ✓')\nprint(2)"}
    gen = turn("Run it.", fn_call("python", args), fn_call("calculator", {"expression": "6*7"}))
    ids = tokenizer.encode(gen, add_special_tokens=False)
    assert "<｜tool▁call▁begin｜>" not in tokenizer.decode(ids, skip_special_tokens=True)
    p = parse_tool_call_ids(ids, tokenizer)
    assert p.content == "Run it." and p.errors == []
    assert [c["function"]["name"] for c in p.tool_calls] == ["python", "calculator"]
    assert json.loads(p.tool_calls[0]["function"]["arguments"]) == args
