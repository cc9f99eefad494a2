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
"""

from __future__ import annotations

import json

from nanoseek.special_tokens import ASSISTANT, BOS, EOS, TOOL_TOKENS, USER

(TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP,
 TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END) = TOOL_TOKENS
ROLES = ("system", "user", "assistant", "tool")


class ChatFormatError(ValueError):
    """A message the chat format cannot render (unknown role, missing field)."""


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as DeepSeek-V3's template writes it."""
    return "".join(text for text, _ in chat_segments(messages, add_generation_prompt))


def chat_segments(messages: list[dict],
                  add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces: `trained` marks what the
    assistant writes (its text, tool calls and closing eos), the tokens SFT learns; the same
    spans the Jinja template wraps in {% generation %}. Pieces meet only beside a special
    token, so tokenising piece by piece gives the ids of the whole string."""
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ChatFormatError(f"message {i}: role {m.get('role')!r} is not one of {ROLES}")
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    pieces = [(BOS + system, False)]
    outputs_open = False  # a tool-outputs block is open and waits for its end marker
    first_output = True   # the next tool output opens a new block
    last_is_user = False  # a user turn has already written <｜Assistant｜>
    for m in messages:
        role = m["role"]
        if role == "user":
            pieces.append((USER + m["content"] + ASSISTANT, False))
            outputs_open = False  # as DeepSeek's template: a user turn does not close the block
        elif role == "assistant":
            if outputs_open:
                pieces.append((TOOL_OUTPUTS_END, False))
            pieces.append((_assistant_turn(m), True))
            outputs_open, first_output = False, first_output or bool(m.get("tool_calls"))
        elif role == "tool":
            opener = TOOL_OUTPUTS_BEGIN if first_output else "\n"
            pieces.append((opener + TOOL_OUTPUT_BEGIN + m["content"] + TOOL_OUTPUT_END, False))
            outputs_open, first_output = True, False
        if role != "system":
            last_is_user = role == "user"
    if outputs_open:
        pieces.append((TOOL_OUTPUTS_END, False))
    elif add_generation_prompt and not last_is_user:
        pieces.append((ASSISTANT, False))
    return pieces


def _assistant_turn(m: dict) -> str:
    """An assistant message: its text, then its tool calls (one per line), then eos."""
    text, calls = m.get("content") or "", m.get("tool_calls")
    if not calls:
        return text + EOS
    return text + TOOL_CALLS_BEGIN + "\n".join(map(_tool_call, calls)) + TOOL_CALLS_END + EOS


def _tool_call(call: dict) -> str:
    """One OpenAI-style tool call, `{"type": "function", "function": {"name", "arguments"}}`."""
    fn = call.get("function")
    if not isinstance(fn, dict) or "name" not in fn or "arguments" not in fn:
        raise ChatFormatError(
            f"tool call {call!r}: expected a 'function' with 'name' and 'arguments'")
    args = fn["arguments"]
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return (TOOL_CALL_BEGIN + (call.get("type") or "function") + TOOL_SEP + fn["name"]
            + "\n```json\n" + args + "\n```" + TOOL_CALL_END)


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
