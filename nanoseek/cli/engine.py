"""Engine commands: `nanoseek generate DIR --prompt ...`.

One prompt streams its text to the terminal as it is produced; several prompts (repeated
-p, --prompts-file, stdin) run as one continuously batched load and print in input order,
each with its finish reason; --json prints one JSON object per completion instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from nanoseek.cli.common import check_device, check_utf8, dtype_option, quantization_option


def _ids(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise typer.BadParameter(f"{flag} {text!r}: expected integers separated by commas") from None


# ------------------------------------------------ options generate, serve and chat share
def speculative_option():
    return typer.Option(None, "--speculative/--no-speculative",
                        help="MTP speculative decoding [default: on when the checkpoint has MTP layers]")


def kv_cache_memory_option():
    return typer.Option(None, "--kv-cache-memory", help="KV-cache budget: bytes (e.g. 512MiB, 2e9) or a fraction "
                                                        "of free memory [default: 0.9 on a GPU, 0.05 on CPU]")


def block_size_option():
    return typer.Option(16, "--block-size", min=1, help="tokens per cache block")


def max_num_seqs_option():
    return typer.Option(64, "--max-num-seqs", min=1, help="requests the engine runs together")


def max_model_len_option():
    return typer.Option(None, "--max-model-len", min=1, help="longest prompt + output [default: the model's context]")


def device_option():
    return typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda")


def threads_option():
    return typer.Option(None, "--threads", min=1, help="CPU threads for torch [default: torch's choice; 1 is "
                                                       "often fastest for tiny models or on a busy machine]")


WEIGHT_LAYOUTS = ("auto", "k-major", "as-loaded")  # engine/weight_layout.LAYOUTS (no torch import for --help)


def _weight_layout(value: str) -> str:
    if value not in WEIGHT_LAYOUTS:
        raise typer.BadParameter(f"{value!r}: expected one of {', '.join(WEIGHT_LAYOUTS)}")
    return value


def weight_layout_option():
    return typer.Option("auto", "--weight-layout", callback=_weight_layout,
                        help="linear weights on a CPU: auto (both layouts timed at start, k-major kept where "
                             "it is faster) | k-major | as-loaded (docs/engine.md)")


def engine_kw(kv_cache_memory, block_size: int, max_num_seqs: int, max_model_len, speculative,
              max_num_batched_tokens: int | None = None, weight_layout: str = "auto") -> dict:
    """EngineConfig's fields from the shared options; a step's token budget defaults to
    512, or max_num_seqs when larger (every running request decodes in one step)."""
    kw = dict(kv_cache_memory=kv_cache_memory, block_size=block_size, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens or max(512, max_num_seqs), speculative=speculative,
              weight_layout=weight_layout)
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    return kw


def generate(
    path: str = typer.Argument(..., help="checkpoint directory (config.json + safetensors [+ tokenizer.json])"),
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="prompt text; repeat for a batch"),
    prompt_ids: list[str] = typer.Option(None, "--prompt-ids",
                                         help="prompt as token ids '1,2,3' (checkpoints without a tokenizer); repeatable"),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file",
                                               help="prompts, one per line, or JSONL lines {\"prompt\": ...} / "
                                                    "{\"prompt_token_ids\": [...]}; '-' reads stdin"),
    chat: bool = typer.Option(False, "--chat", help="wrap each text prompt in DeepSeek-V3's chat format, as the "
                                                    "server does (a user turn, then the assistant's; the "
                                                    "prompt's text is never read as special tokens)"),
    n: int = typer.Option(1, "-n", "--n", min=1, help="completions per prompt (sample k uses seed + k)"),
    max_tokens: int = typer.Option(64, min=1, help="tokens to generate at most per prompt"),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, help="keep the k most likely tokens (0 = off)"),
    top_p: float = typer.Option(1.0, help="nucleus sampling mass"),
    min_p: float = typer.Option(0.0, help="drop tokens below min_p x the top probability"),
    seed: int = typer.Option(None, help="per-request seed (same seed, same text)"),
    stop: list[str] = typer.Option(None, "--stop", help="stop string; repeatable"),
    stop_token_ids: str = typer.Option("", help="comma-separated token ids that end a request"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="keep going past the end-of-sequence token"),
    logprobs: Optional[int] = typer.Option(None, "--logprobs", min=0,
                                           help="log-probabilities of each sampled token and of the K most likely"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per completion on stdout, nothing else"),
    speculative: Optional[bool] = speculative_option(),
    kv_cache_memory: Optional[str] = kv_cache_memory_option(),
    block_size: int = block_size_option(),
    max_num_seqs: int = max_num_seqs_option(),
    max_model_len: Optional[int] = max_model_len_option(),
    device: str = device_option(),
    dtype: str = dtype_option(),
    quantization: Optional[str] = quantization_option(),
    threads: Optional[int] = threads_option(),
    weight_layout: str = weight_layout_option(),
):
    """Generate from a checkpoint with the paged-latent-cache engine. One prompt streams its
    text as it is produced; several run as one continuously batched load and print in input
    order with their finish reasons."""
    import torch

    from nanoseek.engine import LLM, SamplingParams
    check_device(device)
    prompts = _gather_prompts(prompt, prompt_ids, prompts_file)
    if threads:
        torch.set_num_threads(threads)
    params = SamplingParams(n=n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                            max_tokens=max_tokens, stop=stop or None,
                            stop_token_ids=_ids(stop_token_ids, "--stop-token-ids"),
                            ignore_eos=ignore_eos, logprobs=logprobs)
    llm = LLM(path, device=device, dtype=dtype, quantization=quantization,  # a bad value: one ValueError line
              **engine_kw(kv_cache_memory, block_size, max_num_seqs, max_model_len, speculative,
                          weight_layout=weight_layout))
    if llm.quantization_backend is not None:
        from rich.console import Console
        Console(stderr=True).print(f"[dim]FP8 weights, GEMM: {llm.quantization_backend}[/dim]")
    if chat:
        prompts = _apply_chat(Path(path), prompts)
    if len(prompts) == 1 and n == 1 and not as_json and logprobs is None:
        _stream_one(llm.engine, prompts[0], params)
    else:
        _run_batch(llm, prompts, params, as_json)


# ------------------------------------------------------------------- prompts
def _gather_prompts(prompt, prompt_ids, prompts_file) -> list[str | list[int]]:
    """Text prompts, then token-id prompts, then the file's, in that order; text must be UTF-8."""
    prompts = [check_utf8(p, "--prompt") for p in prompt or []]
    prompts += [_ids(p, "--prompt-ids") for p in prompt_ids or []]
    if prompts_file is not None:
        prompts += _read_prompts_file(prompts_file)
    if not prompts:
        raise typer.BadParameter("give at least one --prompt, --prompt-ids or --prompts-file")
    return prompts


