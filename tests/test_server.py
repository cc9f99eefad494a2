"""The OpenAI-compatible server, live: uvicorn on 127.0.0.1 (a free port, in a thread), the
official `openai` client against it, streaming and not; every bad input with its status;
API keys; 429 from a full queue; a client that hangs up mid-stream frees every block;
/metrics through prometheus_client's parser; the response-cache seam; `nanoseek chat` and
`nanoseek serve`'s graceful SIGTERM in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"
KEY = "sk-test"
HI = [{"role": "user", "content": "Hello there"}]


def tiny_checkpoint(d: Path) -> Path:
    """A tiny checkpoint (vocab 300, context 256) with a byte-level BPE tokenizer, in `d`."""
    from nanoseek.checkpoint.hf import save_pretrained
    from nanoseek.data import load_corpus
    from nanoseek.model import CausalLM
    from nanoseek.text.tokenizer import save_tokenizer, train_tokenizer
    import torch
    torch.manual_seed(0)
    save_pretrained(CausalLM(tiny_config(vocab_size=300, num_nextn_predict_layers=0)), d)
    save_tokenizer(train_tokenizer(load_corpus()[:40], 300), d)
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


class Live:
    """A uvicorn server in a thread, on a port the OS picked."""

    def __init__(self, app):
        import uvicorn
        self.app, self.engine = app, app.state.llm.engine
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the server to start")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


def wait_for(cond, what: str, tries: int = 3000):
    for _ in range(tries):
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Gate:
    """Lets the engine take only the steps the test allows (a held step does nothing), so a
    request is surely still running or waiting when the test acts: no race with a fast
    engine. (The engine steps on the server's event loop, so a held step must not block.)"""

    def __init__(self, engine):
        self.engine, self.allowed, self.open = engine, 1, False

    def step(self):
        if self.open or self.allowed > 0:
            self.allowed -= 1
            return type(self.engine).step(self.engine)
        time.sleep(0.001)
        return []

    def allow(self, k: int) -> None:
        self.allowed += k

    def __enter__(self):
        self.engine.step = self.step
        return self

    def __exit__(self, *exc):
        self.open = True
        del self.engine.step


def make_app(ckpt, **kw):
    from nanoseek.engine import AsyncLLM
    from nanoseek.serve.app import create_app
    engine_kw = {k: kw.pop(k) for k in ("max_num_seqs",) if k in kw}
    return create_app(AsyncLLM(ckpt, kv_cache_memory=2**22, speculative=False, **engine_kw), MODEL, **kw)


@pytest.fixture(scope="module")
def live(ckpt):
    server = Live(make_app(ckpt))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict(ckpt):
    """API key required; the engine runs 1 request, 1 more may wait."""
    server = Live(make_app(ckpt, api_keys=[KEY], max_num_seqs=1, max_queue=1, max_body_bytes=2000))
    yield server
    server.stop()


def post(live, path, body=None, content=None, headers=None):
    return httpx.post(live.url + path, json=body, content=content, headers=headers, timeout=60)


# --------------------------------------------------------------- the client
def test_models_and_health(live):
    assert [m.id for m in live.client().models.list().data] == [MODEL]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


def test_chat_matches_the_offline_engine(live, ckpt):
    from nanoseek.text.chat_template import render_chat
    from nanoseek.engine import LLM, SamplingParams
    r = live.client().chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0, n=2,
                                              logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    llm = LLM(ckpt, kv_cache_memory=2**22, speculative=False)
    ids = llm.tokenizer.encode(render_chat(HI, add_generation_prompt=True), add_special_tokens=False)
    ref = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content == ref.outputs[0].text and c.finish_reason == "length" for c in r.choices)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 16 and r.usage.total_tokens == len(ids) + 16
    lp = r.choices[0].logprobs.content
    assert len(lp) == 8 and all(len(t.top_logprobs) == 3 for t in lp)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in lp)  # greedy: the sampled token is the top one
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_stream_equals_non_stream(live):
    client = live.client()
    kw = dict(model=MODEL, messages=HI, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_seed_reproducible_and_n_differs(live):
    client = live.client()
    kw = dict(model=MODEL, messages=HI, max_tokens=10, temperature=1.0, n=2, extra_body={"ignore_eos": True})
    a = [c.message.content for c in client.chat.completions.create(**kw, seed=5).choices]
    b = [c.message.content for c in client.chat.completions.create(**kw, seed=5).choices]
    c = [c.message.content for c in client.chat.completions.create(**kw, seed=6).choices]
    assert a == b and a != c and a[0] != a[1]  # sample k uses seed + k


def test_stop_strings(live):
    client = live.client()
    kw = dict(model=MODEL, prompt="The cache", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    at = next(i for i in range(3, len(full) - 1) if full.find(full[i:i + 2]) == i and full[i:i + 2].strip())
    for stream in (False, True):
        if stream:
            parts = list(client.completions.create(**kw, stop=[full[at:at + 2]], stream=True))
            text, finish = "".join(p.choices[0].text for p in parts), parts[-1].choices[0].finish_reason
        else:
            choice = client.completions.create(**kw, stop=full[at:at + 2]).choices[0]
            text, finish = choice.text, choice.finish_reason
        assert (text, finish) == (full[:at], "stop")


def test_completions_batch_n_logprobs_and_stream(live):
    client = live.client()
    r = client.completions.create(model=MODEL, prompt=["One", "Two words"], n=2, max_tokens=5, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.object == "text_completion"
    assert r.choices[0].text == r.choices[1].text and r.usage.completion_tokens == 20
    lp = r.choices[2].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    parts = list(client.completions.create(model=MODEL, prompt="Two words", max_tokens=5, temperature=0,
                                           logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in parts) == r.choices[2].text
    assert sum(len(p.choices[0].logprobs.tokens) for p in parts) == 5
    ids = client.completions.create(model=MODEL, prompt=[5, 17, 42], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


# --------------------------------------------------------------- bad input
BAD = [
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "top_logprobs": 50, "logprobs": True}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "presence_penalty": 1}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": HI}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 250}, 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 300}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 999]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["", "a"]}, 400, "stop"),
]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_input_is_an_openai_error(live, path, body, status, param):
    r = post(live, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert err["message"] and err["type"] == "invalid_request_error"


def test_malformed_body_unknown_route_and_still_serving(live):
    r = post(live, "/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = post(live, "/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = post(live, "/v1/nothing", {})
    assert r.status_code == 404 and "error" in r.json()
    context = post(live, "/v1/completions", {"model": MODEL, "prompt": "word " * 300}).json()["error"]
    assert context["code"] == "context_length_exceeded" and "256" in context["message"]
    ok = live.client().chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):  # the client raises its own typed error for our JSON
        live.client().chat.completions.create(model="nope", messages=HI)


def test_chat_page_at_root_and_api_paths_stay_api_errors(live):
    index = httpx.get(live.url + "/")
    assert index.status_code == 200 and "<title>nanoseek chat</title>" in index.text
    assert "v1/chat/completions" in httpx.get(live.url + "/chat.js").text
    assert httpx.get(live.url + "/chat.css").headers["content-type"].startswith("text/css")
    for method, path, status in [("POST", "/v1/nothing", 404), ("GET", "/v1/nothing", 404),
                                 ("GET", "/v1/chat/completions", 405), ("POST", "/index.html", 405)]:
        r = httpx.request(method, live.url + path)
        assert r.status_code == status and r.json()["error"]["message"], (method, path, r.text)


def test_oversized_body_is_413(strict):
    r = post(strict, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]},
             headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunked():  # no Content-Length: cut off as it streams in
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}]}'
    r = httpx.post(strict.url + "/v1/chat/completions", content=chunked(),
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 413


def test_api_keys(strict):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = post(strict, "/v1/models", headers=headers)
        r = httpx.get(strict.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        strict.client("wrong").models.list()
    assert strict.client(KEY).models.list().data[0].id == MODEL
    assert httpx.get(strict.url + "/health").status_code == 200  # probes need no key


def _open_stream(client, url, max_tokens=200):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    return client.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})


