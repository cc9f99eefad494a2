"""nanoseek's chat format against DeepSeek-V3's own Jinja template, string and token ids.

The reference is DeepSeek-V3-0324's `chat_template` (tests/data/README.md says where it
comes from), rendered by transformers' own Jinja machinery (`render_jinja_template`, the
sandbox, globals and special tokens `apply_chat_template` uses). It is called directly
because `apply_chat_template` (transformers 5) drops keys whose value is None, and DeepSeek's
template needs the `"content": None` of a tool-call turn. Each conversation is rendered three
ways (DeepSeek's template, nanoseek's Python `render_chat`, nanoseek's Jinja template as saved
with the tokenizer, through `apply_chat_template`), with and without a generation prompt, and
compared as strings and as token ids.
"""

import json
from pathlib import Path

import pytest

from nanoseek.text.chat_template import ChatFormatError, chat_parts, chat_segments, render_chat
from nanoseek.text.tokenizer import (BOS, EOS, SPECIAL_TOKENS, Tokenizer, load_tokenizer, save_tokenizer,
                                     train_tokenizer)
from tests.train_utils import small_corpus

DEEPSEEK_TEMPLATE = (Path(__file__).parent / "data"
                     / "deepseek-v3-0324.chat_template.jinja").read_text(encoding="utf-8")


def call(name, args):
    args = json.dumps(args, ensure_ascii=False)
    return {"type": "function", "function": {"name": name, "arguments": args}}


SYS = {"role": "system", "content": "You are terse."}
SYS2 = {"role": "system", "content": "Use SI units."}
Q1, Q2 = {"role": "user", "content": "2+2?"}, {"role": "user", "content": "And 3×3?\nShow it."}
A1 = {"role": "assistant", "content": "4"}
A2 = {"role": "assistant", "content": "9, since 3+3+3 = 9."}
WEATHER = {"role": "user", "content": "Weather in Paris and Zürich?"}
ONE_CALL = {"role": "assistant", "content": None,
            "tool_calls": [call("weather", {"city": "Paris"})]}
CALL_WITH_TEXT = {"role": "assistant", "content": "Let me look.",
                  "tool_calls": [call("weather", {"city": "Paris"})]}
TWO_CALLS = {"role": "assistant", "content": None, "tool_calls": [
    call("weather", {"city": "Paris"}), call("weather", {"city": "Zürich"})]}
THREE_CALLS = {"role": "assistant", "content": None, "tool_calls": [
    call("weather", {"city": "Paris"}), call("weather", {"city": "Zürich"}), call("time", {})]}


def out(text):
    return {"role": "tool", "content": text}


ANSWER = {"role": "assistant", "content": "Paris 18 °C, Zürich 12 °C."}

CONVERSATIONS = {
    "user only": [Q1],
    "system, user, assistant": [SYS, Q1, A1],
    "no system, multi-turn": [Q1, A1, Q2, A2],
    "two systems, multi-turn ending on user": [SYS, Q1, A1, SYS2, Q2],
    "one tool call": [WEATHER, ONE_CALL],
    "one tool call with text": [SYS, WEATHER, CALL_WITH_TEXT],
    "three tool calls": [WEATHER, THREE_CALLS],
    "one tool output": [WEATHER, ONE_CALL, out("18 °C")],
    "two consecutive tool outputs": [WEATHER, TWO_CALLS, out("18 °C"), out("12 °C")],
    "tool output then final answer": [SYS, WEATHER, ONE_CALL, out("18 °C"), ANSWER],
    "outputs, answer, next user turn": [WEATHER, THREE_CALLS, out("18"), out("12"), out("09:00"),
                                        ANSWER, Q1, A1],
    "two tool rounds": [WEATHER, ONE_CALL, out("18 °C"), CALL_WITH_TEXT, out("12 °C"), ANSWER],
    "tool call right after tool outputs": [WEATHER, ONE_CALL, out("18 °C"), TWO_CALLS,
                                           out("a"), out("b")],
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(small_corpus(40), vocab_size=512), d)
    return load_tokenizer(d)  # carries nanoseek's template as saved, like any run directory


def deepseek(tok, messages, gen, tokenize=False):
    """DeepSeek-V3-0324's template rendered as `apply_chat_template` renders a template."""
    from transformers.utils.chat_template_utils import render_jinja_template
    (text,), _ = render_jinja_template([messages], chat_template=DEEPSEEK_TEMPLATE,
                                       add_generation_prompt=gen, **tok.special_tokens_map)
    return tok(text, add_special_tokens=False)["input_ids"] if tokenize else text


