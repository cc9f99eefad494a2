"""Serving commands: `nanoseek serve DIR` (the OpenAI-compatible HTTP server) and
`nanoseek chat DIR` (the same conversation, in the terminal).

`serve` runs nanoseek/serve/app.py under uvicorn, which handles SIGINT/SIGTERM: it stops
accepting connections, lets in-flight requests finish for up to --shutdown-timeout
seconds, then cancels the rest (their engine requests are aborted and their blocks freed).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from nanoseek.cli.common import check_device, check_utf8, dtype_option, quantization_option
from nanoseek.cli.engine import (block_size_option, device_option, engine_kw, kv_cache_memory_option,
                                 max_model_len_option, max_num_seqs_option, speculative_option, threads_option,
                                 weight_layout_option)


def build_cache(url: str, semantic: bool, threshold: float, ttl: float, size: int, timeout: float = 0.5):
    """The response caches (L1 where `url` says, L2 when `semantic`, its model loaded now so
    the first request does not wait for it), or None for "off". L3 is the engine's prefix
    cache (--enable-prefix-caching, on by default). `timeout`: seconds a SQLite/Redis call may take before it is a miss."""
    if url == "off":
        if semantic:
            raise ValueError("--semantic-cache needs an L1 cache: drop --cache off")
        return None
    from nanoseek.serve.cache import ResponseCache
    cache = ResponseCache.from_url(url, semantic=semantic, threshold=threshold, ttl=ttl or None,
                                   max_entries=size, timeout=timeout)
    cache.warm()
    return cache


def serve(
    path: str = typer.Argument(..., help="checkpoint directory (config.json + safetensors + tokenizer.json)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port"),
    model_name: Optional[str] = typer.Option(None, "--served-model-name", "--model-name",
                                             help="the model id /v1/models reports and requests must name "
                                                  "(vLLM's --served-model-name) [default: the directory's name]"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="NANOSEEK_API_KEY",
                                          help="require 'Authorization: Bearer KEY' on /v1 (comma-separated for "
                                               "several keys; also NANOSEEK_API_KEY)"),
    max_queue: int = typer.Option(256, min=0, help="completions that may wait beyond --max-num-seqs; "
                                                   "one more gets 429 with Retry-After"),
    max_body_bytes: int = typer.Option(4 << 20, min=1, help="largest request body; larger ones get 413"),
    max_prompt_chars: Optional[int] = typer.Option(None, min=1, help="longest prompt in characters, checked "
                                                   "before tokenising (400) [default: the context length times "
                                                   "the longest token, the most that can fit]"),
    max_image_bytes: int = typer.Option(2 << 20, min=1, help="encoded bytes of one chat image (a data: URL "
                                        "carries it as base64, 4/3 larger, inside --max-body-bytes); "
                                        "larger ones get 400"),
    max_images_per_request: int = typer.Option(4, min=1, help="image parts one chat request may hold"),
    max_image_pixels: int = typer.Option(4096 * 4096, min=1, help="width x height of one image, read "
                                         "from its header before it is decoded"),
    image_dir: Optional[Path] = typer.Option(None, exists=True, file_okay=False, resolve_path=True,
                                             help="the only directory file:// image URLs may read "
                                                  "[default: none, file URLs are refused; network "
                                                  "URLs are never fetched]"),
    shutdown_timeout: float = typer.Option(10.0, min=0, help="seconds in-flight requests get to finish on "
                                                             "SIGTERM/SIGINT before they are cancelled"),
    max_num_seqs: int = max_num_seqs_option(),
    max_num_batched_tokens: Optional[int] = typer.Option(None, min=1, help="tokens one engine step runs at most "
                                                         "(decodes + prefill chunks) [default: 512, or "
                                                         "--max-num-seqs when larger]"),
    max_model_len: Optional[int] = max_model_len_option(),
    kv_cache_memory: Optional[str] = kv_cache_memory_option(),
    block_size: int = block_size_option(),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching",
                                               help="reuse the latent cache of a prompt prefix seen before "
                                                    "(the L3 cache)"),
    speculative: Optional[bool] = speculative_option(),
    device: str = device_option(),
    dtype: str = dtype_option(),
    quantization: Optional[str] = quantization_option(),
    threads: Optional[int] = threads_option(),
    weight_layout: str = weight_layout_option(),
    log_level: str = typer.Option("info", help="uvicorn's log level (warning: no access log)"),
    uvicorn_log_level: Optional[str] = typer.Option(None, hidden=True, help="vLLM's name for --log-level"),
    cache: str = typer.Option("memory", help="L1 exact-match response cache for deterministic requests "
                                             "(temperature 0 or a seed): memory | sqlite:///FILE.db | "
                                             "redis://HOST:PORT/DB | off"),
    semantic_cache: bool = typer.Option(False, "--semantic-cache/--no-semantic-cache",
                                        help="L2: also answer paraphrases (MiniLM embeddings + FAISS)"),
    cache_threshold: float = typer.Option(0.9, min=0.0, max=1.0, help="L2's cosine similarity for a hit"),
    cache_ttl: float = typer.Option(3600.0, min=0.0, help="seconds a cached response lives (0: no expiry)"),
    cache_size: int = typer.Option(10000, min=1, help="cached responses kept at most (oldest go first)"),
    cache_scope: str = typer.Option("key", help="whose cached answers a request may get: key (only those "
                                                "of its own API key) | shared (every caller's); without "
                                                "--api-key there is one scope"),
    cache_timeout: float = typer.Option(0.5, min=0.001, help="seconds a SQLite/Redis cache call may take; "
                                                             "past it (or on any cache failure) the "
                                                             "request is served without the cache"),
):
    """Serve a checkpoint with an OpenAI-compatible API: /v1/chat/completions, /v1/completions
    (SSE streaming), /v1/models, /health, /metrics."""
    import torch
    import uvicorn

    from nanoseek.engine import AsyncLLM
    from nanoseek.serve.app import create_app
    from nanoseek.serve.cache.urls import redact
    from nanoseek.text.images import ImageLimits
    check_device(device)
    image_limits = ImageLimits(max_images=max_images_per_request, max_bytes=max_image_bytes,
                               max_pixels=max_image_pixels)
    log_level = uvicorn_log_level or log_level
    if threads:
        torch.set_num_threads(threads)
    llm = AsyncLLM(path, device=device, dtype=dtype, quantization=quantization,
                   enable_prefix_caching=enable_prefix_caching,
                   **engine_kw(kv_cache_memory, block_size, max_num_seqs, max_model_len, speculative,
                               max_num_batched_tokens, weight_layout))
    keys = [k.strip() for k in (api_key or "").split(",") if k.strip()]
    response_cache = build_cache(cache, semantic_cache, cache_threshold, cache_ttl, cache_size, cache_timeout)
    app = create_app(llm, model_name or Path(path).resolve().name, api_keys=keys, max_queue=max_queue,
                     max_body_bytes=max_body_bytes, max_prompt_chars=max_prompt_chars,
                     response_cache=response_cache, cache_scope=cache_scope, checkpoint=path,
                     image_limits=image_limits, image_dir=image_dir)
    typer.echo(f"serving {path} as {app.state.model_name!r} on http://{host}:{port}/v1"
               + (" (API key required)" if keys else "")
               + (f"; response cache: {redact(cache)}" + (" + semantic" if semantic_cache else "")
                  + f", scope: {cache_scope if keys else 'shared (no API keys)'}"
                  if response_cache is not None else "; no response cache"), err=True)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=shutdown_timeout)).run()


def chat(
    path: str = typer.Argument(..., help="checkpoint directory (config.json + safetensors + tokenizer.json)"),
    system: Optional[str] = typer.Option(None, help="system prompt"),
    max_tokens: int = typer.Option(512, min=1, help="tokens per answer at most"),
    temperature: float = typer.Option(0.7, min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(0.95, help="nucleus sampling mass"),
    seed: Optional[int] = typer.Option(None, help="seed of the first answer (answer k uses seed + k)"),
    device: str = device_option(),
    dtype: str = dtype_option(),
    quantization: Optional[str] = quantization_option(),
    threads: Optional[int] = threads_option(),
):
    """Talk to a checkpoint in the terminal, answers streaming, history kept.

    Commands: /reset, /system TEXT, /exit. Reads piped stdin too (one message a line)."""
    import torch

    from nanoseek.engine import LLM, SamplingParams
    from nanoseek.serve.conversation import HELP, Conversation
    check_device(device)
    if threads:
        torch.set_num_threads(threads)
    engine = LLM(path, device=device, dtype=dtype, quantization=quantization).engine
    if engine.tokenizer is None:
        raise ValueError(f"{path}: no tokenizer.json; chat needs one (train one with `nanoseek tokenizer train`)")
    convo, tty = Conversation(system=system), sys.stdin.isatty()
    if tty:
        typer.echo(HELP, err=True)
    for k, line in enumerate(_lines(tty)):
        said = convo.command(line)
        if said == "exit":
            break
        if said is not None:
            typer.echo(said, err=True)
            continue
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                seed=None if seed is None else seed + k)
        convo.record(line, _answer(engine, convo, line, params))


def _lines(tty: bool):
    """Non-empty input lines, UTF-8 checked; a prompt marker only for a person at a terminal."""
    while True:
        if tty:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return
        line = check_utf8(line.rstrip("\n"), "input").strip()
        if line:
            yield line


def _answer(engine, convo, line: str, params) -> str:
    """Stream one answer to stdout; forget the oldest exchanges if the history outgrew the context."""
    from nanoseek.engine.outputs import stable_text
    limit = engine.max_model_len
    while True:
        ids = convo.prompt_ids(engine.tokenizer, line)
        if len(ids) + params.max_tokens <= limit or not convo.forget_oldest():
            break
        typer.echo("(the oldest exchange was dropped to fit the context)", err=True)
    seq = engine.add_request(ids, params)  # still too long alone: the engine's error names the limit
    shown = 0
    while engine.has_unfinished():
        engine.step()
        text = stable_text(seq)
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = max(shown, len(text))
    sys.stdout.write("\n")
    sys.stdout.flush()
    return seq.detokenizer.output_text(True)


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(chat)
