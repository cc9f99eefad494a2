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
FP8 weights follow DeepSeek-V3's checkpoint: the Linear weights of attention and the FFNs
in FP8 plus one FP32 scale per 128x128 block; embeddings, head, norms and router in BF16.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nanoseek.calc.flops import decode_flops_per_token, prefill_flops_per_token
from nanoseek.calc.gpus import GPU
from nanoseek.calc.kv import DTYPE_BYTES, check_dtype, kv_bytes_per_token
from nanoseek.calc.params import block_params, count_params, ffn_params
from nanoseek.config import ConfigError, ModelConfig

QUANTISED = ("attention", "dense_ffn", "shared_experts", "routed_experts")  # FP8 in V3's release
FP8_BLOCK_SCALE = 4 / (128 * 128)  # bytes of FP32 scale per weight


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


def param_bytes(parts: dict[str, float], dtype: str) -> float:
    """Bytes of a by-component parameter count stored in `dtype` (FP8 as in V3's release)."""
    if dtype != "fp8":
        return sum(parts.values()) * DTYPE_BYTES[dtype]
    q = sum(v for c, v in parts.items() if c in QUANTISED)
    return q * (1 + FP8_BLOCK_SCALE) + (sum(parts.values()) - q) * DTYPE_BYTES["bf16"]


def weight_bytes(cfg: ModelConfig, dtype: str, include_mtp: bool = False) -> float:
    total = param_bytes(count_params(cfg).total, dtype)
    if include_mtp:  # each module's own weights; it shares the embedding and head
        D = cfg.hidden_size
        for k in range(cfg.num_nextn_predict_layers):
            block, _ = block_params(cfg, cfg.num_hidden_layers + k)
            extra = {"eh_proj": 2 * D * D, "mtp_norms": 3 * D}  # BF16 in V3's release
            total += param_bytes({**block, **extra}, dtype)
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
    return param_bytes(parts, dtype)


@dataclass
class CapacityPlan:
    gpu: dict
    assumptions: dict
    latency_s: float
    concurrency: float
    weights_bytes: float
    kv_bytes_per_token: int
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
    kv_tok = kv_bytes_per_token(cfg, dtype=a.kv_dtype, include_mtp=a.include_mtp)
    kv = C * (P + O) * kv_tok
    mem = gpu.mem_gb * 1e9
    n_mem = (w + kv) / (mem * a.mem_util)

    avg_ctx = P + O / 2
    step_w = weight_bytes_read_per_step(cfg, a.weight_dtype, C)
    step_kv = C * avg_ctx * kv_tok
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