@pytest.mark.parametrize("gen", [False, True], ids=["no-gen-prompt", "gen-prompt"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_matches_deepseek_v3_template(tok, name, gen):
    msgs = CONVERSATIONS[name]
    want = deepseek(tok, msgs, gen)
    assert render_chat(msgs, add_generation_prompt=gen) == want
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == want
    want_ids = deepseek(tok, msgs, gen, tokenize=True)
    ours = tok.apply_chat_template(msgs, add_generation_prompt=gen, return_dict=True,
                                   return_assistant_tokens_mask=True)
    assert ours["input_ids"] == want_ids
    assert tok(render_chat(msgs, gen), add_special_tokens=False)["input_ids"] == want_ids
    assert want_ids[0] == tok.bos_token_id and all(  # every marker is one special-token id
        want_ids.count(tok.convert_tokens_to_ids(t)) == want.count(t) for t in SPECIAL_TOKENS)
    # Piece by piece gives the same ids, and the pieces marked trained are the template's
    # {% generation %} spans: both renderers agree on what SFT learns.
    ids, mask = [], []
    for text, trained in chat_segments(msgs, gen):
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(trained)] * len(piece)
    assert ids == want_ids and mask == ours["assistant_masks"]
    # nanoseek's encoder (markers as ids, content as text) gives the same ids and mask
    ids, trained = Tokenizer.of(tok).encode_parts(chat_parts(msgs, gen))
    assert ids == want_ids and list(map(int, trained)) == ours["assistant_masks"]


def test_tool_turns_written_out():
    """One tool round spelled out, so the format can be read here."""
    msgs = [WEATHER, TWO_CALLS, out("18"), out("12"), ANSWER]
    fn = ('<｜tool▁call▁begin｜>function<｜tool▁sep｜>weather\n```json\n{"city": "%s"}\n```'
          '<｜tool▁call▁end｜>')
    assert render_chat(msgs) == (
        f"{BOS}<｜User｜>Weather in Paris and Zürich?<｜Assistant｜>"
        f"<｜tool▁calls▁begin｜>{fn % 'Paris'}\n{fn % 'Zürich'}<｜tool▁calls▁end｜>{EOS}"
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18<｜tool▁output▁end｜>"
        "\n<｜tool▁output▁begin｜>12<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
        f"Paris 18 °C, Zürich 12 °C.{EOS}")
    # A prompt that ends on tool outputs lets the model go on after <｜tool▁outputs▁end｜>.
    prompt = render_chat(msgs[:4], add_generation_prompt=True)
    assert prompt.endswith("12<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")


def test_inputs_deepseeks_template_fails_on(tok):
    """Arguments as a dict (DeepSeek's template needs a string), no call type, empty calls."""
    as_dict = {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "weather", "arguments": {"city": "Zürich", "days": [1, 2]}}}]}
    as_str = {"role": "assistant", "content": None, "tool_calls": [
        call("weather", {"city": "Zürich", "days": [1, 2]})]}
    as_str["tool_calls"][0]["function"]["arguments"] = json.dumps(
        {"city": "Zürich", "days": [1, 2]}, ensure_ascii=False)
    want = deepseek(tok, [WEATHER, as_str], False)
    assert "Zürich" in want
    assert render_chat([WEATHER, as_dict]) == want
    assert tok.apply_chat_template([WEATHER, as_dict], tokenize=False) == want
    # An empty call list is an answer without calls; None content is empty text.
    for msg in ({"role": "assistant", "content": "hi", "tool_calls": []},
                {"role": "assistant", "content": None}):
        want = f"{BOS}<｜User｜>2+2?<｜Assistant｜>{msg['content'] or ''}{EOS}"
        assert render_chat([Q1, msg]) == want
        assert tok.apply_chat_template([Q1, msg], tokenize=False) == want


def test_unknown_role_is_an_error(tok):
    from jinja2.exceptions import TemplateError
    bad = [Q1, {"role": "developer", "content": "x"}]
    with pytest.raises(ChatFormatError, match="message 1: role 'developer'"):
        render_chat(bad)
    with pytest.raises(TemplateError, match="message 1: role developer"):
        tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatFormatError, match="'function' with 'name' and 'arguments'"):
        render_chat([Q1, {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}])
