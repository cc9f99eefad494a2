"""One 64k-token prompt to `tiny-v4` through `nanoseek serve`: the server's peak memory, the
time to first token, and the KV-cache bytes per kind its /metrics reports.

The goal (issue 27): a 64k-token prompt on tiny-v4 serves without running out of memory on a
24 GiB machine, and /metrics reports the bytes per cache kind. The script writes a tiny-v4
checkpoint with **random weights** (seed 0; no tokenizer: the prompt goes as token ids) whose
max_position_embeddings is --context + 1024, starts `nanoseek serve` on 127.0.0.1 as a
subprocess (stopped by its PID at the end), sends one streaming /v1/completions request of
--context random token ids with --max-tokens to generate (greedy, ignore_eos), and while it
runs scrapes /metrics every --poll seconds and reads the server's resident set (psutil).

Reported:
  * peak_rss_gib: the server process's peak RSS over its life (Linux's VmHWM, read just
    before it is stopped); idle_rss_gib: its RSS once up, before the request (the weights
    and the KV pools, which torch.zeros has written); after_rss_gib: once the request is
    done; the polled maximum is polled_rss_gib;
  * ttft_s: send -> first streamed chunk (the prefill of the whole prompt), and
    server_ttft_s, the server's own nanoseek_time_to_first_token_seconds; prefill_tok_s =
    context / ttft_s; decode_ms_per_token after the first token;
  * per cache kind (window, compressed, indexer, compressor_state), the bytes allocated
    (nanoseek_kv_cache_bytes) and held (nanoseek_kv_cache_bytes_used) at the scrape where
    the held bytes peaked, beside `nanoseek calc kv`'s figure for one sequence of --context
    tokens in fp32 (the entries and indexer keys held are those of every block the request
    holds, so at most a block of tokens above calc's; the window is held in whole blocks).

The engine runs as `nanoseek serve` does by default (64 sequences, 512 tokens a step, the KV
budget 5 % of the free memory) unless --max-num-seqs / --kv-cache-memory say otherwise;
--threads torch threads (1 by default: the machine may be shared; see bench_long_context.py).
Run time on a 2-core CPU is the prefill's, which grows about as L^2 (each 512-token chunk's
CSA and HCA attend over every earlier compressed entry): see docs/long-context.md.

    python benchmarks/bench_serve_long_context.py [--context 65536] [--max-tokens 4] [--threads 1]
        [--kv-cache-memory BYTES] [--max-num-seqs N] [--poll 0.5] [--timeout 1800] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit, json_only_stdout, log  # noqa: E402
from load_server import free_port, wait_up  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-v4-long"
GIB, MIB = 2 ** 30, 2 ** 20


def make_checkpoint(out: Path, context: int):
    """tiny-v4 with random weights (seed 0) and room for `context` tokens and more."""
    import torch

    from nanoseek.config import preset
    from nanoseek.model import CausalLM
    torch.manual_seed(0)
    cfg = preset("tiny-v4", max_position_embeddings=context + 1024)
    CausalLM(cfg).save_pretrained(out)
    return cfg


def start_server(ckpt: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanoseek", "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
           "--model-name", MODEL, "--threads", str(args.threads), "--log-level", "warning", "--cache", "off"]
    if args.kv_cache_memory:
        cmd += ["--kv-cache-memory", args.kv_cache_memory]
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                            stdout=subprocess.DEVNULL, stderr=sys.stderr)


def scrape(url: str) -> dict:
    """/metrics as {(name, kind label or None): value}."""
    import httpx2 as httpx
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(url + "/metrics", timeout=120).text
    return {(s.name, s.labels.get("kind")): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def by_kind(metrics: dict, name: str) -> dict[str, int]:
    return {kind: int(v) for (n, kind), v in metrics.items() if n == name and kind is not None}


def vm_hwm(pid: int) -> int:
    """A process's peak resident set in bytes (Linux /proc/PID/status VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


def stream_one(url: str, prompt: list[int], max_tokens: int, timeout_s: float, rec: dict) -> None:
    """One streaming completion; fills rec with the send, first-chunk and last-chunk times,
    the tokens generated and the finish reason (or the error)."""
    import httpx2 as httpx
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    rec["sent"] = time.perf_counter()
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout_s) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {r.read().decode()[:500]}"
                return
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    rec["tokens"] = chunk["usage"]["completion_tokens"]
                if chunk["choices"]:
                    rec.setdefault("first", now)
                    rec["last"] = now
                    rec["finish"] = chunk["choices"][0]["finish_reason"] or rec.get("finish")
    except Exception as e:  # noqa: BLE001 - reported
        rec["error"] = f"{type(e).__name__}: {e}"


