"""Calculator and FP8 commands: `nanoseek calc params|kv|flops|compare`, `nanoseek plan capacity`,
`nanoseek convert`. Each prints a rich table, or JSON alone on stdout with --json."""

from __future__ import annotations

import json
from typing import Optional

import typer

from nanoseek.cli.common import (STORAGE_DTYPES, deprecated_option, dtype_callback, dtype_words, pick,
                                  print_tables)

CHECKPOINT_DTYPES = ("float32", "bfloat16", "float16")  # convert: the tensors not in FP8

PRESET_HELP = ("preset name: tiny, deepseek-v2-lite, deepseek-v2, deepseek-v3, deepseek-v3.2, "
               "deepseek-v4-flash, deepseek-v4-pro, tiny-v32, tiny-v4")
CONFIG_HELP = "a config.json, or a checkpoint directory holding one"


# ----------------------------------------------------------------- formatting
def _config(preset: str | None, config: str | None):
    from nanoseek.cli.common import load_config
    return load_config(preset, config)


def _bytes(n: float) -> str:
    """Decimal units (1 GB = 1e9 bytes), as GPU datasheets count."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.2f}{unit}"
    return f"{n:,.0f}"


def _flops(n: float) -> str:
    if abs(n) >= 1e21:
        return f"{n:.3e} FLOPs"
    for unit, size in (("EFLOPs", 1e18), ("PFLOPs", 1e15), ("TFLOPs", 1e12),
                       ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} FLOPs"


def _emit(as_json: bool, data: dict, *tables) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    print_tables(*tables)


def _table(title: str, *columns: str, caption: str | None = None, justify: str = "right"):
    """First column left, the others `justify` (numbers right, prose left)."""
    from rich.table import Table
    t = Table(title=title, caption=caption, caption_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else justify)
    return t


# --------------------------------------------------------------------- params
def params_cmd(preset: Optional[str] = typer.Option(None, help=PRESET_HELP),
               config: Optional[str] = typer.Option(None, help=CONFIG_HELP),
               as_json: bool = typer.Option(False, "--json", help="print JSON only")):
    """Total and activated parameters by component, computed from the config (no model is
    built). Activated excludes the embedding table (a lookup) and the routed experts a
    token is not sent to; the MTP module is reported apart, as DeepSeek-V3 does."""
    from nanoseek.calc.params import COMPONENTS, V3_COMPONENTS, count_params
    cfg = _config(preset, config)
    pc = count_params(cfg)
    name = preset or config
    t = _table(f"parameters: {name}", "component", "total", "activated", "total (exact)",
               caption="activated = what one token computes with: no embedding lookup, "
                       f"{cfg.num_experts_per_tok or 0} of {cfg.n_routed_experts or 0} routed experts")
    for c in COMPONENTS:
        if pc.total[c] or (c in V3_COMPONENTS and not cfg.is_v4):
            t.add_row(c, _count(pc.total[c]), _count(pc.activated[c]), f"{pc.total[c]:,}")
    t.add_section()
    t.add_row("main model", _count(pc.main_total), _count(pc.main_activated), f"{pc.main_total:,}")
    if cfg.num_nextn_predict_layers:
        t.add_row(f"MTP ({cfg.num_nextn_predict_layers} module)", _count(pc.mtp), _count(pc.mtp_activated),
                  f"{pc.mtp:,}")
        if pc.mtp_with_copies != pc.mtp:
            t.add_row("MTP + its embedding/head copies", _count(pc.mtp_with_copies), "",
                      f"{pc.mtp_with_copies:,}")
        t.add_row("main + MTP (as in the checkpoint)", _count(pc.main_total + pc.mtp_with_copies), "",
                  f"{pc.main_total + pc.mtp_with_copies:,}")
    _emit(as_json, {"name": name, **pc.to_dict()}, t)


# ------------------------------------------------------------------------- kv
def kv_cmd(preset: Optional[str] = typer.Option(None, help=PRESET_HELP),
           config: Optional[str] = typer.Option(None, help=CONFIG_HELP),
           batch: int = typer.Option(1, min=1, help="sequences in the batch"),
           seq_len: int = typer.Option(4096, min=1, help="tokens per sequence"),
           dtype: list[str] = typer.Option(["fp32", "bf16", "fp8"], callback=dtype_callback(STORAGE_DTYPES, short=True),
                                           help=f"cache dtypes (repeatable): {dtype_words(STORAGE_DTYPES)}"),
           gqa: Optional[list[int]] = typer.Option(None, help="GQA key/value head counts to show (repeatable; default 8, or the largest divisor of the head count below it)"),
           mtp: bool = typer.Option(False, help="count the MTP modules' layers too"),
           as_json: bool = typer.Option(False, "--json", help="print JSON only")):
    """KV-cache bytes per token and for batch x seq_len, for MHA, GQA, MQA and MLA built from
    the same config (same head sizes), with ratios. FP8 adds one FP32 scale per 128 values.
    V3.2 and V4: what each cache holds at seq_len (latent, indexer keys, window, compressed
    entries, open compressor windows), in each dtype and in DeepSeek's serving formats."""
    from nanoseek.calc.kv import kv_report
    cfg = _config(preset, config)
    if cfg.is_v32 or cfg.is_v4:
        return _hybrid_kv(cfg, preset or config, batch, seq_len, dtype, mtp, as_json)
    rep = kv_report(cfg, batch, seq_len, dtype, gqa, mtp)
    t = _table(f"KV cache: {preset or config}, {rep['layers']} layers, batch {batch} x {seq_len} tokens",
               "attention", "dtype", "values/layer", "bytes/layer", "per token",
               "batch x seq", "x MLA", "x MHA",
               caption="per token: values and bytes per layer, bytes over all layers; MHA/GQA/MQA "
                       "use the config's head sizes (K: qk_head_dim, V: v_head_dim); fp8 = 1 byte "
                       "+ one fp32 scale per 128 values; 1 GB = 1e9 bytes")
    last = None
    for r in rep["rows"]:
        if last is not None and r["dtype"] != last:
            t.add_section()
        last = r["dtype"]
        t.add_row(r["attention"], r["dtype"], f"{r['values_per_token_layer']:,}",
                  f"{r['bytes_per_token_layer']:,}", _bytes(r["bytes_per_token"]), _bytes(r["total_bytes"]),
                  f"{r['vs_mla']:.2f}", f"{r['vs_mha']:.4f}")
    _emit(as_json, {"name": preset or config, **rep}, t)