def _read_prompts_file(name: str) -> list[str | list[int]]:
    """One prompt per line; a line starting with '{' is JSON: {"prompt": TEXT} or
    {"prompt_token_ids": [...]}. Blank lines are skipped."""
    where = "stdin" if name == "-" else name
    try:
        text = sys.stdin.buffer.read().decode("utf-8") if name == "-" else Path(name).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {where}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
    prompts: list[str | list[int]] = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        prompts.append(_json_prompt(line, f"{where}:{i}") if line.lstrip().startswith("{") else line)
    if not prompts:
        raise ValueError(f"--prompts-file {where}: holds no prompt")
    return prompts


def _json_prompt(line: str, where: str) -> str | list[int]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if isinstance(obj.get("prompt"), str):
        return obj["prompt"]
    ids = obj.get("prompt_token_ids")
    if isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids):
        return ids
    raise ValueError(f"{where}: expected {{\"prompt\": TEXT}} or {{\"prompt_token_ids\": [INT, ...]}}")


def _apply_chat(path: Path, prompts: list) -> list[list[int]]:
    """Each text prompt as a user turn followed by the assistant's turn, in DeepSeek-V3's chat
    format as the server and `nanoseek chat` write it: the prompt is encoded as plain text,
    so a marker typed in it (`<｜Assistant｜>`) stays text."""
    from nanoseek.text.tokenizer import Tokenizer, load_tokenizer
    tok = Tokenizer.of(load_tokenizer(path))
    out = []
    for p in prompts:
        if not isinstance(p, str):
            raise typer.BadParameter("--chat applies to text prompts, not token ids")
        out.append(tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True))
    return out


