"""V3, V3.2, V4-Flash and V4-Pro side by side at a 1M-token context: parameters, KV cache and FLOPs per token, and the published ratios against V3.2.

DeepSeek's V4 report states, at a 1M-token context and against DeepSeek-V3.2: V4-Pro needs
27 % of the single-token inference FLOPs and 10 % of the KV cache, V4-Flash 10 % and 7 %.
This module recomputes both from the configs (calc/params.py, calc/kv.py, calc/flops.py)
and prints ours beside theirs, with the assumption behind each of ours:

  * KV cache, per sequence at 1,048,576 tokens (V4's max_position_embeddings), in the
    formats DeepSeek serves each model in (kv.deepseek_dtypes): V3.2 656 + 132 bytes per
    token and layer (FlashMLA's FP8 latent with a BF16 RoPE key; FP8 indexer keys), V4 583
    bytes per entry (FP8, RoPE dims in BF16) and 68 per compressed indexer key (FP4). This
    reproduces 10 % and 7 %; in BF16 throughout the ratios would be 11 % and 8 %. The V3.2
    cache at 1M is then 50.4 GB, the "~50 GB" of the report's Figure 1;
  * FLOPs of one generated token at that context (flops.token_flops: every matmul, the
    attention over what the query sees, the indexer's scoring, the mHC mixing), a
    multiply-add being 2 FLOPs whatever its precision. This gives about 26 % and 12 %: the
    indexer dominates (V3.2 scores 1M keys in every layer, 91 % of its FLOPs; V4 scores
    L/4 in its CSA layers), and V4-Flash's matmuls plus its indexer alone are already 10 %
    of V3.2. The report's 10 % for Flash is reached once the FLOPs are weighted by the
    precision they run in (FP8 = 1, BF16 = 2, FP4 = 1/2; the paper runs V4's indexer QK
    path in FP4, V3.2's in FP8, the attention core in BF16): 26 % and 10 %.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from nanoseek.calc.flops import token_flops
from nanoseek.calc.kv import deepseek_dtypes, kv_cache_bytes, uniform_dtypes
from nanoseek.calc.params import count_params
from nanoseek.config import ConfigError, ModelConfig, preset

MODELS = ("deepseek-v3", "deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro")
BASELINE = "deepseek-v3.2"
CONTEXT = 1 << 20  # "1M tokens": V4's max_position_embeddings, 1,048,576
# DeepSeek's papers and model cards: total / activated parameters, and the V4 report's
# single-token FLOPs and KV cache at 1M tokens as fractions of V3.2's.
PUBLISHED = {
    "deepseek-v3": {"total": 671e9, "activated": 37e9},
    "deepseek-v3.2": {},  # its model card's "685B" counts the MTP block and its copies too
    "deepseek-v4-flash": {"total": 284e9, "activated": 13e9, "flops": 0.10, "kv": 0.07},
    "deepseek-v4-pro": {"total": 1.6e12, "activated": 49e9, "flops": 0.27, "kv": 0.10},
}


def precision_weights(cfg: ModelConfig) -> dict[str, float]:
    """FLOPs in FP8 units: matmuls run in FP8 (V4's FP4 experts are multiplied in FP8 on
    current GPUs), the attention core in BF16 (2), the indexer in FP8 (V3.2) or FP4 (V4: 1/2),
    the mHC mixing in FP32 (4)."""
    return {"matmuls": 1.0, "attention": 2.0, "indexer": 0.5 if cfg.is_v4 else 1.0, "hyper_connections": 4.0}


@dataclass
class CompareRow:
    name: str
    total: int  # parameters of the main model
    activated: int
    kv_bytes: int  # one sequence of `ctx` tokens, DeepSeek's storage formats
    kv_bytes_bf16: int  # the same, every cache in BF16
    flops: float  # one generated token at `ctx`, a multiply-add = 2 FLOPs
    flops_fp8: float  # the same weighted by precision (precision_weights)
    flops_parts: dict
    kv_ratio: float = 0.0  # against BASELINE
    kv_ratio_bf16: float = 0.0
    flops_ratio: float = 0.0
    flops_ratio_fp8: float = 0.0
    published: dict | None = None


def compare_row(name: str, cfg: ModelConfig, ctx: int) -> CompareRow:
    pc = count_params(cfg)
    parts = token_flops(cfg, ctx)
    w = precision_weights(cfg)
    return CompareRow(name=name, total=pc.main_total, activated=pc.main_activated,
                      kv_bytes=kv_cache_bytes(cfg, ctx, deepseek_dtypes(cfg)),
                      kv_bytes_bf16=kv_cache_bytes(cfg, ctx, uniform_dtypes("bf16")),
                      flops=sum(parts.values()), flops_fp8=sum(w[k] * v for k, v in parts.items()),
                      flops_parts=parts, published=PUBLISHED.get(name))


def compare(ctx: int = CONTEXT, configs: dict[str, ModelConfig] | None = None) -> list[CompareRow]:
    """One row per model (the four presets unless `configs` names others), with ratios
    against the BASELINE row (or the first row when there is none)."""
    if ctx < 1:
        raise ConfigError(f"context (--ctx) must be >= 1 token, got {ctx}")
    configs = configs or {name: preset(name) for name in MODELS}
    rows = [compare_row(name, cfg, ctx) for name, cfg in configs.items()]
    base = next((r for r in rows if r.name == BASELINE), rows[0])
    for r in rows:
        r.kv_ratio, r.kv_ratio_bf16 = r.kv_bytes / base.kv_bytes, r.kv_bytes_bf16 / base.kv_bytes_bf16
        r.flops_ratio, r.flops_ratio_fp8 = r.flops / base.flops, r.flops_fp8 / base.flops_fp8
    return rows


def compare_report(ctx: int = CONTEXT) -> dict:
    rows = compare(ctx)
    return {"context": ctx, "baseline": BASELINE, "rows": [asdict(r) for r in rows]}


def kv_curve(cfg: ModelConfig, lengths: list[int]) -> list[int]:
    """Cache bytes of one sequence at each length, DeepSeek's formats."""
    dt = deepseek_dtypes(cfg)
    return [kv_cache_bytes(cfg, n, dt) for n in lengths]


def plot_kv(path: str, ctx: int = CONTEXT, names: tuple[str, ...] = MODELS) -> str:
    """A log-log plot of one sequence's KV cache against its length, 1K tokens to ctx."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({int(1024 * (ctx / 1024) ** (i / 64)) for i in range(65)})
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name in names:
        ax.plot(lengths, [b / 1e9 for b in kv_curve(preset(name), lengths)], label=name, lw=2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = [n for n in (1 << k for k in range(10, 31, 2)) if lengths[0] <= n <= lengths[-1]]
    ax.set_xticks(ticks, [f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K" for n in ticks])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache per sequence (GB)")
    ax.set_title("KV cache in DeepSeek's serving formats (FP8 latent / FP8+BF16-RoPE entries)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
