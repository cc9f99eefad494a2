"""The loop's guards: a maximum number of steps (model calls), a total time limit, and
repeated identical calls. A call the model already made `max_repeats` times with the same
arguments is not run again: the model is told so, with the observation it got, so that it
changes course instead of spinning until the step limit. Per-tool time limits live in the
toolbox (nanoseek/agent/tools/base.py)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field


@dataclass
class Guards:
    max_steps: int = 10
    max_repeats: int = 1            # identical calls allowed before the next is refused
    total_timeout_s: float = 600.0
    tool_timeout_s: float = 60.0
    _started: float = field(default_factory=time.monotonic, repr=False)
    _seen: dict = field(default_factory=dict, repr=False)

    def start(self) -> None:
        self._started, self._seen = time.monotonic(), {}

    def stop_reason(self, step: int) -> str | None:
        """Why the loop must stop before model call number `step` (0-based), or None."""
        if step >= self.max_steps:
            return f"maximum steps reached ({self.max_steps})"
        elapsed = time.monotonic() - self._started
        if elapsed > self.total_timeout_s:
            return f"total timeout reached ({elapsed:.0f} s > {self.total_timeout_s:g} s)"
        return None

    def repeated(self, name: str, arguments: str) -> str | None:
        """A refusal to give the model if this exact call was already made max_repeats times."""
        key = _call_key(name, arguments)
        count, last = self._seen.get(key, (0, None))
        if count >= self.max_repeats:
            self._seen[key] = (count + 1, last)
            return (f"error: repeated call: {name} with these arguments was already made {count} "
                    f"time(s) and returned:\n{last}\nDo not repeat it; change the arguments or "
                    "give your final answer.")
        return None

    def record(self, name: str, arguments: str, observation: str) -> None:
        key = _call_key(name, arguments)
        count, _ = self._seen.get(key, (0, None))
        self._seen[key] = (count + 1, observation)


def _call_key(name: str, arguments: str) -> str:
    """The same call whatever the JSON's spacing or key order."""
    try:
        arguments = json.dumps(json.loads(arguments), sort_keys=True)
    except (TypeError, ValueError, RecursionError):  # not JSON, a huge integer, nesting too deep
        pass
    return f"{name}\0{arguments}"