# ------------------------------------------------------------------- output
def _shown(prompt, tokenizer) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.decode(prompt) if tokenizer is not None else " ".join(map(str, prompt))


def _stream_one(engine, prompt, params) -> None:
    """One prompt: print it, then its continuation as it grows, then a stats line on stderr."""
    import time

    from nanoseek.engine.outputs import stable_text
    seq = engine.add_request(prompt, params)
    tokenizer = engine.tokenizer
    t0, done = time.perf_counter(), 0
    sys.stdout.write(_shown(prompt, tokenizer))
    while engine.has_unfinished():
        engine.step()
        if tokenizer is None:
            part = "".join(f" {t}" for t in seq.output_token_ids[done:])
            done = len(seq.output_token_ids)
        else:
            text = stable_text(seq)  # holds back half characters and a tail that may become a stop string
            part, done = text[done:], max(done, len(text))
        sys.stdout.write(part)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _stats(engine, len(seq.output_token_ids), time.perf_counter() - t0)


def _run_batch(llm, prompts, params, as_json: bool) -> None:
    """Every prompt as one batched load; results in input order."""
    import time

    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokenizer = llm.tokenizer
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        for c in out.outputs:
            text = c.text if tokenizer is not None else "".join(f" {t}" for t in c.token_ids)
            if as_json:
                typer.echo(json.dumps(_record(i, _shown(prompt, tokenizer), out, c, text)))
            else:
                _print_completion(i, len(out.outputs), _shown(prompt, tokenizer), c, text, tokenizer)
    _stats(llm.engine, sum(len(c.token_ids) for o in outs for c in o.outputs), elapsed)


def _record(i: int, shown: str, out, c, text: str) -> dict:
    rec = {"index": i, "sample": c.index, "prompt": shown, "prompt_token_ids": out.prompt_token_ids,
           "text": text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
    if c.logprobs is not None:
        rec["cumulative_logprob"] = c.cumulative_logprob
        rec["logprobs"] = [[{"token_id": t, "logprob": lp} for t, lp in sorted(d.items(), key=lambda kv: -kv[1])]
                           for d in c.logprobs]
    return rec


def _print_completion(i: int, n: int, shown: str, c, text: str, tokenizer) -> None:
    from rich.console import Console
    Console(stderr=True).rule(f"[{i}]" + (f" sample {c.index}" if n > 1 else "") + f" finish={c.finish_reason}")
    print(shown + text, flush=True)
    for t, d in zip(c.token_ids, c.logprobs or []):
        piece = repr(tokenizer.decode([t])) if tokenizer is not None else str(t)
        top = " ".join(f"{k}:{v:.3f}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))
        print(f"  {t}\t{piece}\t{d[t]:.3f}\ttop: {top}")


def _stats(engine, n: int, elapsed: float) -> None:
    from rich.console import Console
    line = f"{n} tokens in {elapsed:.2f}s ({n / max(elapsed, 1e-9):.1f} tok/s)"
    if engine.speculative:
        line += f", MTP acceptance {engine.spec_stats.acceptance_rate:.1%} of {engine.spec_stats.drafted} drafts"
    Console(stderr=True).print(f"[dim]{line}[/dim]")


def register(app: typer.Typer) -> None:
    app.command()(generate)
