"""`plan capacity`: from a traffic shape and latency targets to GPUs and nodes.

The model (every assumption is a field of `Assumptions` and is printed):
  * latency per request = TTFT target + output_tokens x TPOT target (the deployment is
    sized so that both targets hold), and by Little's law
        concurrency = QPS x latency;
  * memory: the weights, plus every in-flight request's KV cache at its full length
    (prompt + output: the worst case a scheduler must admit), within `mem_util` of HBM;
    with `include_mtp` the MTP layers' weights and KV too (as `calc kv --mtp` and the engine);
  * decode is memory-bound: each step reads the weights the batch touches plus the KV of
    every sequence (at the average context prompt + output/2) and must finish within TPOT
    at `bw_util` of the HBM bandwidth. A batch of C tokens touches, per MoE layer, on
    average E(1 - (1 - k/E)^C) of the E routed experts (uniform routing): the activated
    weights for one token, all the experts for a large batch;
  * prefill and decode FLOPs: throughput QPS x (prompt x prefill FLOPs/token + output x
    decode FLOPs/token) at `mfu` of the GPU's peak (FP8 peak when the weights are FP8 and
    the GPU has FP8 tensor cores); and one prompt's prefill must fit the TTFT target on
    the whole deployment (tensor + expert parallel);
  * GPUs = ceil of the largest need; nodes = ceil(GPUs / gpus_per_node).
V3.2 and V4 hold more than a latent per token and read less than all of it: their cache is
counted term by term at the request's full length (kv.cache_terms: V3.2's indexer keys, V4's
window, compressed entries, compressed indexer keys and open compressor windows), and a
decode step reads every indexer key but only the top-k selected entries (kv.kv_read_bytes);
`kv_bytes_per_token` is then that cache divided by prompt + output.
FP8 weights follow DeepSeek-V3's checkpoint: the Linear weights of attention and the FFNs
in FP8 plus one FP32 scale per 128x128 block; embeddings, head, norms and router in BF16
(V3.2's indexer projections in FP8 too). V4's checkpoint keeps its routed experts in FP4
(E2M1, one UE8M0 scale per 32 weights: 0.5 + 1/32 bytes), so fp8 means that layout for V4
(V4-Flash: 160 GB); its compressors and mHC mappings are counted in BF16. The indexer is
counted as one FP8 component, although the releases keep its weights_proj (and, in V4, its own
compressor) in BF16: an undercount of about 44M BF16-vs-FP8 bytes on V4-Flash's 160 GB.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nanoseek.calc.flops import decode_flops_per_token, prefill_flops_per_token
from nanoseek.calc.gpus import GPU
from nanoseek.calc.kv import DTYPE_BYTES, check_dtype, kv_bytes_per_token, kv_cache_bytes, kv_read_bytes, uniform_dtypes
from nanoseek.calc.params import block_params, count_params, ffn_params, mtp_extra_params
from nanoseek.config import ConfigError, ModelConfig

QUANTISED = ("attention", "indexer", "dense_ffn", "shared_experts", "routed_experts")  # FP8 in V3's release
FP8_BLOCK_SCALE = 4 / (128 * 128)  # bytes of FP32 scale per weight
FP4_BYTES = 0.5 + 1 / 32  # E2M1 plus one UE8M0 scale per 32 weights (V4's routed experts)


@dataclass
class Assumptions:
    qps: float
    prompt_tokens: int
    output_tokens: int
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    ttft_ms: float = 2000.0  # time-to-first-token target
    tpot_ms: float = 50.0  # time-per-output-token target (20 tokens/s per user)
    mfu: float = 0.4  # fraction of peak FLOP/s reached by prefill/decode matmuls
    bw_util: float = 0.7  # fraction of HBM bandwidth reached by decode
    mem_util: float = 0.9  # fraction of HBM usable for weights + KV (rest: activations, runtime)
    include_mtp: bool = False  # the MTP module's weights and its layers' KV (speculative decoding)

    def validate(self) -> None:
        for name in ("qps", "ttft_ms", "tpot_ms"):
            if not (0 < getattr(self, name) < math.inf):  # NaN fails both comparisons
                raise ConfigError(f"{name} must be a positive finite number, got {getattr(self, name)}")
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ConfigError(f"prompt_tokens and output_tokens must be >= 1, got "
                              f"{self.prompt_tokens} and {self.output_tokens}")
        for name in ("mfu", "bw_util", "mem_util"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        check_dtype(self.weight_dtype)
        check_dtype(self.kv_dtype)


def param_bytes(parts: dict[str, float], dtype: str, fp4_experts: bool = False) -> float:
    """Bytes of a by-component parameter count stored in `dtype` (FP8 as in V3's release;
    with fp4_experts, the routed experts in FP4 as in V4's)."""
    if dtype != "fp8":
        return sum(parts.values()) * DTYPE_BYTES[dtype]
    fp4 = parts.get("routed_experts", 0) if fp4_experts else 0
    q = sum(v for c, v in parts.items() if c in QUANTISED) - fp4
    rest = sum(parts.values()) - q - fp4
    return fp4 * FP4_BYTES + q * (1 + FP8_BLOCK_SCALE) + rest * DTYPE_BYTES["bf16"]


def weight_bytes(cfg: ModelConfig, dtype: str, include_mtp: bool = False) -> float:
    total = param_bytes(count_params(cfg).total, dtype, cfg.is_v4)
    if include_mtp:  # each module's own weights; it shares the embedding and head
        for k in range(cfg.num_nextn_predict_layers):
            block, _ = block_params(cfg, cfg.num_hidden_layers + k)
            extra = {"eh_proj_and_norms": mtp_extra_params(cfg)}  # BF16 in V3's release
            total += param_bytes({**block, **extra}, dtype, cfg.is_v4)
    return total


def expected_experts_touched(n_experts: int, top_k: int, tokens: float) -> float:
    """Distinct experts a batch of `tokens` tokens hits, routing uniform at random."""
    return n_experts * (1 - (1 - top_k / n_experts) ** tokens)


def weight_bytes_read_per_step(cfg: ModelConfig, dtype: str, batch: float) -> float:
    """Weights one decode step reads for `batch` tokens (main model; the embedding table is
    only looked up, so it is not read)."""
    pc = count_params(cfg)
    parts = dict(pc.activated, embeddings=0)
    if cfg.is_moe:
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        touched = expected_experts_touched(cfg.n_routed_experts, cfg.num_experts_per_tok, max(batch, 1))
        parts["routed_experts"] = moe_layers * touched * ffn_params(cfg.hidden_size, cfg.moe_intermediate_size)
    return param_bytes(parts, dtype, cfg.is_v4)


def kv_per_request(cfg: ModelConfig, a: Assumptions) -> tuple[float, float, float]:
    """(bytes per token, bytes held at full length, bytes one decode step reads at the mean
    context prompt + output/2) of one request's cache."""
    P, O = a.prompt_tokens, a.output_tokens
    if not (cfg.is_v32 or cfg.is_v4):
        tok = kv_bytes_per_token(cfg, dtype=a.kv_dtype, include_mtp=a.include_mtp)
        return tok, (P + O) * tok, (P + O / 2) * tok
    dt = uniform_dtypes(a.kv_dtype)
    held = kv_cache_bytes(cfg, P + O, dt, a.include_mtp)
    return held / (P + O), held, kv_read_bytes(cfg, math.floor(P + O / 2), dt, a.include_mtp)


@dataclass
class CapacityPlan:
    gpu: dict
    assumptions: dict
    latency_s: float
    concurrency: float
    weights_bytes: float
    kv_bytes_per_token: float  # V3.2/V4: the full-length cache / (prompt + output)
    kv_bytes: float  # all in-flight requests at full length
    decode_bytes_per_step: float
    decode_weight_bytes_per_step: float
    decode_kv_bytes_per_step: float
    prefill_flops_per_token: float
    decode_flops_per_token: float
    flops_per_s: float  # needed by the traffic
    gpus_for_memory: float
    gpus_for_decode_bandwidth: float
    gpus_for_compute: float
    gpus_for_ttft: float
    binding: str  # which need sets the count
    gpus: int
    nodes: int
    per_gpu_weights_bytes: float
    per_gpu_kv_bytes: float
    per_gpu_mem_fraction: float  # of the whole HBM
    decode_step_s: float  # at the planned GPU count
    prefill_s: float  # one prompt on the whole deployment
    output_tokens_per_s: float


def plan_capacity(cfg: ModelConfig, gpu: GPU, a: Assumptions) -> CapacityPlan:
    a.validate()
    if a.prompt_tokens + a.output_tokens > cfg.max_position_embeddings:
        raise ConfigError(f"prompt_tokens + output_tokens = {a.prompt_tokens + a.output_tokens} exceeds "
                          f"the model's context (max_position_embeddings={cfg.max_position_embeddings})")
    P, O = a.prompt_tokens, a.output_tokens
    latency = a.ttft_ms / 1e3 + O * a.tpot_ms / 1e3
    C = a.qps * latency
    w = weight_bytes(cfg, a.weight_dtype, a.include_mtp)
    kv_tok, seq_kv, read_kv = kv_per_request(cfg, a)
    kv = C * seq_kv
    mem = gpu.mem_gb * 1e9
    n_mem = (w + kv) / (mem * a.mem_util)

    avg_ctx = P + O / 2
    step_w = weight_bytes_read_per_step(cfg, a.weight_dtype, C)
    step_kv = C * read_kv
    bw = gpu.bw_tbs * 1e12 * a.bw_util
    n_bw = (step_w + step_kv) / (bw * a.tpot_ms / 1e3)

    pre, dec = prefill_flops_per_token(cfg, P), decode_flops_per_token(cfg, avg_ctx)
    flops_s = a.qps * (P * pre + O * dec)
    peak = gpu.tflops(a.weight_dtype) * 1e12 * a.mfu
    n_compute = flops_s / peak
    n_ttft = P * pre / (peak * a.ttft_ms / 1e3)

    needs = {"memory": n_mem, "decode bandwidth": n_bw, "compute": n_compute, "TTFT": n_ttft}
    binding = max(needs, key=needs.get)
    N = max(1, math.ceil(needs[binding] - 1e-9))
    return CapacityPlan(
        gpu=gpu.to_dict(), assumptions=asdict(a), latency_s=latency, concurrency=C,
        weights_bytes=w, kv_bytes_per_token=kv_tok, kv_bytes=kv,
        decode_bytes_per_step=step_w + step_kv, decode_weight_bytes_per_step=step_w,
        decode_kv_bytes_per_step=step_kv, prefill_flops_per_token=pre, decode_flops_per_token=dec,
        flops_per_s=flops_s, gpus_for_memory=n_mem, gpus_for_decode_bandwidth=n_bw,
        gpus_for_compute=n_compute, gpus_for_ttft=n_ttft, binding=binding, gpus=N,
        nodes=math.ceil(N / gpu.gpus_per_node), per_gpu_weights_bytes=w / N, per_gpu_kv_bytes=kv / N,
        per_gpu_mem_fraction=(w + kv) / N / mem, decode_step_s=(step_w + step_kv) / (N * bw),
        prefill_s=P * pre / (N * peak), output_tokens_per_s=a.qps * O)