def _hybrid_kv(cfg, name, batch, seq_len, dtypes, mtp, as_json):
    from nanoseek.calc.kv import hybrid_kv_report
    rep = hybrid_kv_report(cfg, batch, seq_len, dtypes, mtp)
    t = _table(f"KV cache: {name} ({cfg.arch}), {rep['layers']} layers, batch {batch} x {seq_len:,} tokens",
               "cache", "format", "layers", "rows/layer", "values", "bytes/row", "per sequence",
               caption="rows/layer at this length: the window saturates at sliding_window, compressed "
                       "rows grow as L/m, an open compressor window is fixed (FP32, as DeepSeek keeps "
                       "it); deepseek = the formats DeepSeek serves in: " + "; ".join(
                           f"{k}: {v}" for k, v in rep["formats"].items()
                           if any(term["fmt"] == k for sch in rep["schemes"] for term in sch["terms"]))
               + "; 1 GB = 1e9 bytes")
    for i, sch in enumerate(rep["schemes"]):
        if i:
            t.add_section()
        for term in sch["terms"]:
            t.add_row(term["name"], term["fmt"], str(term["layers"]), f"{term['entries']:,}", f"{term['values']:,}",
                      f"{term['row_bytes']:,}", _bytes(term["bytes"]))
        batch_note = f" (x{batch}: {_bytes(sch['total_bytes'])})" if batch > 1 else ""
        t.add_row(f"[bold]all, {sch['dtypes']['name']}: {_bytes(sch['bytes_per_token'])} / token[/bold]",
                  "", "", "", "", "", f"[bold]{_bytes(sch['sequence_bytes'])}[/bold]{batch_note}")
    _emit(as_json, {"name": name, **rep}, t)


