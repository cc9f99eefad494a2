"""Cache keys: which requests may be cached, and the hashes that name them.

The key the server hands over already carries the caller's scope (`caller_scope`) and the
checkpoint's fingerprint (fingerprint.py), so they take part in both levels' matching.
L1 names a request by the sha256 of its canonical JSON, so two requests that differ only in
key order, `0` vs `0.0`, or an explicit `null` vs an absent field share one entry. L2 splits
a request into the text a user typed last (embedded, compared by cosine) and its *context*:
everything else (model, system prompt, earlier turns, sampling fields), which must match
exactly — a paraphrase asked of another model or at another temperature is another answer.
"""

from __future__ import annotations

import copy
import hashlib
import json

OPENAI_DEFAULT_TEMPERATURE = 1.0  # an absent temperature samples: not deterministic
SHARED_SCOPE = "shared"


def caller_scope(api_key: str | None, per_key: bool) -> str:
    """Whose answers a request may be served: the same API key's only (`per_key`), or every
    caller's (a server without keys, or `--cache-scope shared`). The key itself is never
    kept: the scope is a salted sha256 of it, and the server puts it in the cache key, so L1
    entries and L2 contexts of two keys never meet."""
    if not per_key:
        return SHARED_SCOPE
    digest_ = hashlib.sha256(b"nanoseek response-cache scope\0" + (api_key or "").encode("utf-8"))
    return "key:" + digest_.hexdigest()


def cacheable(key: dict) -> bool:
    """Only deterministic requests are cached: temperature 0 (greedy; any `n` then repeats
    one answer) or an integer seed (the engine replays the same draws). OpenAI's default
    temperature is 1, so a request with neither is sampled afresh each time."""
    seed = key.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return True
    temperature = key.get("temperature")
    if temperature is None:
        temperature = OPENAI_DEFAULT_TEMPERATURE
    return float(temperature) == 0.0


def canonical(value):
    """The request with equal meanings spelled one way: `null` fields dropped (OpenAI reads
    them as the default), integral floats as ints (`0.0` -> `0`); key order is left to
    sort_keys."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def digest(value) -> str:
    """sha256 of the canonical JSON: stable across processes and Python versions."""
    text = json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def l1_key(key: dict) -> str:
    return digest(key)


def _text_of(content) -> str | None:
    """A message's text: a string, or the text parts of a list; None when it holds anything
    but text (an image's meaning is not in its caption)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         for p in content):
        return "\n".join(p.get("text", "") for p in content)
    return None


def semantic_parts(key: dict) -> tuple[str, str] | None:
    """(text to embed, context digest) for L2, or None when the request has no single text
    to compare: chat -> the last user message, completions -> a string prompt."""
    context = copy.deepcopy(key)
    if isinstance(key.get("messages"), list):
        users = [i for i, m in enumerate(key["messages"])
                 if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            return None
        text = _text_of(key["messages"][users[-1]].get("content"))
        context["messages"][users[-1]]["content"] = None
    elif isinstance(key.get("prompt"), str):
        text = key["prompt"]
        context["prompt"] = None
    else:
        return None
    if text is None or not text.strip():
        return None
    return text, digest(context)
