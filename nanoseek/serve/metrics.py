"""`/metrics`: the server's Prometheus metrics, through `prometheus_client` (never
hand-formatted), on a registry of its own so two servers in one process never collide.

Counted by the request path: requests by endpoint and status, prompt and generated
tokens, response-cache hits (by level: l1 exact, l2 semantic), misses and failures (served
as misses); the latencies a user feels as histograms — time to first token, time per
output token after the first (TPOT), end to end. Read from the engine at scrape time (`LLMEngine.stats()`): requests
running and waiting, KV-cache blocks used and their share, prefix-cache queries and hits
(the "L3" cache), preemptions.

The `endpoint` label is the route the request matched — its template, as
`/v1/chat/completions`, never the path the client typed — and `<unmatched>` for every path
no route serves, so the label set is bounded by the app's routes whatever is probed (a
label per path grew /metrics by 1.7 MB over 3,000 unauthenticated requests). It is found
after the answer, for the 401s and 413s the guards give before routing too.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.routing import Match, Mount

UNMATCHED = "<unmatched>"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class EngineCollector:
    """Gauges and counters the engine already keeps, read when scraped."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        gauges = [("num_requests_running", "requests in the running batch", s["running"]),
                  ("num_requests_waiting", "requests queued in the engine for a slot", s["waiting"]),
                  ("kv_cache_blocks_used", "KV-cache blocks held by requests", s["kv_blocks_used"]),
                  ("kv_cache_blocks_total", "KV-cache blocks in all", s["kv_blocks_total"]),
                  ("kv_cache_usage_ratio", "share of KV-cache blocks held by requests", s["kv_cache_usage"])]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"nanoseek_{name}", doc, value=value)
        # per cache kind (V3: the latent; V3.2: the latent and the indexer keys; V4: window,
        # compressed, indexer, compressor_state): the pools' bytes, and those of held blocks
        for name, doc, key in (("kv_cache_bytes", "KV-cache bytes allocated, per cache kind", "kv_cache_bytes_by_kind"),
                               ("kv_cache_bytes_used", "KV-cache bytes held by requests, per cache kind",
                                "kv_cache_bytes_used_by_kind")):
            g = GaugeMetricFamily(f"nanoseek_{name}", doc, labels=["kind"])
            for kind, nbytes in s[key].items():
                g.add_metric([kind], nbytes)
            yield g
        counters = [("prefix_cache_queries", "full prompt blocks looked up in the prefix cache",
                     s["prefix_cache_queries"]),
                    ("prefix_cache_hits", "full prompt blocks found in the prefix cache", s["prefix_cache_hits"]),
                    ("preemptions", "requests preempted for lack of KV blocks", s["preemptions"])]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"nanoseek_{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nanoseek_requests", "HTTP requests, by the route they matched and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("nanoseek_prompt_tokens", "prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter("nanoseek_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("nanoseek_time_per_output_token_seconds",
                              "mean time per generated token after the first, per completion",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("nanoseek_e2e_request_latency_seconds", "arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("nanoseek_requests_in_flight", "completions admitted by the server, not yet done",
                               registry=r)
        self.cache_hits = Counter("nanoseek_response_cache_hits", "responses served from the response cache",
                                  ["level"], registry=r)
        self.cache_misses = Counter("nanoseek_response_cache_misses",
                                    "cacheable requests the response cache did not hold", registry=r)
        self.cache_errors = Counter("nanoseek_response_cache_errors",
                                    "response-cache calls that failed and were served as a miss or "
                                    "not stored, by level (l1, l2; seam: the call as a whole) and op",
                                    ["layer", "op"], registry=r)
        r.register(EngineCollector(engine))

    def cache_error(self, layer: str, op: str) -> None:
        """`ResponseCache(on_error=...)`: a level that failed (lookup or store)."""
        self.cache_errors.labels(layer=layer, op=op).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def completion_done(self, arrival: float, first: float | None, last: float, num_tokens: int) -> None:
        """One completion's latencies (times from time.perf_counter)."""
        self.generation_tokens.inc(num_tokens)
        self.e2e.observe(last - arrival)
        if first is not None:
            self.ttft.observe(first - arrival)
            if num_tokens > 1:
                self.tpot.observe((last - first) / (num_tokens - 1))


class CountRequests:
    """ASGI middleware: one count per HTTP request, by the route it matched and the status
    it got (including the 401s and 413s the guards answer before any route runs)."""

    def __init__(self, app, counter: Counter, routes: list):
        self.app, self.counter, self.routes = app, counter, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, asked = [None], dict(scope)  # routing below rewrites scope as it goes

        async def sent(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sent)
        except Exception:
            status[0] = status[0] or 500
            raise
        finally:
            code = status[0] or 499  # no answer: the client left first
            self.counter.labels(endpoint=route_label(self.routes, asked, code), status=str(code)).inc()


def route_label(routes: list, scope, status: int) -> str:
    """The template of the route that serves `scope`'s path (with any method: a 405 counts
    under its route), the chat page's mount as "/" when it found a file, else UNMATCHED."""
    mounted = False
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.NONE:
            continue
        if not isinstance(route, Mount):
            return route.path
        mounted = True
    return "/" if mounted and status < 400 else UNMATCHED