# ---------------------------------------------------------------------- flops
def flops_cmd(preset: Optional[str] = typer.Option(None, help=PRESET_HELP),
              config: Optional[str] = typer.Option(None, help=CONFIG_HELP),
              seq_len: int = typer.Option(4096, min=1, help="training sequence length (causal: average context seq_len/2)"),
              tokens: float = typer.Option(14.8e12, help="training tokens for the training-compute row (default V3's 14.8T, whatever the preset)"),
              ctx: Optional[int] = typer.Option(None, min=1, help="context of one decode step (default: seq_len)"),
              mtp: bool = typer.Option(False, help="include the MTP modules (as V3's training does)"),
              as_json: bool = typer.Option(False, "--json", help="print JSON only")):
    """Forward and backward FLOPs per token (2 x activated matmul params + attention at the
    given length; the embedding lookup counts 0), and training compute = 3 x forward x tokens."""
    from nanoseek.calc.flops import flops_report, to_dict
    cfg = _config(preset, config)
    r = flops_report(cfg, seq_len, tokens, ctx, mtp)
    t = _table(f"FLOPs: {preset or config}" + (" (with MTP)" if mtp else ""), "quantity", "value",
               caption="multiply-add = 2 FLOPs; backward = 2 x forward; attention = scores + values, "
                       "decompressed (past K/V computed once and kept) unless marked absorbed "
                       "(MLA scoring against the cached latent)")
    t.add_row("activated matmul params / token", _count(r.matmul_params))
    t.add_row("forward matmuls / token", _flops(r.forward_matmul))
    t.add_row(f"forward attention / token (causal, seq {seq_len})", _flops(r.forward_attention_train))
    t.add_row("forward / token (training)", _flops(r.forward_train))
    t.add_row("backward / token (training)", _flops(r.backward_train))
    t.add_row("training / token (fwd + bwd)", _flops(r.train_per_token))
    t.add_section()
    t.add_row(f"training compute, {_count(tokens)} tokens (--tokens)", _flops(r.train_total))
    t.add_row("  6N estimate (no attention)", _flops(r.six_n_total))
    t.add_section()
    t.add_row(f"decode forward / token at ctx {r.decode_ctx}", _flops(r.decode_forward))
    if r.decode_forward_absorbed is not None:
        t.add_row(f"decode forward / token at ctx {r.decode_ctx}, MLA absorbed", _flops(r.decode_forward_absorbed))
    parts = {}
    if cfg.is_v32 or cfg.is_v4:
        from nanoseek.calc.flops import token_flops
        parts = token_flops(cfg, r.decode_ctx, include_mtp=mtp)
        for k, v in parts.items():
            if v:
                t.add_row(f"  of which {k}", _flops(v))
    _emit(as_json, {"name": preset or config, **to_dict(r), "decode_parts": parts}, t)


# -------------------------------------------------------------------- compare
def compare_cmd(ctx: int = typer.Option(1 << 20, min=1, help="context length of the comparison (default 1,048,576 = 1M)"),
                plot: Optional[str] = typer.Option(None, help="also write a PNG of KV bytes against context length here"),
                as_json: bool = typer.Option(False, "--json", help="print JSON only")):
    """DeepSeek-V3, V3.2, V4-Flash and V4-Pro at one context: parameters, KV cache and FLOPs
    of one generated token, as fractions of V3.2's beside the V4 report's (27 % / 10 % for
    Pro, 10 % / 7 % for Flash at 1M tokens)."""
    from nanoseek.calc.compare import BASELINE, compare_report, plot_kv
    rep = compare_report(ctx)
    if plot:
        rep["plot"] = plot_kv(plot, ctx)
    _emit(as_json, rep, *_compare_tables(rep, BASELINE))


def _round(n: float) -> str:
    """A published count as it is written: 671B, 1.6T."""
    return f"{n / 1e12:g}T" if n >= 1e12 else f"{n / 1e9:g}B"


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def _compare_tables(rep, base):
    ctx = rep["context"]
    a = _table(f"DeepSeek V3 -> V4 at {ctx:,} tokens", "model", "params", "activated", "published",
               "KV / sequence", "KV / token", "FLOPs / token",
               caption="params: main model (MTP apart), activated without the embedding lookup; KV: one "
                       "sequence in DeepSeek's serving formats (FP8 with BF16 RoPE dims; indexer keys FP8 "
                       "in V3.2, FP4 in V4); FLOPs: one generated token at this context, multiply-add = 2")
    b = _table(f"against {base} (ours | the V4 report's)", "model", "KV", "KV, all BF16", "KV published",
               "FLOPs", "FLOPs, FP8 units", "FLOPs published",
               caption="FP8 units weigh each FLOP by its precision (FP8 1, BF16 2, FP4 1/2; V4's indexer "
                       "runs in FP4, V3.2's in FP8): the report's 10 % for V4-Flash needs it, since its "
                       "matmuls and indexer alone are 10 % of V3.2's plain FLOPs")
    for r in rep["rows"]:
        pub = r["published"] or {}
        a.add_row(r["name"], _count(r["total"]), _count(r["activated"]),
                  f"{_round(pub['total'])} / {_round(pub['activated'])}" if "total" in pub else "",
                  _bytes(r["kv_bytes"]), _bytes(r["kv_bytes"] / ctx), _flops(r["flops"]))
        b.add_row(r["name"], _pct(r["kv_ratio"]), _pct(r["kv_ratio_bf16"]),
                  _pct(pub["kv"]) if "kv" in pub else "", _pct(r["flops_ratio"]), _pct(r["flops_ratio_fp8"]),
                  _pct(pub["flops"]) if "flops" in pub else "")
    return a, b


