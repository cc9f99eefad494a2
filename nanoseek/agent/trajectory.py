"""What an agent run did, step by step: printed as it happens and saved as JSONL.

Each event is one JSON line: `task`, `thought` (the model's text beside its calls), `call`
(tool name and arguments), `observation` (what the tool returned), `note` (the loop's own
remarks: a fallback to the text protocol, observations shortened for the token budget,
memories recalled), `see` (the images a step saw, `via` the model's own request or the
`look` tool: index, name, content hash, size and bytes, never the image itself), `answer`
and `stop`. The file is appended and flushed at every event,
so a run that is killed still leaves its trajectory. `messages` keeps the conversation in
OpenAI's format, ready for `nanoseek.text.chat_template.chat_segments`, which marks the tool
outputs the loop injected as untrained.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SHOW_CHARS = 600  # printed per event; the JSONL keeps everything


@dataclass
class Trajectory:
    path: str | Path | None = None
    echo: Callable[[str], None] | None = print
    events: list[dict] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    answer: str | None = None
    stop_reason: str | None = None
    steps: int = 0

    def __post_init__(self):
        if self.path is not None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text("")

    def event(self, kind: str, **fields) -> dict:
        ev = {"type": kind, "time": round(time.time(), 3), **fields}
        self.events.append(ev)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(ev, ensure_ascii=False, default=str) + "\n")
        if self.echo is not None:
            self.echo(_show(ev))
        return ev

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]


def image_label(ref: dict) -> str:
    """An image as the terminal shows it: index, name, size, the start of its content hash."""
    return f"{ref['index']} {ref['name']} {ref['width']}x{ref['height']} sha256:{ref['sha256'][:12]}"


def _show(ev: dict) -> str:
    """One event as the terminal shows it: `[step] kind: text`, long text cut."""
    kind, step = ev["type"], ev.get("step")
    if kind == "call":
        text = f"{ev['name']}({ev['arguments']})"
    elif kind == "stop":
        text = ev["reason"]
    elif kind == "see":
        text = f"{', '.join(map(image_label, ev['images']))} (via {ev['via']})"
    else:
        content = ev.get("content", "")
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    if kind == "task" and ev.get("images"):
        text += f" [images: {', '.join(map(image_label, ev['images']))}]"
    if len(text) > SHOW_CHARS:
        text = text[:SHOW_CHARS] + f" [... {len(text) - SHOW_CHARS:,} more characters]"
    return (f"[{step}] " if step is not None else "") + f"{kind}: {text}"
