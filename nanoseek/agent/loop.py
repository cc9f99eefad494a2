"""The agent: a model on any OpenAI-compatible endpoint, calling tools until it answers.

Each step is one chat completion. The model's tool calls are read from, in order: the
native `tool_calls` field; DeepSeek-V3's tool-call markers in the content (a server that
returned its text with special tokens kept; nanoseek/agent/tool_parser.py); fenced
`tool_call` blocks (the text protocol, nanoseek/agent/text_protocol.py). Each call runs
through the toolbox (errors become observations) after the guards (repeats, steps, time).
A reply without calls is the answer. In `auto` mode the first request offers native
`tools`; an endpoint that rejects them (HTTP 400/422) gets the text protocol instead.
"""

from __future__ import annotations

import os
import time

from nanoseek.agent.budget import ContextBudget
from nanoseek.agent.guards import Guards
from nanoseek.agent.text_protocol import observation_message, parse_text_calls, system_prompt
from nanoseek.agent.tool_parser import TOOL_CALLS_BEGIN, parse_tool_calls
from nanoseek.agent.tools.base import Tool, ToolBox
from nanoseek.agent.trajectory import Trajectory

MODES = ("auto", "native", "text")
DEFAULT_SYSTEM = "You are a helpful assistant. Use the tools when they help, then answer concisely."
MAX_OBSERVATION_CHARS = 20_000