# ------------------------------------------------------------------- capacity
def capacity_cmd(preset: Optional[str] = typer.Option(None, help=PRESET_HELP),
                 config: Optional[str] = typer.Option(None, help=CONFIG_HELP),
                 qps: float = typer.Option(..., help="requests per second"),
                 prompt_tokens: int = typer.Option(..., min=1, help="prompt tokens per request"),
                 output_tokens: int = typer.Option(..., min=1, help="generated tokens per request"),
                 gpu: str = typer.Option("H100", help="H100, H800, H200, A100, custom, or a --gpu-file entry"),
                 gpu_file: Optional[str] = typer.Option(None, help='JSON {"NAME": {"mem_gb", "bw_tbs", "bf16_tflops", "fp8_tflops"?, "gpus_per_node"?}}'),
                 gpu_mem_gb: Optional[float] = typer.Option(None, help="custom GPU: memory in GB"),
                 gpu_bw_tbs: Optional[float] = typer.Option(None, help="custom GPU: HBM bandwidth in TB/s"),
                 gpu_tflops: Optional[float] = typer.Option(None, help="custom GPU: dense BF16 TFLOP/s"),
                 gpu_fp8_tflops: Optional[float] = typer.Option(None, help="custom GPU: dense FP8 TFLOP/s"),
                 gpus_per_node: int = typer.Option(8, help="custom GPU: GPUs per node"),
                 weight_dtype: str = typer.Option("bf16", callback=dtype_callback(STORAGE_DTYPES, short=True),
                                                  help=f"{dtype_words(STORAGE_DTYPES)} (fp8: V3's release layout)"),
                 kv_dtype: str = typer.Option("bf16", callback=dtype_callback(STORAGE_DTYPES, short=True),
                                              help=dtype_words(STORAGE_DTYPES)),
                 ttft_ms: float = typer.Option(2000.0, help="time-to-first-token target"),
                 tpot_ms: float = typer.Option(50.0, help="time-per-output-token target"),
                 mfu: float = typer.Option(0.4, help="fraction of peak FLOP/s reached"),
                 bw_util: float = typer.Option(0.7, help="fraction of HBM bandwidth reached by decode"),
                 mem_util: float = typer.Option(0.9, help="fraction of HBM for weights + KV cache"),
                 mtp: bool = typer.Option(False, help="also load the MTP module (speculative decoding)"),
                 as_json: bool = typer.Option(False, "--json", help="print JSON only")):
    """GPUs and nodes to serve QPS requests/s of prompt+output tokens within TTFT/TPOT targets:
    concurrency = QPS x latency; memory for weights + KV; decode bound by bytes read per step
    over HBM bandwidth; prefill/decode bound by FLOPs; every assumption printed."""
    from dataclasses import asdict

    from nanoseek.calc.capacity import Assumptions, plan_capacity
    cfg = _config(preset, config)
    spec = _gpu_spec(gpu, gpu_file, gpu_mem_gb, gpu_bw_tbs, gpu_tflops, gpu_fp8_tflops, gpus_per_node)
    a = Assumptions(qps=qps, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                    weight_dtype=weight_dtype, kv_dtype=kv_dtype, ttft_ms=ttft_ms, tpot_ms=tpot_ms,
                    mfu=mfu, bw_util=bw_util, mem_util=mem_util, include_mtp=mtp)
    p = plan_capacity(cfg, spec, a)
    _emit(as_json, {"name": preset or config, **asdict(p)}, _assumptions_table(preset or config, a, p), _plan_table(p))


def _gpu_spec(gpu, gpu_file, mem_gb, bw_tbs, tflops, fp8_tflops, gpus_per_node):
    """The GPU to plan for: a built-in one, one from --gpu-file, or a custom one from flags."""
    from nanoseek.calc.gpus import custom_gpu, get_gpu, load_gpu_file
    if gpu_file:
        load_gpu_file(gpu_file)
    if gpu.lower() == "custom":
        return custom_gpu(mem_gb, bw_tbs, tflops, fp8_tflops, gpus_per_node)
    return get_gpu(gpu)