def test_full_queue_is_429_and_hangups_free_every_block(strict):
    engine = strict.engine
    free0 = engine.block_manager.num_free
    with Gate(engine), httpx.Client(timeout=60) as ca, httpx.Client(timeout=60) as cb:
        with _open_stream(ca, strict.url) as a, _open_stream(cb, strict.url) as b:
            assert a.status_code == 200 and b.status_code == 200  # one running, one waiting
            r = httpx.post(strict.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                           headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            assert int(r.headers["Retry-After"]) >= 1
            wait_for(lambda: engine.block_manager.num_free < free0, "the first request to get its blocks")
        # both clients hung up mid-stream, while the engine was held
        assert engine.requests
    wait_for(lambda: not engine.requests and strict.app.state.admission.in_flight == 0, "the aborts")
    assert engine.block_manager.num_free == free0
    engine.block_manager.check()
    r = strict.client(KEY).completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_disconnect_mid_stream_frees_blocks(live):
    engine = live.engine
    free0 = engine.block_manager.num_free
    with Gate(engine) as gate, httpx.Client(timeout=60) as c:
        gate.allow(4)
        with c.stream("POST", live.url + "/v1/chat/completions",
                      json={"model": MODEL, "messages": HI, "max_tokens": 200, "stream": True, "ignore_eos": True,
                            "n": 3}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert all(g.startswith("data: ") or g == "" for g in got)
            assert engine.block_manager.num_free < free0
        assert len(engine.requests) == 3  # still generating when the client left
    wait_for(lambda: not engine.requests and live.app.state.admission.in_flight == 0, "the aborts")
    assert engine.block_manager.num_free == free0
    engine.block_manager.check()


def test_metrics_count_requests_tokens_and_cache_hits(live):
    class FakeCache:  # the seam the response caches plug into
        def __init__(self):
            self.store_ = {}

        def lookup(self, key):
            hit = self.store_.get(json.dumps(key, sort_keys=True))
            return None if hit is None else {**hit, "_cache": "l2"}

        def store(self, key, response):
            self.store_[json.dumps(key, sort_keys=True)] = response

    before = live.metrics()
    live.app.state.response_cache = cache = FakeCache()
    try:
        client = live.client()
        kw = dict(model=MODEL, messages=HI, max_tokens=6, temperature=0)
        a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
        streamed = list(client.chat.completions.create(**kw, stream=True))
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0.8)  # not cacheable
    finally:
        live.app.state.response_cache = None
    assert len(cache.store_) == 1 and a.choices[0].message.content == b.choices[0].message.content and a.id != b.id
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == a.choices[0].message.content
    m = live.metrics()
    delta = lambda name, **labels: m.get((name, tuple(sorted(labels.items()))), 0) - before.get(  # noqa: E731
        (name, tuple(sorted(labels.items()))), 0)
    assert delta("nanoseek_response_cache_hits_total", level="l2") == 2
    assert delta("nanoseek_response_cache_misses_total") == 1
    assert delta("nanoseek_requests_total", endpoint="/v1/chat/completions", status="200") == 4
    assert delta("nanoseek_generation_tokens_total") >= 7
    assert delta("nanoseek_time_to_first_token_seconds_count") == 2
    assert delta("nanoseek_e2e_request_latency_seconds_count") == 2
    assert m[("nanoseek_kv_cache_blocks_used", ())] == 0 and m[("nanoseek_kv_cache_blocks_total", ())] > 0
    assert m[("nanoseek_kv_cache_bytes", (("kind", "latent"),))] > 0  # bytes per cache kind
    assert m[("nanoseek_kv_cache_bytes_used", (("kind", "latent"),))] == 0
    for name in ("nanoseek_num_requests_waiting", "nanoseek_kv_cache_usage_ratio", "nanoseek_prefix_cache_hits_total",
                 "nanoseek_requests_in_flight", "nanoseek_time_per_output_token_seconds_count"):
        assert any(k[0] == name for k in m), name


def test_response_cache_exact_and_semantic_through_the_server(live):
    """The real caches behind the seam: an identical request hits L1, a paraphrase of the
    question hits L2, an unrelated question and a sampled request reach the engine."""
    from nanoseek.serve.cache import ResponseCache

    before = live.metrics()
    live.app.state.response_cache = ResponseCache.from_url("memory", semantic=True)
    try:
        client = live.client()

        def ask(q, **kw):
            return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                                  max_tokens=6, **{"temperature": 0, **kw})
        first = ask("What is the capital of France?")
        again = ask("What is the capital of France?")
        para = ask("Which city is France's capital?")
        other = ask("How do I sort a list in Python?")
        ask("What is the capital of France?", temperature=0.9)  # sampled without a seed: never cached
    finally:
        live.app.state.response_cache = None
    assert again.choices[0].message.content == para.choices[0].message.content == first.choices[0].message.content
    m = live.metrics()
    delta = lambda name, **labels: m.get((name, tuple(sorted(labels.items()))), 0) - before.get(  # noqa: E731
        (name, tuple(sorted(labels.items()))), 0)
    assert delta("nanoseek_response_cache_hits_total", level="l1") == 1
    assert delta("nanoseek_response_cache_hits_total", level="l2") == 1
    assert delta("nanoseek_response_cache_misses_total") == 2  # the first question, the unrelated one
    assert other.id != first.id