def calc_by_kind(cfg, L: int) -> dict[str, int]:
    """`nanoseek calc kv` (fp32) for one sequence of L tokens, in the engine's kinds."""
    from nanoseek.calc.kv import cache_terms, uniform_dtypes
    out = dict.fromkeys(("window", "compressed", "indexer", "compressor_state"), 0)
    for t in cache_terms(cfg, L, uniform_dtypes("fp32")):
        kind = ("window" if t.name == "sliding window" else "indexer" if t.name.startswith("CSA indexer keys")
                else "compressor_state" if "open window" in t.name else "compressed")
        out[kind] += t.bytes
    return out


def run(args) -> dict:
    import psutil
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        cfg = make_checkpoint(ckpt, args.context)
        prompt = torch.randint(3, cfg.vocab_size, (args.context,), generator=torch.Generator().manual_seed(1)).tolist()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(ckpt, port, args)
        try:
            wait_up(url, proc)
            server = psutil.Process(proc.pid)
            idle_rss = server.memory_info().rss
            log(f"server up (pid {proc.pid}), RSS {idle_rss / GIB:.2f} GiB; sending {args.context} tokens")
            rec: dict = {}
            client = threading.Thread(target=stream_one, args=(url, prompt, args.max_tokens, args.timeout, rec))
            client.start()
            peak, polled_rss, next_log = None, idle_rss, time.monotonic() + 30
            while client.is_alive():
                client.join(args.poll)
                polled_rss = max(polled_rss, server.memory_info().rss)
                m = scrape(url)
                held = by_kind(m, "nanoseek_kv_cache_bytes_used")
                if peak is None or sum(held.values()) > sum(by_kind(peak, "nanoseek_kv_cache_bytes_used").values()):
                    peak = m
                if time.monotonic() > next_log:
                    log(f"  {time.perf_counter() - rec['sent']:.0f} s: RSS {polled_rss / GIB:.2f} GiB, "
                        f"held {sum(held.values()) / MIB:.1f} MiB")
                    next_log += 30
            if "error" in rec or "first" not in rec:
                raise SystemExit(f"the request failed: {rec.get('error', 'no token streamed')}")
            final = scrape(url)
            peak_rss, after_rss = vm_hwm(proc.pid), server.memory_info().rss
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
    ttft = rec["first"] - rec["sent"]
    tokens = rec.get("tokens", 0)
    ttft_sum = final.get(("nanoseek_time_to_first_token_seconds_sum", None))
    results = {"context": args.context, "max_tokens": args.max_tokens, "completion_tokens": tokens,
               "finish_reason": rec.get("finish"), "ttft_s": ttft, "server_ttft_s": ttft_sum,
               "prefill_tok_s": args.context / ttft,
               "decode_ms_per_token": 1e3 * (rec["last"] - rec["first"]) / (tokens - 1) if tokens > 1 else None,
               "peak_rss_gib": peak_rss / GIB, "idle_rss_gib": idle_rss / GIB, "after_rss_gib": after_rss / GIB,
               "polled_rss_gib": polled_rss / GIB,
               "threads": args.threads}
    alloc, held, calc = (by_kind(peak, "nanoseek_kv_cache_bytes"), by_kind(peak, "nanoseek_kv_cache_bytes_used"),
                         calc_by_kind(cfg, args.context))
    log(f"{'kind':18}{'allocated MiB':>15}{'held MiB (peak)':>17}{'calc kv MiB':>13}")
    for kind in alloc:
        log(f"{kind:18}{alloc[kind] / MIB:15.2f}{held.get(kind, 0) / MIB:17.3f}{calc[kind] / MIB:13.3f}")
        results[f"kv_alloc_{kind}_mib"] = alloc[kind] / MIB
        results[f"kv_held_{kind}_mib"] = held.get(kind, 0) / MIB
        results[f"calc_{kind}_mib"] = calc[kind] / MIB
    results["kv_held_total_mib"] = sum(held.values()) / MIB
    results["kv_held_after_mib"] = sum(by_kind(final, "nanoseek_kv_cache_bytes_used").values()) / MIB
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=65536, help="prompt tokens")
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens to generate")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--kv-cache-memory", default=None, help="the server's KV budget (default: nanoseek serve's)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="the server's (default: nanoseek serve's)")
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between /metrics scrapes")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds the request may take")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout, nothing else")
    args = ap.parse_args()
    out = json_only_stdout(args.json)
    t0 = time.perf_counter()
    results = run(args)
    results["wall_s"] = time.perf_counter() - t0
    emit(results, args.json, out, settings=vars(args))


if __name__ == "__main__":
    main()