def _assumptions_table(name, a, p):
    """Every assumption the plan rests on, so a reader can disagree with one."""
    g = p.gpu
    at = _table("assumptions", "assumption", "value", justify="left")
    at.add_row("model", str(name))
    at.add_row("GPU", f"{g['name']}: {g['mem_gb']} GB, {g['bw_tbs']} TB/s, {g['bf16_tflops']} BF16 TFLOP/s, "
               f"{g['fp8_tflops'] or 'no'} FP8 TFLOP/s, {g['gpus_per_node']}/node")
    at.add_row("traffic", f"{a.qps:g} req/s x ({a.prompt_tokens} prompt + {a.output_tokens} output tokens)")
    at.add_row("latency targets", f"TTFT {a.ttft_ms:g} ms, TPOT {a.tpot_ms:g} ms")
    at.add_row("weights / KV dtype", f"{a.weight_dtype} / {a.kv_dtype}" + (" (+MTP module)" if a.include_mtp else ""))
    at.add_row("efficiency", f"MFU {a.mfu:g}, HBM bandwidth {a.bw_util:g}, usable memory {a.mem_util:g}")
    at.add_row("latency per request", f"TTFT + output x TPOT = {p.latency_s:.2f} s")
    at.add_row("concurrency", f"QPS x latency = {p.concurrency:,.1f} requests in flight")
    at.add_row("KV held", "every in-flight request at full length (prompt + output)")
    at.add_row("decode reads", "touched weights (uniform routing) + the KV a token reads at prompt + output/2")
    return at


def _plan_table(p):
    """Memory, bandwidth and compute needs, the GPUs each asks for, and the verdict."""
    t = _table("capacity plan", "quantity", "value")
    t.add_row("weights", _bytes(p.weights_bytes))
    t.add_row("KV cache per token", _bytes(p.kv_bytes_per_token))
    t.add_row("KV cache at that concurrency", _bytes(p.kv_bytes))
    t.add_row("bytes read per decode step", f"{_bytes(p.decode_bytes_per_step)} (weights "
              f"{_bytes(p.decode_weight_bytes_per_step)}, KV {_bytes(p.decode_kv_bytes_per_step)})")
    t.add_row("prefill FLOPs per prompt token", _flops(p.prefill_flops_per_token))
    t.add_row("decode FLOPs per output token", _flops(p.decode_flops_per_token))
    t.add_row("FLOP/s needed", _flops(p.flops_per_s) + "/s")
    t.add_section()
    for label, n in (("GPUs for memory", p.gpus_for_memory), ("GPUs for decode bandwidth", p.gpus_for_decode_bandwidth),
                     ("GPUs for compute (throughput)", p.gpus_for_compute), ("GPUs for TTFT (one prefill)", p.gpus_for_ttft)):
        t.add_row(label, f"{n:,.2f}")
    t.add_section()
    t.add_row("GPUs", f"[bold]{p.gpus}[/bold] (bound by {p.binding})")
    t.add_row("nodes", f"[bold]{p.nodes}[/bold]")
    t.add_row("per GPU", f"weights {_bytes(p.per_gpu_weights_bytes)} + KV {_bytes(p.per_gpu_kv_bytes)} = "
              f"{p.per_gpu_mem_fraction:.0%} of HBM")
    t.add_row("decode step at that size", f"{p.decode_step_s * 1e3:,.1f} ms")
    t.add_row("one prompt's prefill at that size", f"{p.prefill_s * 1e3:,.1f} ms")
    t.add_row("output tokens/s", f"{p.output_tokens_per_s:,.0f}")
    return t


