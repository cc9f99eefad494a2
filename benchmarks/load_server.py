"""The server under load, against `LLM.generate` on the same workload, in one run.

N (default 200) streaming clients hit `nanoseek serve` (a subprocess on 127.0.0.1) at once
on /v1/completions; 20 % of them hang up after a few chunks. Each request has a prompt of
16-64 characters of `pydoc_data.topics` and a fixed output length (16-64 tokens, ignore_eos,
greedy), so both sides emit the same tokens. Measured:

  * time to first token (send -> first chunk with text) and time per output token after the
    first ((last - first) / (tokens - 1), from the chunks' continuous usage counts),
    p50 and p99 over the clients that stayed;
  * output tokens/s received by all clients over the run's wall time;
  * errors (a non-200, a broken stream, a stream without [DONE]): the goal is 0;
  * KV blocks still held after every request ended (the server's /metrics): the goal is 0;
  * the same workload through `LLM.generate` in this process (same engine settings, same
    thread count): ratio = server tok/s / LLM.generate tok/s, the goal >= 0.9.

Without --checkpoint the script writes a small random-weight MLA+MoE checkpoint with a
byte-level BPE tokenizer (the speed does not depend on the weights being trained).

    python benchmarks/load_server.py [--clients 200] [--checkpoint DIR] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit, json_only_stdout, log  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(out: Path) -> None:
    import torch

    from nanoseek.checkpoint.hf import save_pretrained
    from nanoseek.config import preset
    from nanoseek.data import load_corpus
    from nanoseek.model import CausalLM
    from nanoseek.text.tokenizer import save_tokenizer, train_tokenizer
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                 num_hidden_layers=3, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=16,
                 qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_group=2, topk_group=1,
                 num_nextn_predict_layers=0, max_position_embeddings=512)
    save_pretrained(CausalLM(cfg), out)
    save_tokenizer(train_tokenizer(load_corpus()[:200], 512), out)


def workload(n: int, seed: int) -> list[tuple[str, int]]:
    from pydoc_data.topics import topics
    text = " ".join(topics[k] for k in sorted(topics))
    rng = random.Random(seed)
    load = []
    for _ in range(n):
        start, length = rng.randrange(len(text) - 100), rng.randint(16, 64)
        load.append((text[start:start + length], rng.randint(16, 64)))
    return load


def baseline(ckpt: Path, load, engine_kw: dict) -> float:
    """Output tokens/s of LLM.generate on the whole workload (after a warm-up)."""
    from nanoseek.engine import LLM, SamplingParams
    llm = LLM(ckpt, **engine_kw)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in load]
    llm.generate([p for p, _ in load[:8]], params[:8], use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in load], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


# ------------------------------------------------------------------- clients
async def one_client(client, url: str, model: str, prompt: str, max_tokens: int, hang_after: int | None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    rec = {"sent": time.perf_counter(), "first": None, "last": None, "tokens": 0, "error": None, "hung_up": False}
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return rec
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec["error"] = chunk["error"]["message"]
                    return rec
                if chunk.get("usage"):
                    rec["tokens"] = chunk["usage"]["completion_tokens"]
                now = time.perf_counter()
                if rec["first"] is None and rec["tokens"] > 0:
                    rec["first"] = now
                rec["last"] = now
                chunks += 1
                if hang_after is not None and chunks >= hang_after:
                    rec["hung_up"] = True
                    return rec  # leaving the block closes the connection mid-stream
            if not done:
                rec["error"] = "the stream ended without [DONE]"
    except Exception as e:  # noqa: BLE001 - counted, reported
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


async def run_clients(url: str, model: str, load, hang_share: float, seed: int, timeout_s: float) -> tuple[list, float]:
    import httpx2 as httpx
    rng = random.Random(seed + 1)
    hang = [rng.randint(1, 4) if rng.random() < hang_share else None for _ in load]
    limits = httpx.Limits(max_connections=len(load) + 8, max_keepalive_connections=len(load) + 8)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        recs = await asyncio.wait_for(asyncio.gather(
            *(one_client(client, url, model, p, m, h) for (p, m), h in zip(load, hang))), timeout_s)
        return recs, time.perf_counter() - t0


# -------------------------------------------------------------------- server
def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(ckpt: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanoseek", "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
           "--model-name", "bench", "--max-queue", str(args.clients * 2), "--max-num-seqs", str(args.max_num_seqs),
           "--kv-cache-memory", args.kv_cache_memory, "--threads", str(args.threads), "--log-level", "warning"]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                            stdout=subprocess.DEVNULL, stderr=sys.stderr)


def scrape(url: str) -> dict:
    import httpx2 as httpx
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(url + "/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def wait_up(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    import httpx2 as httpx
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"nanoseek serve exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("nanoseek serve did not start")


def leaked_blocks(url: str, seconds: float = 30) -> int:
    """KV blocks still held once every request has ended (aborts land between steps)."""
    end = time.monotonic() + seconds
    while True:
        m = scrape(url)
        if (m["nanoseek_kv_cache_blocks_used"] == 0 and m["nanoseek_requests_in_flight"] == 0) or time.monotonic() > end:
            return int(m["nanoseek_kv_cache_blocks_used"])
        time.sleep(0.1)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarise(recs: list[dict], wall: float, base_tok_s: float, leaked: int) -> dict:
    stayed = [r for r in recs if not r["hung_up"] and r["error"] is None]
    ttft = [(r["first"] - r["sent"]) * 1e3 for r in stayed if r["first"] is not None]
    tpot = [(r["last"] - r["first"]) * 1e3 / (r["tokens"] - 1) for r in stayed if r["tokens"] > 1]
    tok_s = sum(r["tokens"] for r in recs) / wall
    errors = [r["error"] for r in recs if r["error"] is not None]
    for e in errors[:5]:
        log(f"error: {e}")
    return {"ratio": tok_s / base_tok_s, "errors": len(errors), "blocks_leaked": leaked,
            "p99_ttft_ms": pct(ttft, 99), "tok_s": tok_s, "p50_ttft_ms": pct(ttft, 50),
            "p50_tpot_ms": pct(tpot, 50), "p99_tpot_ms": pct(tpot, 99), "baseline_tok_s": base_tok_s,
            "clients": len(recs), "hung_up": sum(r["hung_up"] for r in recs), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200, help="concurrent streaming clients")
    ap.add_argument("--hang-up", type=float, default=0.2, help="share of clients that hang up mid-stream")
    ap.add_argument("--checkpoint", help="checkpoint directory (default: a small random-weight one)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--kv-cache-memory", default="256MiB")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, for the server and the baseline alike")
    ap.add_argument("--timeout", type=float, default=600, help="seconds the clients may take in all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout, nothing else")
    args = ap.parse_args()
    out = json_only_stdout(args.json)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "ckpt"
        if not args.checkpoint:
            make_checkpoint(ckpt)
        load = workload(args.clients, args.seed)
        import torch
        torch.set_num_threads(args.threads)
        base = baseline(ckpt, load, dict(max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory))
        log(f"LLM.generate: {base:.0f} output tok/s")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(ckpt, port, args)
        try:
            wait_up(url, proc)
            asyncio.run(run_clients(url, "bench", load[:8], 0.0, args.seed, args.timeout))  # warm-up
            recs, wall = asyncio.run(run_clients(url, "bench", load, args.hang_up, args.seed, args.timeout))
            leaked = leaked_blocks(url)
        finally:
            proc.terminate()
            proc.wait(60)
    results = summarise(recs, wall, base, leaked)
    log(f"server: {results['tok_s']:.0f} tok/s, TTFT p50 {results['p50_ttft_ms']:.0f} ms, "
        f"TPOT p50 {results['p50_tpot_ms']:.1f} ms, {results['hung_up']} hung up")
    emit(results, args.json, out, settings=vars(args))


if __name__ == "__main__":
    main()
