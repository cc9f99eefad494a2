"""KV-cache memory: what each attention variant stores per token, from one config.

Per token and per layer, the numbers cached are
  * MLA: c_KV and the shared rope key, `kv_lora_rank + qk_rope_head_dim` (576 for V3);
  * MHA: a key and a value per head, `heads * (qk_head_dim + v_head_dim)`;
  * GQA with g key/value heads: `g * (qk_head_dim + v_head_dim)`;
  * MQA: one key/value head, `qk_head_dim + v_head_dim`.
These are exactly what nanoseek's `MLA` and `GQA` modules hand to the cache (MHA/GQA/MQA
use MLA's head sizes: K has qk_head_dim = nope + rope, V has v_head_dim), and a test fills a
`ContiguousCache` with the real tiny model to check it. V3.2 and V4 (the second half of this
file) hold more kinds of rows, each counted with its own storage format.

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
    """Bytes one token costs in the cache across all layers (kind defaults to cfg's attention;
    V3.2's MLA adds its indexer key). V4's cache is not proportional to the length: ask
    kv_cache_bytes(cfg, seq_len) instead."""
    if cfg.is_v4:
        raise ConfigError("a V4 cache is not a fixed number of bytes per token (the window saturates, "
                          "compressed entries grow as L/m): use kv_cache_bytes(cfg, seq_len)")
    kind = kind or cfg.attention_type
    if kind == "gqa" and kv_heads is None:
        kv_heads = cfg.num_key_value_heads
    n = row_bytes(values_per_token_layer(cfg, kind, kv_heads), dtype)
    if cfg.is_v32 and kind == "mla":
        n += row_bytes(cfg.index_head_dim, dtype)
    return n * cache_layers(cfg, include_mtp)


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


# ------------------------------------------------ V3.2 and V4: what each cache holds at length L
# V3.2 caches, per token and MLA layer, the latent (kv_lora_rank + rope) and the lightning
# indexer's key (index_head_dim). V4 caches, per layer, a sliding window of min(L, n_win)
# KV entries of head_dim; a CSA layer adds L/m compressed entries and L/m compressed indexer
# keys (index_head_dim), an HCA layer L/m' compressed entries; a compressor also holds the
# window it has not closed yet (DeepSeek's reference: kv_state and score_state, each
# [coff·m, coff·c] in FP32, coff = 2 for CSA's overlapping windows, 1 for HCA).
VALUE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "fp4": 0.5}


@dataclass(frozen=True)
class RowFormat:
    """How one cached row is stored: the non-RoPE values in `nope`, the RoPE values in `rope`
    (when the two differ, only the non-RoPE part is quantised), and one scale of
    `scale_bytes` per `block` quantised values."""
    nope: str
    rope: str
    block: int = 0
    scale_bytes: int = 0
    note: str = ""

    def bytes(self, n_values: int, n_rope: int = 0) -> int:
        kept = n_rope if self.rope != self.nope else 0
        quantised = n_values - kept
        scales = self.scale_bytes * math.ceil(quantised / self.block) if self.block else 0
        return math.ceil(quantised * VALUE_BYTES[self.nope] + kept * VALUE_BYTES[self.rope]) + scales


ROW_FORMATS = {
    "fp32": RowFormat("fp32", "fp32"), "bf16": RowFormat("bf16", "bf16"), "fp16": RowFormat("fp16", "fp16"),
    "fp8": RowFormat("fp8", "fp8", FP8_TILE, SCALE_BYTES, "every value E4M3, one FP32 scale per 128"),
    "fp8-mla": RowFormat("fp8", "bf16", 128, 4, "FlashMLA's FP8 cache (V3.2): the latent in E4M3 with "
                         "one FP32 scale per 128, the RoPE key in BF16: 512 + 16 + 128 = 656 bytes"),
    "fp8-v4": RowFormat("fp8", "bf16", 64, 1, "V4's entries: E4M3 but the RoPE dims in BF16, one "
                        "UE8M0 (1-byte) scale per 64: 448 + 7 + 128 = 583 bytes"),
    "fp4": RowFormat("fp4", "fp4", 32, 1, "V4's indexer keys: E2M1, one UE8M0 scale per 32: 64 + 4 bytes"),
}


def row_format(name: str) -> RowFormat:
    if name not in ROW_FORMATS:
        raise ConfigError(f"unknown KV storage format {name!r}; choose one of {sorted(ROW_FORMATS)}")
    return ROW_FORMATS[name]


@dataclass(frozen=True)
class KVDtypes:
    """The storage format of each cache: attention entries (MLA's latent, V4's window and
    compressed entries), indexer keys, and the compressors' open windows."""
    entries: str
    indexer: str
    state: str = "fp32"
    name: str = ""


def uniform_dtypes(dtype: str) -> KVDtypes:
    """Every cache in one dtype (the compressor's open window stays FP32, as DeepSeek keeps it)."""
    row_format(dtype)
    return KVDtypes(dtype, dtype, "fp32", dtype)


def deepseek_dtypes(cfg: ModelConfig) -> KVDtypes:
    """The formats DeepSeek serves each model in (the published KV figures assume them):
    V3/V3.2, FlashMLA's FP8 latent (656 bytes) and V3.2's FP8 indexer keys with one FP32
    scale per 128 (132 bytes; DeepSeek-V3.2-Exp's `k_cache` + `k_scale_cache`); V4, the
    paper's mixed entries ("BF16 for the RoPE dimensions, FP8 for the rest"; DeepSeek's
    reference quantises kv[..., :-rope] in blocks of 64 with UE8M0 scales) and FP4 indexer
    keys (its `fp4_act_quant` in blocks of 32)."""
    if cfg.is_v4:
        return KVDtypes("fp8-v4", "fp4", "fp32", "deepseek")
    return KVDtypes("fp8-mla", "fp8", "fp32", "deepseek")


@dataclass
class CacheTerm:
    """`layers` layers each holding `entries` rows of `values` numbers (the last `rope` of
    them RoPE'd) in storage format `fmt`."""
    name: str
    layers: int
    entries: int
    values: int
    rope: int
    fmt: str
    row_bytes: int = 0
    bytes: int = 0

    def __post_init__(self):
        self.row_bytes = row_format(self.fmt).bytes(self.values, self.rope)
        self.bytes = self.layers * self.entries * self.row_bytes


def _layer_ids(cfg: ModelConfig, include_mtp: bool) -> range:
    return range(cache_layers(cfg, include_mtp))


def mla_cache_terms(cfg: ModelConfig, seq_len: int, dt: KVDtypes, include_mtp: bool) -> list[CacheTerm]:
    """V3 / V3.2: the latent of every token, and V3.2's indexer key of every token."""
    n = cache_layers(cfg, include_mtp)
    if cfg.attention_type != "mla":
        raise ConfigError(f"hybrid cache terms need attention_type='mla', got {cfg.attention_type!r}")
    terms = [CacheTerm("MLA latent c_KV + k_pe", n, seq_len, cfg.latent_dim, cfg.qk_rope_head_dim, dt.entries)]
    if cfg.is_v32:
        terms.append(CacheTerm("indexer keys", n, seq_len, cfg.index_head_dim, 0, dt.indexer))
    return terms


def v4_cache_terms(cfg: ModelConfig, seq_len: int, dt: KVDtypes, include_mtp: bool,
                   include_state: bool = True) -> list[CacheTerm]:
    """V4, per attention kind: the window, the compressed entries, CSA's compressed indexer
    keys and (include_state) the compressors' open windows."""
    kinds: dict[str, int] = {}
    for i in _layer_ids(cfg, include_mtp):
        kinds[cfg.layer_type(i)] = kinds.get(cfg.layer_type(i), 0) + 1
    c, r, cI = cfg.head_dim, cfg.qk_rope_head_dim, cfg.index_head_dim
    terms = [CacheTerm("sliding window", sum(kinds.values()), min(seq_len, cfg.sliding_window), c, r, dt.entries)]
    for kind, n in sorted(kinds.items()):
        m = cfg.compress_rate(kind)
        if not m:
            continue
        short = "CSA" if kind == "compressed_sparse_attention" else "HCA"
        coff = 2 if short == "CSA" else 1
        terms.append(CacheTerm(f"{short} compressed entries (L/{m})", n, seq_len // m, c, r, dt.entries))
        if short == "CSA":
            terms.append(CacheTerm(f"CSA indexer keys (L/{m})", n, seq_len // m, cI, 0, dt.indexer))
        if include_state:
            terms.append(CacheTerm(f"{short} compressor open window", n, 2 * coff * m, coff * c, 0, dt.state))
            if short == "CSA":
                terms.append(CacheTerm("CSA indexer compressor open window", n, 2 * coff * m, coff * cI, 0, dt.state))
    return terms


def cache_terms(cfg: ModelConfig, seq_len: int, dtypes: KVDtypes | None = None, include_mtp: bool = False,
                include_state: bool = True) -> list[CacheTerm]:
    """What one sequence of `seq_len` tokens holds in the cache, term by term."""
    if seq_len < 0:
        raise ConfigError(f"seq_len must be >= 0, got {seq_len}")
    dt = dtypes or uniform_dtypes("bf16")
    if cfg.is_v4:
        return v4_cache_terms(cfg, seq_len, dt, include_mtp, include_state)
    return mla_cache_terms(cfg, seq_len, dt, include_mtp)


def kv_cache_bytes(cfg: ModelConfig, seq_len: int, dtypes: KVDtypes | None = None, include_mtp: bool = False,
                   include_state: bool = True) -> int:
    """Bytes one sequence of `seq_len` tokens holds (V3: seq_len x bytes per token)."""
    if not cfg.is_v4 and cfg.attention_type != "mla":
        return seq_len * kv_bytes_per_token(cfg, dtype=(dtypes or uniform_dtypes("bf16")).entries,
                                            include_mtp=include_mtp)
    return sum(t.bytes for t in cache_terms(cfg, seq_len, dtypes, include_mtp, include_state))


def kv_read_bytes(cfg: ModelConfig, ctx: int, dtypes: KVDtypes | None = None, include_mtp: bool = False) -> int:
    """Bytes of cache one decode step reads at context ctx: all of it for V3; V3.2 reads every
    indexer key but only the top-k latents; V4 the window, CSA's indexer keys and top-k
    compressed entries, and all of HCA's (the open windows are written, not read)."""
    dt = dtypes or uniform_dtypes("bf16")
    terms = cache_terms(cfg, ctx, dt, include_mtp, include_state=False)
    if not (cfg.is_v32 or cfg.is_v4) or (cfg.is_v32 and cfg.indexer_mode == "dense"):
        return sum(t.bytes for t in terms)
    out = 0
    for t in terms:
        selected = t.name.startswith(("MLA latent", "CSA compressed"))
        out += t.layers * min(t.entries, cfg.index_topk) * t.row_bytes if selected else t.bytes
    return out


def kv_bytes_per_token_at(cfg: ModelConfig, seq_len: int, dtypes: KVDtypes | None = None,
                          include_mtp: bool = False, include_state: bool = True) -> float:
    """A sequence's cache divided by its length: constant for V3 and V3.2, falling with the
    length for V4 (the window saturates, the compressed entries grow as L/m)."""
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    return kv_cache_bytes(cfg, seq_len, dtypes, include_mtp, include_state) / seq_len


def hybrid_kv_report(cfg: ModelConfig, batch: int, seq_len: int, dtypes: list[str],
                     include_mtp: bool = False) -> dict:
    """`calc kv` for V3.2 and V4: every cache term in each uniform dtype and in DeepSeek's formats."""
    if batch < 1 or seq_len < 1:
        raise ConfigError(f"batch and seq_len must be positive, got {batch} and {seq_len}")
    schemes = [uniform_dtypes(d) for d in dtypes] + [deepseek_dtypes(cfg)]
    out = []
    for dt in schemes:
        terms = cache_terms(cfg, seq_len, dt, include_mtp)
        total = sum(t.bytes for t in terms)
        out.append({"dtypes": asdict(dt), "terms": [asdict(t) for t in terms], "sequence_bytes": total,
                    "bytes_per_token": total / seq_len, "total_bytes": total * batch})
    return {"batch": batch, "seq_len": seq_len, "layers": cache_layers(cfg, include_mtp), "schemes": out,
            "formats": {k: v.note for k, v in ROW_FORMATS.items() if v.note}}
