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

import json
import os
import time

from nanoseek.agent.budget import ContextBudget
from nanoseek.agent.guards import Guards
from nanoseek.agent.images import AgentImage, images_note, pick_image
from nanoseek.agent.text_protocol import observation_message, parse_text_calls, system_prompt
from nanoseek.agent.tool_parser import TOOL_CALLS_BEGIN, parse_tool_calls
from nanoseek.agent.tools.base import Tool, ToolBox
from nanoseek.agent.tools.vision import LOOK
from nanoseek.agent.trajectory import Trajectory

MODES = ("auto", "native", "text")
DEFAULT_SYSTEM = "You are a helpful assistant. Use the tools when they help, then answer concisely."
MAX_OBSERVATION_CHARS = 20_000
IMAGE_REFUSALS = ("images_not_supported", "images_not_served")  # nanoseek serve's (serve/images.py)


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
    def run(self, task: str | list[dict], images: list[AgentImage] = (), images_to_model: bool = True
            ) -> Trajectory:
        """Work on `task` (text, or OpenAI content parts) until an answer or a guard.
        `images` (agent/images.py): sent to the model with the task, or with
        images_to_model=False only listed in it, for the vision tool (`look`) to see. The
        trajectory records each image a step saw by content hash, never its bytes."""
        traj = Trajectory(self.trajectory_path, self.echo)
        asked = task  # what the user asked: memory keeps this, not the images' note added below
        self.guards.start()
        self._mode = "native" if self.mode == "auto" else self.mode
        self._images = list(images)
        refs = [im.ref() for im in self._images]
        traj.event("task", content=_recorded(task), **({"images": refs} if refs else {}))
        if self._images and not images_to_model:
            task = _with_text(task, images_note(self._images, LOOK))
        elif self._images:
            task = _with_parts(task, [im.part() for im in self._images])
        messages = [{"role": "system", "content": self._system(asked, traj)},
                    {"role": "user", "content": task}]
        observation_ids: list[int] = []
        while (reason := self.guards.stop_reason(traj.steps)) is None:
            if self.budget is not None:
                for note in self.budget.fit(messages, observation_ids):
                    traj.event("note", content=note)
            try:
                content, calls, errors = self._complete(messages, traj)
            except Exception as e:  # noqa: BLE001 - an endpoint failure ends the run, saved
                reason = f"endpoint error: {type(e).__name__}: {e}" + _images_hint(e, messages)
                break
            if self._images and images_to_model:  # the step's request held them, and was answered
                traj.event("see", step=traj.steps + 1, images=refs, via="model")
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
        self._remember(asked, traj)
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
            seen = self._looked_at(name, args) if ok else None
            if seen is not None:
                traj.event("see", step=traj.steps, id=call["id"], images=[seen.ref()], via=name)
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

    def _looked_at(self, name: str, args) -> AgentImage | None:
        """The image a successful vision-tool call used, picked from the tool's own images as
        the tool picked it (None for any other tool, e.g. an MCP server's tool of that name)."""
        tool = self.toolbox.tools.get(name)
        if tool is None or tool.sees is None:
            return None
        try:
            args = json.loads(args or "{}") if isinstance(args, str) else args
            return pick_image(tool.sees, args.get("image"))
        except (ValueError, RecursionError, AttributeError):
            return None

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
                        or any(m["role"] == "tool" for m in messages) or _refused_images(e):
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


def _refused_images(e: Exception) -> bool:
    """Whether an endpoint's error is its refusal of the request's images (nanoseek serve's
    codes; other servers' 400s that name an image)."""
    code = getattr(e, "code", None)
    return code in IMAGE_REFUSALS or (getattr(e, "status_code", None) in (400, 422, 501)
                                      and "image" in str(e).lower())


def _cannot_see(e: Exception) -> bool:
    """Whether an endpoint said its model takes no images at all (not that these broke a limit)."""
    return getattr(e, "code", None) in IMAGE_REFUSALS or any(
        w in str(e).lower() for w in ("reads text only", "text-only", "does not support image", "images_not"))


def _images_hint(e: Exception, messages: list[dict]) -> str:
    """What to do when an endpoint refused the images it was sent: a text-only model can
    read them through the vision tool."""
    sent = any(isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
               for m in messages)
    if not (sent and _cannot_see(e)):
        return ""
    return ("; the model did not take the images: if it reads text only, let it look at them through a "
            "vision-capable endpoint instead (nanoseek agent --vision-endpoint URL: the look tool)")


def _recorded(task):
    """The task as a trajectory records it: image parts by a note, never their URL or bytes
    (images given as `images` are recorded by content hash beside it)."""
    if isinstance(task, str):
        return task
    return [p if p.get("type") != "image_url" else {"type": "image_url", "image_url": "(not recorded)"}
            for p in task]


def _with_text(task, text: str):
    if isinstance(task, str):
        return f"{task}\n\n{text}"
    return [*task, {"type": "text", "text": text}]


def _with_parts(task, parts: list[dict]) -> list[dict]:
    head = [{"type": "text", "text": task}] if isinstance(task, str) else list(task)
    return head + parts


def _text_of(task) -> str:
    """The text parts of a task (images are not embedded)."""
    if isinstance(task, str):
        return task
    return " ".join(p.get("text", "") for p in task if p.get("type") == "text")
