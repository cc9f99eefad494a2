"""DeepSeek-V3's chat format: readable Python, and the Jinja template a saved tokenizer carries.

Both give, token for token, what DeepSeek-V3's own template gives (the V3-0324 release on,
kept in tests/data/deepseek-v3-0324.chat_template.jinja and compared in
tests/test_chat_template.py), so nanoseek writes a conversation exactly as a DeepSeek-V3
tokenizer would:

    <bos>{system prompts, joined by a blank line}
    <｜User｜>{question}<｜Assistant｜>                 a user turn also opens the answer
    {answer}<eos>                                        an assistant turn
    {text}<｜tool▁calls▁begin｜>{call}\\n{call}<｜tool▁calls▁end｜><eos>      a tool-call turn
    <｜tool▁outputs▁begin｜>{output}\\n{output}<｜tool▁outputs▁end｜>{answer}<eos>

    call   = <｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\\n```json\\n{arguments}\\n```
             <｜tool▁call▁end｜>                     (one line, no break before the marker)
    output = <｜tool▁output▁begin｜>{content}<｜tool▁output▁end｜>

After the tool outputs the model goes on straight after `<｜tool▁outputs▁end｜>` (no new
`<｜Assistant｜>`); `add_generation_prompt` adds `<｜Assistant｜>` only after an assistant
turn, since a user turn has already opened the answer. What nanoseek accepts beyond
DeepSeek's template (which fails on these): arguments given as a dict (written as JSON, like
transformers' `tojson`), a missing call `type` ("function"), `content` None on an answer
without calls ("") and an empty `tool_calls` list (no calls; DeepSeek's template would drop
the text).

Content is text, never markers. `chat_parts` keeps the template's own markers apart from
what the messages hold (system, user, tool outputs, assistant text, tool names and
arguments), and `Tokenizer.encode_chat` encodes only the markers as special ids: a
`<｜User｜>` or `<｜tool▁outputs▁begin｜>` typed in a message is spelled in ordinary tokens, so no
message can close its turn or forge another one. In an assistant's text, `<think>` and
`</think>` stay special (the reasoning markers the model writes). This is where nanoseek
differs on purpose from transformers' `apply_chat_template` (and so from the Jinja template
below and DeepSeek's own), which renders the string and then reads every special-token
string in it as a marker: the two give the same ids for any chat whose content holds no
special-token string.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

from nanoseek.text.special_tokens import ASSISTANT, BOS, END_THINK, EOS, THINK, TOOL_TOKENS, USER

(TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP,
 TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END) = TOOL_TOKENS
ROLES = ("system", "user", "assistant", "tool")
IMAGE_PLACEHOLDER = "<image_placeholder>"  # DeepSeek-VL's; its id is the model's config.image_token_id
_THINK_SPLIT = re.compile(f"({re.escape(THINK)}|{re.escape(END_THINK)})")


class ChatFormatError(ValueError):
    """A message the chat format cannot render (unknown role, missing field)."""


class Part(NamedTuple):
    """One piece of a rendered chat. `marker`: one of the template's own special tokens,
    encoded as its id; everything else (message content, and the template's plain text such
    as the "\\n```json\\n" around arguments) is encoded as text, so a special-token string
    inside content stays text. `trained`: the assistant wrote it (the tokens SFT learns)."""
    text: str
    trained: bool
    marker: bool = False
    token_id: int | None = None  # a marker whose id is the model's, not the vocabulary's (an image)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as DeepSeek-V3's template writes it: a string to read or to compare
    with transformers' template. Never tokenise it with special-token parsing (a marker typed
    in content would become a marker): `nanoseek.text.tokenizer.Tokenizer.encode_chat` encodes
    `chat_parts` instead."""
    return "".join(p.text for p in chat_parts(messages, add_generation_prompt))


