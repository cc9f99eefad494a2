"""DeepSeek-V3's tool calls, read back from what the model wrote.

The chat template (nanoseek/text/chat_template.py) writes a tool-call turn as

    {text}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}
    ```json
    {arguments}
    ```<｜tool▁call▁end｜>\\n<｜tool▁call▁begin｜>...<｜tool▁calls▁end｜><｜end▁of▁sentence｜>

and this module inverts it: `{text}` becomes the message content, each call an OpenAI
`tool_calls` entry. The markers are special tokens, so text decoded with
`skip_special_tokens=True` (the engine's default) no longer holds them: parse token ids
(`parse_tool_call_ids`) or text decoded with `skip_special_tokens=False`. nanoseek's server
uses this to answer `tool_calls`; the agent uses it on content that kept the markers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from nanoseek.text.special_tokens import BOS, EOS, TOOL_TOKENS

(TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP,
 *_OUTPUT_MARKERS) = TOOL_TOKENS


@dataclass
class ParsedToolCalls:
    """A generation split into its text and its calls. `errors` names each call that could
    not be read (a truncated generation, a missing separator, arguments that are not JSON);
    a call whose arguments are not JSON is still returned, as OpenAI's API does."""
    content: str
    tool_calls: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def parse_tool_calls(text: str, id_prefix: str = "call_") -> ParsedToolCalls:
    """Split `text` (special tokens kept) into content and OpenAI-shaped tool calls."""
    text = text.removeprefix(BOS).removesuffix(EOS)
    head, sep, rest = text.partition(TOOL_CALLS_BEGIN)
    if not sep:
        return ParsedToolCalls(content=text)
    out = ParsedToolCalls(content=head)
    body, closed, _ = rest.partition(TOOL_CALLS_END)
    if not closed:
        out.errors.append(f"no {TOOL_CALLS_END} after {TOOL_CALLS_BEGIN}: the generation was cut short")
    for i, chunk in enumerate(body.split(TOOL_CALL_BEGIN)[1:]):
        call, error = _parse_one(chunk, f"{id_prefix}{len(out.tool_calls)}")
        if error:
            out.errors.append(f"tool call {i}: {error}")
        if call:
            out.tool_calls.append(call)
    return out


def _parse_one(chunk: str, call_id: str) -> tuple[dict | None, str | None]:
    """One `type<｜tool▁sep｜>name\\n```json\\nargs\\n```<｜tool▁call▁end｜>` (the begin
    marker already removed)."""
    chunk, ended, _ = chunk.partition(TOOL_CALL_END)
    if not ended:
        return None, f"no {TOOL_CALL_END}: the call was cut short"
    kind, has_sep, rest = chunk.partition(TOOL_SEP)
    if not has_sep:
        return None, f"no {TOOL_SEP} between the call type and the function name"
    name, _, args = rest.partition("\n")
    args = args.strip()
    if args.startswith("```"):
        args = args.split("\n", 1)[1] if "\n" in args else ""
        args = args.removesuffix("```").removesuffix("\n")
    call = {"id": call_id, "type": kind.strip() or "function",
            "function": {"name": name.strip(), "arguments": args}}
    try:
        json.loads(args)
    except json.JSONDecodeError as e:
        return call, f"arguments of {name.strip()!r} are not JSON ({e.msg} at character {e.pos})"
    return call, None


def parse_tool_call_ids(token_ids: list[int], tokenizer, id_prefix: str = "call_") -> ParsedToolCalls:
    """The same from token ids: decoded with the special tokens kept, whatever the
    engine's `skip_special_tokens` was. `tokenizer`: anything `nanoseek.text.tokenizer.Tokenizer.of`
    accepts (a transformers tokenizer, a `tokenizers.Tokenizer`, nanoseek's wrapper)."""
    from nanoseek.text.tokenizer import Tokenizer
    text = Tokenizer.of(tokenizer).decode(list(token_ids), skip_special_tokens=False)
    return parse_tool_calls(text, id_prefix)
