"""`tools` and `tool_choice` on /v1/chat/completions, for models that write DeepSeek-V3's
tool-call markers (nanoseek/text/chat_template.py defines them; nanoseek/agent/tool_parser.py
reads them back).

What each `tool_choice` does (the model always decides what it writes; the server only
reads it, or ends the prompt so that the next tokens must be a call):

    "auto"      (the default when `tools` are given) a reply holding <｜tool▁calls▁begin｜>
                is parsed into `tool_calls`, finish_reason "tool_calls"
    "none"      <｜tool▁calls▁begin｜> is a stop token: the reply ends where the model would
                have called a tool (finish_reason "stop"); nothing is parsed
    "required"  the prompt ends with `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>`:
                the model must name a function
    {"type": "function", "function": {"name": N}}
                the prompt ends with the call opened up to its arguments
                (`...<｜tool▁sep｜>N\\n```json\\n`): the model writes only the arguments

Calls are parsed from the generated token ids decoded with the special tokens kept (the
prefilled text in front), whatever the request's `skip_special_tokens`: text decoded with
them skipped has lost the markers. A stream sends the text before <｜tool▁calls▁begin｜> as
content as it comes, then buffers, and sends the calls whole in the last chunk (as vLLM's
tool parsers do). A call that cannot be read (cut short by max_tokens, no separator,
arguments that are not JSON) comes back as content — the text from the marker on, markers
kept, then a note saying why — with the engine's finish_reason: never a 500.

DeepSeek-V3's chat template does not write tool definitions into the prompt (nor does
vLLM's with that template): `tools` name what may be called; describe them to the model in
a system message, as the tool_use task does. Without `tools` nothing changes: no parsing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

from nanoseek.agent.tool_parser import TOOL_CALLS_BEGIN, parse_tool_call_ids
from nanoseek.text.chat_template import Part, call_opening_parts
from nanoseek.serve.errors import APIError
from nanoseek.serve.protocol import ChatCompletionRequest
from nanoseek.text.special_tokens import EOS
from nanoseek.text.tokenizer import Tokenizer


def tool_choice_of(req: ChatCompletionRequest) -> str | None:
    """"auto" | "none" | "required" | a function's name; None when the request has no tools.
    400 for a choice that names no offered tool, or a choice without tools."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice: needs `tools`", param="tool_choice", code="invalid_value")
        return None
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    names = [t.function.name for t in req.tools]
    if choice.function.name not in names:
        raise APIError(400, f"tool_choice: function {choice.function.name!r} is not among the tools {names}",
                       param="tool_choice", code="invalid_value")
    return choice.function.name


def prefill(choice: str) -> list[Part]:
    """What ends the prompt for a forced call (nothing when nothing is forced); the
    function's name is encoded as text, whatever it holds."""
    if choice in ("auto", "none"):
        return []
    return call_opening_parts(None if choice == "required" else choice)


def apply_tools(req: ChatCompletionRequest, tokenizer, prompt: list[int], params):
    """(prompt, params, reader): the prompt with the forced call's opening appended, the
    params with <｜tool▁calls▁begin｜> as a stop token for "none", and the `ToolReader` the
    formatter uses (None: a request without tools, formatted as before)."""
    choice = tool_choice_of(req)
    if choice is None:
        return prompt, params, None
    tok = Tokenizer.of(tokenizer)
    marker = tok.tok.token_to_id(TOOL_CALLS_BEGIN)
    if marker is None:
        raise APIError(400, f"tools: this model's tokenizer has no {TOOL_CALLS_BEGIN} token, so it cannot "
                            "call tools", param="tools", code="unsupported_value")
    if choice == "none":
        params = replace(params, stop_token_ids=[*params.stop_token_ids, marker])
    head = tok.encode_parts(prefill(choice))[0]
    reader = ToolReader(tok, marker, head, choice == "none", params.skip_special_tokens)
    return prompt + head, params, reader


@dataclass
class ToolReader:
    """Reads one request's completions: what may be streamed as content so far, and the
    final message (content, tool_calls, finish_reason)."""
    tokenizer: Tokenizer
    marker: int              # the id of <｜tool▁calls▁begin｜>
    head: list[int]          # the prefilled ids (a forced call's opening), part of the reply
    forbid: bool             # tool_choice "none": the marker is a stop token, never parsed
    skip_special_tokens: bool

    def _marker_at(self, ids: list[int]) -> int | None:
        """Where the calls begin in head + ids, or None."""
        full = self.head + list(ids)
        return full.index(self.marker) if self.marker in full else None

    def visible(self, c) -> str:
        """The content a stream may show: all the text, or only what precedes the marker."""
        at = self._marker_at(c.token_ids)
        if at is None:
            return c.text
        return self.tokenizer.decode(c.token_ids[:max(0, at - len(self.head))], self.skip_special_tokens)

    def message(self, c) -> tuple[str | None, list[dict] | None, str | None]:
        """A finished completion -> (content, tool_calls, finish_reason)."""
        content, at = self.visible(c), self._marker_at(c.token_ids)
        if at is None or self.forbid:
            return content, None, c.finish_reason
        full = self.head + list(c.token_ids)
        parsed = parse_tool_call_ids(full, self.tokenizer, id_prefix=f"call_{uuid.uuid4().hex[:12]}_")
        if parsed.errors or not parsed.tool_calls:
            tail = self.tokenizer.decode(full[at:], skip_special_tokens=False).removesuffix(EOS)
            why = "; ".join(parsed.errors) or "no call between the markers"
            return (content + tail + f"\n\n[nanoseek: the tool call could not be read, so it is returned "
                                     f"as text: {why}]"), None, c.finish_reason
        finish = "tool_calls" if c.finish_reason == "stop" else c.finish_reason
        return content or None, parsed.tool_calls, finish