def chat_segments(messages: list[dict],
                  add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) runs: `trained` marks what the assistant
    writes (its text, tool calls and closing eos), the tokens SFT learns; the same spans the
    Jinja template wraps in {% generation %}."""
    runs: list[tuple[str, bool]] = []
    for p in chat_parts(messages, add_generation_prompt):
        if runs and runs[-1][1] == p.trained:
            runs[-1] = (runs[-1][0] + p.text, p.trained)
        else:
            runs.append((p.text, p.trained))
    return runs


def chat_parts(messages: list[dict], add_generation_prompt: bool = False,
               image_token_id: int | None = None) -> list[Part]:
    """The rendered conversation as `Part`s, markers apart from content. Content never
    becomes a marker, whatever it holds: this is what keeps a user from forging turns.
    `image_token_id` (a vision-language model's placeholder id): a user message's content
    may be a list of text and image_url parts, each image one placeholder where it stood
    (the engine expands it to the image's tokens: engine/vision.py); None: text only."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ChatFormatError(f"message {i}: role {role!r} is not one of {ROLES}")
    system = "\n\n".join(_content(m, i) for i, m in enumerate(messages) if m["role"] == "system")
    parts = [_mark(BOS), Part(system, False)]
    outputs_open = False  # a tool-outputs block is open and waits for its end marker
    first_output = True   # the next tool output opens a new block
    last_is_user = False  # a user turn has already written <｜Assistant｜>
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user":
            parts += [_mark(USER), *_user_content(m, i, image_token_id), _mark(ASSISTANT)]
            outputs_open = False  # as DeepSeek's template: a user turn does not close the block
        elif role == "assistant":
            if outputs_open:
                parts.append(_mark(TOOL_OUTPUTS_END))
            parts += _assistant_turn(m, i)
            outputs_open, first_output = False, first_output or bool(m.get("tool_calls"))
        elif role == "tool":
            parts += tool_output_parts(_content(m, i), first=first_output)
            outputs_open, first_output = True, False
        if role != "system":
            last_is_user = role == "user"
    if outputs_open:
        parts.append(_mark(TOOL_OUTPUTS_END))
    elif add_generation_prompt and not last_is_user:
        parts.append(_mark(ASSISTANT))
    return [p for p in parts if p.text]


def tool_output_parts(content: str, first: bool) -> list[Part]:
    """One tool output: `<｜tool▁outputs▁begin｜>` opens the block (first) or a line break
    follows the previous output."""
    opener = _mark(TOOL_OUTPUTS_BEGIN) if first else Part("\n", False)
    return [opener, _mark(TOOL_OUTPUT_BEGIN), Part(content, False), _mark(TOOL_OUTPUT_END)]


def call_opening_parts(name: str | None) -> list[Part]:
    """A tool call opened up to the function's name (None) or, with `name`, up to its
    arguments: the prefill that forces a call."""
    head = [_mark(TOOL_CALLS_BEGIN), _mark(TOOL_CALL_BEGIN), Part("function", False), _mark(TOOL_SEP)]
    return head if name is None else head + [Part(name + "\n```json\n", False)]


def _mark(token: str, trained: bool = False) -> Part:
    return Part(token, trained, marker=True)


def _user_content(m: dict, i: int, image_token_id: int | None) -> list[Part]:
    """A user message's content: its text, or with `image_token_id` its text and image parts
    in order, one `IMAGE_PLACEHOLDER` marker (encoded as that id) per image."""
    content = m.get("content")
    if image_token_id is None or not isinstance(content, list):
        return [Part(_content(m, i), False)]
    parts = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            parts.append(Part(p["text"], False))
        elif kind == "image_url":
            parts.append(Part(IMAGE_PLACEHOLDER, False, marker=True, token_id=image_token_id))
        else:
            raise ChatFormatError(f"message {i}, content part {j}: expected a text or image_url part, got {p!r:.80}")
    return parts


def _content(m: dict, i: int) -> str:
    content = m.get("content")
    if content is None and m["role"] == "assistant":
        return ""
    if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
        raise ChatFormatError(f"message {i} holds an image (an image_url content part): this text "
                              "template reads text only; images (the rendered_arithmetic task, image "
                              "inputs) need a vision-language model, which reads them in user messages only")
    if not isinstance(content, str):
        raise ChatFormatError(f"message {i}: content must be a string, got {type(content).__name__}")
    return content


def _assistant_turn(m: dict, i: int) -> list[Part]:
    """An assistant message: its text, then its tool calls (one per line), then eos. In its
    text, <think> and </think> are the reasoning markers the model writes (one id each, as
    SFT trains them); every other special-token string there is text."""
    parts = [Part(piece, True, marker=piece in (THINK, END_THINK))
             for piece in _THINK_SPLIT.split(_content(m, i))]
    calls = m.get("tool_calls")
    if calls:
        parts.append(_mark(TOOL_CALLS_BEGIN, True))
        for k, call in enumerate(calls):
            if k:
                parts.append(Part("\n", True))
            parts += _tool_call(call)
        parts.append(_mark(TOOL_CALLS_END, True))
    return parts + [_mark(EOS, True)]


def _tool_call(call: dict) -> list[Part]:
    """One OpenAI-style tool call, `{"type": "function", "function": {"name", "arguments"}}`."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or "name" not in fn or "arguments" not in fn:
        raise ChatFormatError(
            f"tool call {call!r}: expected a 'function' with 'name' and 'arguments'")
    args, kind = fn["arguments"], call.get("type") or "function"
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    if not isinstance(fn["name"], str) or not isinstance(kind, str):
        raise ChatFormatError(f"tool call {call!r}: 'name' and 'type' must be strings")
    return [_mark(TOOL_CALL_BEGIN, True), Part(kind, True), _mark(TOOL_SEP, True),
            Part(fn["name"] + "\n```json\n" + args + "\n```", True), _mark(TOOL_CALL_END, True)]


# The same format for transformers' `apply_chat_template` (saved with every nanoseek tokenizer,
# so `AutoTokenizer.from_pretrained(run_dir)` renders chats as `render_chat` does). The
# assistant's pieces sit inside {% generation %} for `return_assistant_tokens_mask=True`.
CHAT_TEMPLATE = """\
{%- set ns = namespace(outputs_open=false, first_output=true, last_is_user=false) -%}
{{- bos_token -}}
{{- messages | selectattr('role', 'equalto', 'system') | map(attribute='content')
    | join('\\n\\n') -}}
{%- for m in messages -%}
  {%- if m['role'] not in ['system', 'user', 'assistant', 'tool'] -%}
    {{- raise_exception('message ' ~ loop.index0 ~ ': role ' ~ m['role']
                        ~ ' is not one of system, user, assistant, tool') -}}
  {%- elif m['role'] == 'user' -%}
    {{- '<｜User｜>' + m['content'] + '<｜Assistant｜>' -}}
    {%- set ns.outputs_open = false -%}
  {%- elif m['role'] == 'assistant' -%}
    {%- if ns.outputs_open %}{{ '<｜tool▁outputs▁end｜>' }}{% endif -%}
    {%- generation -%}
      {{- m['content'] or '' -}}
      {%- if m.get('tool_calls') -%}
        {{- '<｜tool▁calls▁begin｜>' -}}
        {%- for tc in m['tool_calls'] -%}
          {%- set args = tc['function']['arguments'] -%}
          {{- ('\\n' if not loop.first else '') + '<｜tool▁call▁begin｜>'
              + (tc.get('type') or 'function') + '<｜tool▁sep｜>' + tc['function']['name']
              + '\\n```json\\n'
              + (args if args is string else args | tojson) + '\\n```<｜tool▁call▁end｜>' -}}
        {%- endfor -%}
        {{- '<｜tool▁calls▁end｜>' -}}
      {%- endif -%}
      {{- '<｜end▁of▁sentence｜>' -}}
    {%- endgeneration -%}
    {%- if m.get('tool_calls') %}{% set ns.first_output = true %}{% endif -%}
    {%- set ns.outputs_open = false -%}
  {%- elif m['role'] == 'tool' -%}
    {{- ('<｜tool▁outputs▁begin｜>' if ns.first_output else '\\n')
        + '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' -}}
    {%- set ns.outputs_open = true -%}
    {%- set ns.first_output = false -%}
  {%- endif -%}
  {%- if m['role'] != 'system' %}{% set ns.last_is_user = m['role'] == 'user' %}{% endif -%}
{%- endfor -%}
{%- if ns.outputs_open -%}
  {{- '<｜tool▁outputs▁end｜>' -}}
{%- elif add_generation_prompt and not ns.last_is_user -%}
  {{- '<｜Assistant｜>' -}}
{%- endif -%}
"""