# -------------------------------------------------------------------- convert
def convert_cmd(src: str = typer.Argument(..., help="source checkpoint directory"),
                dst: Optional[str] = typer.Argument(None, hidden=True, help="deprecated: use --out"),
                out: Optional[str] = typer.Option(None, "--out", help="destination directory, new or empty (required)"),
                quantization: Optional[str] = typer.Option(None, "--quantization", "-q", callback=dtype_callback(("fp8", "fp4-experts")),
                                                           help="fp8: quantise the weights to FP8 (E4M3, 128x128 blocks, weight_scale_inv); V3/V3.2 only, V4 is refused. fp4-experts: the routed experts to V4's FP4 (E2M1 + a UE8M0 scale per 32 inputs), V3 and V4"),
                fp8: bool = deprecated_option(False, "--fp8", "--quantization fp8"),
                dequant: bool = typer.Option(False, "--dequant", help="dequantise an FP8 checkpoint (V3's weight_scale_inv, or V4's .scale: FP8 with UE8M0 scales and FP4 experts)"),
                dtype: str = typer.Option("bf16", callback=dtype_callback(CHECKPOINT_DTYPES, short=True),
                                          help=f"dtype of the tensors not in FP8: {dtype_words(CHECKPOINT_DTYPES)}"),
                overwrite: bool = typer.Option(False, help="write into a non-empty DST"),
                as_json: bool = typer.Option(False, "--json", help="print JSON only")):
    """Convert a checkpoint between BF16 and FP8: `nanoseek convert SRC --out DST
    --quantization fp8`, or `--dequant` back; `--quantization fp4-experts` writes the routed
    experts in FP4.

    --quantization fp8 writes DeepSeek-V3's layout (E4M3 + weight_scale_inv per 128x128 block)
    for V3 and V3.2: the Linear weights of attention (V3.2's indexer wq_b and wk too) and of
    the FFNs/experts; embeddings, head, norms, router and the indexer's weights_proj stay in
    high precision. It refuses a DeepSeek-V4 model, whose release layout it does not write.

    --quantization fp4-experts writes the routed experts' weights (main layers and MTP, V3 and V4)
    as DeepSeek-V4-Flash stores them: packed E2M1 codes (int8, two per byte) beside a UE8M0
    `.scale` per 32 inputs; the rest in --dtype. It is what a model trained with
    --fp4-experts-from was trained to be; nanoseek and transformers load it.

    --dequant reads V3's layout and also DeepSeek-V4's release: E4M3 weights beside a `.scale`
    (UE8M0 or FP32, per 128x128 block) and FP4 (E2M1) routed experts with one UE8M0 scale per
    32 inputs. What the model keeps in FP32 (router; V4's mHC weights, sinks, compressor
    position biases) stays FP32 whatever --dtype says. The result loads with
    nanoseek.from_pretrained (which dequantises on load)."""
    from dataclasses import asdict

    from nanoseek.checkpoint.convert import convert
    fp8 = fp8 or quantization == "fp8"
    fp4 = quantization == "fp4-experts"
    if dst is not None:
        typer.echo("note: the positional DST is deprecated; use --out DST", err=True)
    dst = pick(out, dst, "--out", "DST")
    if dst is None:
        raise ValueError("--out is required (the directory to write)")
    if fp8 + fp4 + dequant != 1:
        raise typer.BadParameter("give exactly one of --quantization fp4-experts, --quantization fp8 or --dequant")
    to = "fp8" if fp8 else "fp4-experts" if fp4 else "dequant"
    r = convert(src, dst, to, dtype, progress=not as_json, overwrite=overwrite)
    _emit(as_json, asdict(r), _convert_table(src, dst, to, dtype, r))


def _convert_table(src, dst, to: str, dtype: str, r):
    what = {"fp8": "FP8", "fp4-experts": "routed experts to FP4"}.get(to, "dequantise to " + dtype)
    t = _table(f"convert {src} -> {dst} ({what})", "quantity", "value")
    t.add_row("tensors", f"{r.tensors:,}")
    t.add_row({"fp8": "FP8 weights written", "fp4-experts": "FP4 expert weights written"}.get(
        to, "FP8 weights dequantised"), f"{r.quantised:,}")
    t.add_row("bytes in -> out", f"{_bytes(r.bytes_in)} -> {_bytes(r.bytes_out)}")
    if to != "dequant":
        t.add_row("weight rel. error, mean", f"{r.rel_error_mean:.4%}")
        t.add_row("weight rel. error, worst", f"{r.rel_error_max:.4%} ({r.worst_tensor})")
        t.add_row("max abs error", f"{r.max_abs_error:.3g}")
    return t


def register(app: typer.Typer) -> None:
    calc = typer.Typer(help="Calculators that read only a config: parameters, KV cache, FLOPs, V3 -> V4.",
                       no_args_is_help=True)
    calc.command("params")(params_cmd)
    calc.command("kv")(kv_cmd)
    calc.command("flops")(flops_cmd)
    calc.command("compare")(compare_cmd)
    app.add_typer(calc, name="calc")
    plan = typer.Typer(help="Deployment planning: GPUs and nodes for a traffic shape.", no_args_is_help=True)
    plan.command("capacity")(capacity_cmd)
    app.add_typer(plan, name="plan")
    app.command("convert")(convert_cmd)