class Agent:
    def __init__(self, client, model: str, tools: list[Tool] | None = None, *, mode: str = "auto",
                 system: str = DEFAULT_SYSTEM, guards: Guards | None = None,
                 budget: ContextBudget | None = None, memory=None, trajectory_path=None,
                 echo=print, temperature: float = 0.0, max_tokens: int | None = None,
                 extra_body: dict | None = None):
        """extra_body: fields the endpoint takes beyond OpenAI's, sent with every request (e.g.
        nanoseek's / vLLM's `{"skip_special_tokens": False}`, so that <think> tags a model was
        trained with come back in its content and into the next prompt as they were written)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {MODES}")
        if isinstance(client, str):
            from openai import OpenAI
            client = OpenAI(base_url=client, api_key=os.environ.get("OPENAI_API_KEY") or "none",
                            max_retries=0)
        if tools is None:
            from nanoseek.agent.tools.calculator import calculator_tool
            tools = [calculator_tool()]
        self.client, self.model, self.mode, self.system = client, model, mode, system
        self.guards = guards or Guards()
        self.toolbox = ToolBox(tools, self.guards.tool_timeout_s)
        self.budget, self.memory = budget, memory
        self.trajectory_path, self.echo = trajectory_path, echo
        self.temperature, self.max_tokens, self.extra_body = temperature, max_tokens, extra_body

    # ----------------------------------------------------------------- the loop
    def run(self, task: str | list[dict]) -> Trajectory:
        """Work on `task` (text, or OpenAI content parts with images) until an answer or a guard."""
        traj = Trajectory(self.trajectory_path, self.echo)
        self.guards.start()
        self._mode = "native" if self.mode == "auto" else self.mode
        traj.event("task", content=task)
        messages = [{"role": "system", "content": self._system(task, traj)},
                    {"role": "user", "content": task}]
        observation_ids: list[int] = []
        while (reason := self.guards.stop_reason(traj.steps)) is None:
            if self.budget is not None:
                for note in self.budget.fit(messages, observation_ids):
                    traj.event("note", content=note)
            try:
                content, calls, errors = self._complete(messages, traj)
            except Exception as e:  # noqa: BLE001 - an endpoint failure ends the run, saved
                reason = f"endpoint error: {type(e).__name__}: {e}"
                break
            traj.steps += 1
            if not calls and not errors:
                messages.append({"role": "assistant", "content": content})
                traj.answer = content
                traj.event("answer", step=traj.steps, content=content)
                break
            if content.strip():
                traj.event("thought", step=traj.steps, content=content)
            self._act(messages, content, calls, errors, traj, observation_ids)
        traj.stop_reason = reason or "answered"
        traj.event("stop", reason=traj.stop_reason)
        traj.messages = messages
        self._remember(task, traj)
        return traj

    def _act(self, messages, content, calls, errors, traj, observation_ids) -> None:
        """Append the assistant turn, run its calls, append what they returned: `tool`
        messages for native calls, one user message of observations otherwise."""
        native = self._mode == "native" and calls
        messages.append({"role": "assistant", "content": content or None, "tool_calls": calls}
                        if native else {"role": "assistant", "content": self._raw_reply})
        results = [("parser", f"error: {e}", None) for e in errors]
        for call in calls:
            name, args = call["function"]["name"], call["function"]["arguments"]
            traj.event("call", step=traj.steps, id=call["id"], name=name, arguments=args)
            text, ok = self._run_call(name, args)
            traj.event("observation", step=traj.steps, id=call["id"], name=name, content=text, ok=ok)
            results.append((name, text, call["id"]))
        if native:
            for e in errors:
                traj.event("note", content=f"unreadable tool call skipped: {e}")
            for name, text, call_id in results[len(errors):]:
                messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
                observation_ids.append(len(messages) - 1)
            return
        for e in errors:
            traj.event("observation", step=traj.steps, name="parser", content=f"error: {e}", ok=False)
        body = "\n\n".join(observation_message(n, t)["content"] for n, t, _ in results)
        messages.append({"role": "user", "content": body})
        observation_ids.append(len(messages) - 1)

    def _run_call(self, name: str, args: str) -> tuple[str, bool]:
        refusal = self.guards.repeated(name, args)
        if refusal is not None:
            return refusal, False
        obs = self.toolbox.call(name, args)
        text = obs.text
        if len(text) > MAX_OBSERVATION_CHARS:
            text = text[:MAX_OBSERVATION_CHARS] + f"\n[... truncated: {len(obs.text):,} characters in all]"
        self.guards.record(name, args, text)
        return text, obs.ok

    # ------------------------------------------------------------ the endpoint
    def _complete(self, messages: list[dict], traj: Trajectory):
        """One chat completion -> (content, OpenAI-shaped calls, parse errors)."""
        kwargs = dict(model=self.model, messages=messages, temperature=self.temperature,
                      timeout=max(1.0, self.guards.total_timeout_s - self._elapsed()))
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        if self._mode == "native":
            try:
                resp = self.client.chat.completions.create(**kwargs, tools=self.toolbox.specs())
            except Exception as e:  # noqa: BLE001 - only a rejection of `tools` is handled here
                if self.mode != "auto" or getattr(e, "status_code", None) not in (400, 422) \
                        or any(m["role"] == "tool" for m in messages):
                    raise
                self._mode = "text"
                messages[0]["content"] += "\n\n" + system_prompt(self.toolbox.specs())
                traj.event("note", content=f"the endpoint rejected native tools ({e}); "
                                           "switching to the text protocol")
                resp = self.client.chat.completions.create(**kwargs)
        else:
            resp = self.client.chat.completions.create(**kwargs)
        msg = resp.choices[0].message
        return self._read(msg.content or "", msg.tool_calls)

    def _read(self, content: str, native_calls):
        self._raw_reply = content
        if native_calls:
            return content, [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in native_calls], []
        if TOOL_CALLS_BEGIN in content:
            parsed = parse_tool_calls(content)
            return parsed.content, parsed.tool_calls, parsed.errors
        return parse_text_calls(content)

    def _elapsed(self) -> float:
        return time.monotonic() - self.guards._started

    # ------------------------------------------------------------------ memory
    def _system(self, task, traj: Trajectory) -> str:
        system = self.system
        if self._mode == "text":
            system += "\n\n" + system_prompt(self.toolbox.specs())
        if self.memory is not None and len(self.memory):
            recalled = self.memory.recall(_text_of(task))
            if recalled:
                traj.event("note", content=f"recalled {len(recalled)} memories")
                system += "\n\nFrom earlier runs (may help):\n" + "\n".join(f"- {r}" for r in recalled)
        return system

    def _remember(self, task, traj: Trajectory) -> None:
        if self.memory is not None and traj.answer:
            self.memory.add(f"Task: {_text_of(task)}\nAnswer: {traj.answer}", stop=traj.stop_reason)


def _text_of(task) -> str:
    """The text parts of a task (images are not embedded)."""
    if isinstance(task, str):
        return task
    return " ".join(p.get("text", "") for p in task if p.get("type") == "text")