def test_serve_cache_option_builds_the_cache():
    from nanoseek.cli.serve import build_cache

    assert build_cache("off", False, 0.9, 0, 100) is None
    cache = build_cache("memory", False, 0.9, 60, 100)
    assert cache.stats()["backend"] == "memory" and not cache.stats()["semantic"]
    with pytest.raises(ValueError, match="ftp://x"):
        build_cache("ftp://x", False, 0.9, 0, 100)


# --------------------------------------------------------------- the CLI
def nanoseek(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "nanoseek", *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def test_chat_cli_with_piped_stdin(ckpt):
    from typer.testing import CliRunner

    from nanoseek.cli import app
    r = CliRunner().invoke(app, ["chat", str(ckpt), "--temperature", "0", "--max-tokens", "4"],
                           input="Hello\n/system Be brief.\nHi again\n/reset\n/nope\n/exit\nnever read\n")
    assert r.exit_code == 0, r.output
    out, err = r.stdout, r.stderr
    assert "system prompt set" in err and "history cleared" in err and "unknown command /nope" in err
    from nanoseek.engine import LLM, SamplingParams
    from nanoseek.serve.conversation import Conversation
    llm = LLM(ckpt, speculative=False)
    greedy = SamplingParams(temperature=0, max_tokens=4)
    answer = lambda convo, q: llm.generate([llm.tokenizer.encode(convo.prompt(q), add_special_tokens=False)],  # noqa: E731
                                           greedy, use_tqdm=False)[0].outputs[0].text
    first, second = answer(Conversation(), "Hello"), answer(Conversation(system="Be brief."), "Hi again")
    assert out == f"{first}\n{second}\n"  # the /system command cleared the first exchange


def test_conversation_history_and_commands():
    from nanoseek.serve.conversation import Conversation
    c = Conversation(system="S")
    c.record("q1", "a1")
    assert "q1" in c.prompt("q2") and c.prompt("q2").endswith("q2<｜Assistant｜>") and c.prompt("q2").count("S") >= 1
    assert c.command("/reset") and c.turns == [] and c.system == "S"
    c.record("q1", "a1")
    c.command("/system ")
    assert c.system is None and c.turns == [] and c.command("hello") is None and c.command("/exit") == "exit"


def test_serve_cli_finishes_in_flight_requests_on_sigterm(ckpt):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    p = nanoseek("serve", str(ckpt), "--port", str(port), "--kv-cache-memory", "4MiB", "--log-level", "warning",
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                assert p.poll() is None, p.stderr.read().decode()
                return False
        wait_for(up, "nanoseek serve to start", tries=6000)
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", url + "/v1/completions", json={"model": ckpt.name, "prompt": "Hi", "max_tokens": 60,
                                                                "temperature": 0, "stream": True, "ignore_eos": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                p.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        finish = json.loads(rest[-2][6:])["choices"][0]["finish_reason"]
        assert finish == "length"  # finished within the graceful timeout, not cut
        assert p.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        if p.poll() is None:
            p.kill()
