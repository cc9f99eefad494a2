"""KV-cache memory: what each attention variant stores per token, from one config.

Per token and per layer, the numbers cached are
  * MLA: c_KV and the shared rope key, `kv_lora_rank + qk_rope_head_dim` (576 for V3);
  * MHA: a key and a value per head, `heads * (qk_head_dim + v_head_dim)`;
  * GQA with g key/value heads: `g * (qk_head_dim + v_head_dim)`;
  * MQA: one key/value head, `qk_head_dim + v_head_dim`.
These are exactly what nanoseek's `MLA` and `GQA` modules hand to the cache (MHA/GQA/MQA
use MLA's head sizes: K has qk_head_dim = nope + rope, V has v_head_dim), and a test fills a
`ContiguousCache` with the real tiny model to check it.

FP8 caches store one FP32 scale per 128 values (the 1x128 tiling DeepSeek-V3 uses for
activations): a row of n numbers costs n + 4 * ceil(n / 128) bytes. The MTP modules'
layers are not counted unless asked (they are only used for speculative drafts).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nanoseek.config import ConfigError, ModelConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
FP8_TILE = 128  # values per FP32 scale
SCALE_BYTES = 4


def dtype_name(dtype) -> str:
    """A torch dtype as this module names it (torch.bfloat16 -> "bf16"): the engine's cache
    and `calc kv --dtype` must agree on bytes per token, and a test checks they do."""
    names = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16",
             "torch.float8_e4m3fn": "fp8"}
    if str(dtype) not in names:
        raise ConfigError(f"no KV-cache size for dtype {dtype}; known: {sorted(names)}")
    return names[str(dtype)]


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    return dtype


def row_bytes(n_values: int, dtype: str) -> int:
    """Bytes for one cached row of n numbers, FP8 scale overhead included."""
    check_dtype(dtype)
    scales = SCALE_BYTES * math.ceil(n_values / FP8_TILE) if dtype == "fp8" else 0
    return n_values * DTYPE_BYTES[dtype] + scales


def values_per_token_layer(cfg: ModelConfig, kind: str, kv_heads: int | None = None) -> int:
    """Numbers cached per token per layer by attention `kind` built from cfg's head sizes."""
    per_head = cfg.qk_head_dim + cfg.v_head_dim
    if kind == "mla":
        return cfg.latent_dim
    if kind == "mha":
        return cfg.num_attention_heads * per_head
    if kind == "mqa":
        return per_head
    if kind == "gqa":
        H = cfg.num_attention_heads
        if not kv_heads or kv_heads < 1 or H % kv_heads:
            raise ConfigError(f"gqa needs kv_heads dividing num_attention_heads={H}, got {kv_heads!r}")
        return kv_heads * per_head
    raise ConfigError(f"unknown attention kind {kind!r}; choose mla, mha, gqa or mqa")


@dataclass
class KVRow:
    attention: str  # "mla", "mha", "gqa-8", "mqa"
    kv_heads: int | None
    values_per_token_layer: int
    dtype: str
    bytes_per_token_layer: int
    bytes_per_token: int  # all layers
    total_bytes: int  # batch x seq_len tokens
    vs_mla: float  # this / MLA in the same dtype
    vs_mha: float


def cache_layers(cfg: ModelConfig, include_mtp: bool = False) -> int:
    return cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)


def kv_bytes_per_token(cfg: ModelConfig, kind: str | None = None, dtype: str = "bf16",
                       kv_heads: int | None = None, include_mtp: bool = False) -> int:
    """Bytes one token costs in the cache across all layers (kind defaults to cfg's attention)."""
    kind = kind or cfg.attention_type
    if kind == "gqa" and kv_heads is None:
        kv_heads = cfg.num_key_value_heads
    n = values_per_token_layer(cfg, kind, kv_heads)
    return row_bytes(n, dtype) * cache_layers(cfg, include_mtp)


def default_gqa_groups(cfg: ModelConfig) -> tuple[int, ...]:
    """8 key/value heads (Llama-3's and Qwen-2.5's choice) when that divides the head count,
    else the largest smaller divisor above 1; none for a model with fewer than 3 heads."""
    H = cfg.num_attention_heads
    return next(((g,) for g in range(min(8, H - 1), 1, -1) if H % g == 0), ())


def kv_table(cfg: ModelConfig, batch: int = 1, seq_len: int = 4096,
             dtypes: tuple[str, ...] = ("fp32", "bf16", "fp8"), gqa_groups: tuple[int, ...] | None = None,
             include_mtp: bool = False) -> list[KVRow]:
    """Every variant x dtype for `batch` sequences of `seq_len` tokens, with ratios."""
    if gqa_groups is None:
        gqa_groups = default_gqa_groups(cfg)
    if batch < 1 or seq_len < 1:
        raise ConfigError(f"batch and seq_len must be positive, got {batch} and {seq_len}")
    variants = [("mha", None)] + [("gqa", g) for g in gqa_groups] + [("mqa", None), ("mla", None)]
    L = cache_layers(cfg, include_mtp)
    rows = []
    for dtype in dtypes:
        per_layer = {}
        for kind, g in variants:
            per_layer[(kind, g)] = row_bytes(values_per_token_layer(cfg, kind, g), dtype)
        for kind, g in variants:
            b = per_layer[(kind, g)]
            rows.append(KVRow(
                attention=f"gqa-{g}" if kind == "gqa" else kind, kv_heads=_heads(cfg, kind, g),
                values_per_token_layer=values_per_token_layer(cfg, kind, g), dtype=dtype,
                bytes_per_token_layer=b, bytes_per_token=b * L, total_bytes=b * L * batch * seq_len,
                vs_mla=b / per_layer[("mla", None)], vs_mha=b / per_layer[("mha", None)]))
    return rows


def _heads(cfg: ModelConfig, kind: str, g: int | None) -> int | None:
    return {"mha": cfg.num_attention_heads, "mqa": 1, "gqa": g}.get(kind)


def kv_report(cfg: ModelConfig, batch: int, seq_len: int, dtypes, gqa_groups, include_mtp=False) -> dict:
    rows = kv_table(cfg, batch, seq_len, tuple(dtypes), tuple(gqa_groups) if gqa_groups else None, include_mtp)
    return {"batch": batch, "seq_len": seq_len, "layers": cache_layers(cfg, include_mtp),
            "fp8_scale": f"one fp32 scale per {FP8_TILE} values",
            "rows": [asdict(r) for r in rows]}
