"""The text fallback: tool calls for models and servers without native `tools`.

The tools are described in the system prompt, and the model calls one by writing a fenced
block tagged `tool_call` that holds one JSON object:

    ```tool_call
    {"name": "calculator", "arguments": {"expression": "123 * 456"}}
    ```

The loop answers with a user message that starts `Observation from <name>:`. A reply
without a `tool_call` block is the final answer. This is the protocol any instruction-tuned
model can follow from the prompt alone; it costs nothing when native calls work.
"""

from __future__ import annotations

import json
import re

FENCE = re.compile(r"```tool_call[ \t]*\n(.*?)\n?```", re.DOTALL)
OBSERVATION = "Observation from {name}:\n{text}"


def system_prompt(tool_specs: list[dict]) -> str:
    """The instructions and the tools (name, description, JSON-schema parameters)."""
    lines = ["You can call tools. To call one, reply with exactly one fenced block tagged "
             "tool_call holding a JSON object with \"name\" and \"arguments\", and nothing after it:",
             "```tool_call", '{"name": "TOOL", "arguments": {"ARG": "VALUE"}}', "```",
             "The result comes back in the next message, starting \"Observation from TOOL:\". "
             "When you know the answer, reply with it and no tool_call block.", "", "Tools:"]
    for spec in tool_specs:
        fn = spec["function"]
        lines.append(f"- {fn['name']}: {fn.get('description', '')} "
                     f"Parameters (JSON schema): {json.dumps(fn.get('parameters', {}))}")
    return "\n".join(lines)


def parse_text_calls(content: str, id_prefix: str = "text_call_") -> tuple[str, list[dict], list[str]]:
    """(the text before the first block, OpenAI-shaped calls, errors) from a reply."""
    calls, errors = [], []
    for i, m in enumerate(FENCE.finditer(content or "")):
        try:
            obj = json.loads(m.group(1))
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                raise ValueError('expected an object with a string "name"')
        except ValueError as e:
            errors.append(f"tool_call block {i}: not a JSON call ({e}); write "
                          '{"name": "TOOL", "arguments": {...}}')
            continue
        args = obj.get("arguments", {})
        calls.append({"id": f"{id_prefix}{len(calls)}", "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args)}})
    first = FENCE.search(content or "")
    return (content[:first.start()] if first else content or ""), calls, errors


def observation_message(name: str, text: str) -> dict:
    return {"role": "user", "content": OBSERVATION.format(name=name, text=text)}
