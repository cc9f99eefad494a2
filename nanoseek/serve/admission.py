"""Back-pressure: the server takes at most `max_num_seqs + max_queue` completions at once
(what the engine runs together, plus a bounded queue of waiting ones). One more is refused
with 429 and a Retry-After, at once, rather than left to wait behind an unbounded queue
until the client times out — a client (the `openai` one does) retries later.

Completions, not HTTP requests, are counted: a request with n=4 takes four places. A request
of more completions than the capacity could never be admitted: it is a 400, not a 429.
"""

from __future__ import annotations

from nanoseek.serve.errors import APIError


class Admission:
    def __init__(self, capacity: int, retry_after_s: int = 1):
        if capacity < 1:
            raise ValueError(f"the server must admit at least one completion, got capacity {capacity}")
        self.capacity, self.retry_after_s = capacity, retry_after_s
        self.in_flight = 0

    def check_size(self, k: int, param: str) -> None:
        """A request of more completions than the server ever takes at once would get 429s
        for ever: refuse it as a bad request, before its prompts are tokenised."""
        if k > self.capacity:
            raise APIError(400, f"{param}: the request asks for {k} completions (prompts × n); this server "
                                f"takes at most {self.capacity} at once", param=param, code="invalid_value")

    def admit(self, k: int) -> None:
        if self.in_flight + k > self.capacity:
            raise APIError(429, f"the server is at capacity ({self.in_flight} completions in flight, "
                                f"{self.capacity} at most, {k} asked): retry in {self.retry_after_s} s",
                           code="rate_limit_exceeded", headers={"Retry-After": str(self.retry_after_s)})
        self.in_flight += k

    def release(self, k: int) -> None:
        self.in_flight -= k
