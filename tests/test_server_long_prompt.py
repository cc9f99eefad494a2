"""A prompt the server's V3.2 or V4 engine cannot hold (longer than the model's context, or
than the whole KV cache) gets one 400 naming the numbers, while a request already running
finishes untouched. Live uvicorn as in test_server.py, token-id prompts (the checkpoints have
no tokenizer)."""

from __future__ import annotations

import threading

import httpx2 as httpx
import pytest
import torch

from nanoseek.config import preset
from nanoseek.model import CausalLM
from tests.test_engine_v4_memory import budget_for
from tests.test_server import Gate, Live, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")
CONTEXT = 128   # max_position_embeddings of both checkpoints
CAPACITY = 64   # tokens the small cache holds
PRESETS = {"v32": "tiny-v32", "v4": "tiny-v4"}


@pytest.fixture(scope="module", params=sorted(PRESETS))
def ckpt(request, tmp_path_factory):
    cfg = preset(PRESETS[request.param], max_position_embeddings=CONTEXT, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(request.param)
    CausalLM(cfg).save_pretrained(d)
    return d, cfg


def serve(path, kv_cache_memory) -> Live:
    from nanoseek.engine import AsyncLLM
    from nanoseek.serve.app import create_app
    llm = AsyncLLM(path, kv_cache_memory=kv_cache_memory, speculative=False, max_num_seqs=4)
    return Live(create_app(llm, "m"))


def complete(live, prompt: list[int], max_tokens: int = 4) -> httpx.Response:
    return httpx.post(live.url + "/v1/completions", timeout=60,
                      json={"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "ignore_eos": True})


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_past_the_context_is_a_400_while_a_running_request_finishes(ckpt):
    path, cfg = ckpt
    live = serve(path, "8MiB")
    try:
        engine = live.engine
        assert engine.max_model_len == CONTEXT
        done = {}
        with Gate(engine):  # the running request gets one step until the refusals are answered
            worker = threading.Thread(target=lambda: done.setdefault("r", complete(live, ids(30, 1))))
            worker.start()
            wait_for(lambda: engine.requests and engine.block_manager.num_used > 0, "the request to run")
            used = live.metrics()
            for prompt, max_tokens in ((ids(200, 2), 4), (ids(126, 3), 4)):  # too long; too long with its output
                r = complete(live, prompt, max_tokens)
                err = r.json()["error"]
                assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
                assert f"at most {CONTEXT} tokens a request" in err["message"]
                assert f"prompt has {len(prompt)} and {max_tokens} tokens" in err["message"]
                assert f"({len(prompt) + max_tokens} in all)" in err["message"]
            assert worker.is_alive() and len(engine.requests) == 1  # still held at the gate
        worker.join(60)
        r = done["r"].json()
        assert done["r"].status_code == 200 and r["choices"][0]["finish_reason"] == "length", r
        assert r["usage"]["completion_tokens"] == 4
        kinds = {"v4": {"window", "compressed", "indexer", "compressor_state"}, "v32": {"latent", "indexer"}}
        held = {dict(labels)["kind"]: v for (name, labels), v in used.items() if name == "nanoseek_kv_cache_bytes_used"}
        assert set(held) == kinds["v4" if cfg.is_v4 else "v32"] and held["indexer"] > 0
        assert engine.block_manager.num_used == 0
    finally:
        live.stop()


def test_past_the_cache_is_a_400_naming_its_capacity(ckpt):
    """A cache smaller than the context: /v1/models and the refusal name what it holds."""
    path, cfg = ckpt
    live = serve(path, budget_for(cfg, CAPACITY, max_num_seqs=4))
    try:
        assert live.engine.max_model_len == CAPACITY < CONTEXT
        models = httpx.get(live.url + "/v1/models").json()
        assert models["data"][0]["max_model_len"] == CAPACITY
        r = complete(live, ids(100, 4))
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert f"at most {CAPACITY} tokens a request" in r.json()["error"]["message"]
        ok = complete(live, ids(CAPACITY - 4, 5))  # exactly what the cache holds, output included
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4, ok.text
    finally:
        live.stop()
