"""One API request on the engine: its completions (n per prompt, choice i*n+k) run as
separate engine requests (`AsyncLLM` streams one each; sample k uses seed + k, as
`LLM.generate`), merged into one stream of updates.

Each update maps the choices that moved to their latest cumulative output; outputs that
queued up while the consumer was busy (a slow client) are coalesced into the newest one, so
a slow reader costs the engine nothing. When the consumer stops — the stream finished, the
client hung up, the server is shutting down — every engine request still running is
cancelled, which aborts it and frees its KV blocks (`AsyncLLM.generate`'s own clean-up).
Per-completion latencies (time to first token, per output token, end to end) go to the
metrics as each completion finishes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from nanoseek.engine.outputs import CompletionOutput
from nanoseek.engine.sampler import SamplingParams
from nanoseek.serve.errors import APIError, internal_error


async def generate(llm, metrics, prompts: list[list[int]],
                   params: SamplingParams) -> AsyncIterator[dict[int, CompletionOutput]]:
    arrival = time.perf_counter()
    queue: asyncio.Queue = asyncio.Queue()
    jobs = [(i * params.n + k, p, params.for_sample(k)) for i, p in enumerate(prompts) for k in range(params.n)]

    async def pump(index: int, prompt: list[int], sp: SamplingParams) -> None:
        try:
            async for out in llm.generate(prompt, sp):
                queue.put_nowait((index, out.outputs[0]))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, e))

    tasks = [asyncio.create_task(pump(*job)) for job in jobs]
    first: dict[int, float] = {}
    finished: set[int] = set()
    try:
        while len(finished) < len(jobs):
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            latest: dict[int, CompletionOutput] = {}
            for index, item in items:
                if isinstance(item, Exception):
                    raise _as_api_error(item)
                latest[index] = item
            _observe(metrics, latest, arrival, first, finished)
            yield latest
    finally:  # no await here: it must also run inside a cancelled scope
        for t in tasks:
            t.cancel()


def _observe(metrics, latest: dict[int, CompletionOutput], arrival: float, first: dict[int, float],
             finished: set[int]) -> None:
    now = time.perf_counter()
    for index, c in latest.items():
        if c.token_ids and index not in first:
            first[index] = now
        if c.finish_reason is not None and index not in finished:
            finished.add(index)
            metrics.completion_done(arrival, first.get(index), now, len(c.token_ids))


def _as_api_error(e: Exception) -> APIError:
    """The engine's ValueError is the request's fault (it passed the server's checks but not
    the engine's); anything else is ours, and its text stays in the server's log."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):
        return APIError(400, str(e), code="invalid_request")
    return internal_error(e, "the engine failed")


def failed(outs: dict[int, CompletionOutput]) -> APIError | None:
    """A completion that ended in error (e.g. non-finite logits) fails the request."""
    for c in outs.values():
        if c.finish_reason == "error":
            return APIError(500, c.error or "generation failed", code="generation_error")
    return None
