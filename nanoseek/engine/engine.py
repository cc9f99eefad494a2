"""The engine core: requests in, one scheduler step at a time, tokens out.

`LLMEngine.step()` is nano-vllm's schedule -> run -> postprocess: the scheduler picks the
batch (decodes first, then prefill chunks); the runner does all the model work — the
forwards, sampling, and with speculation the MTP draft verification and the next drafts
(engine/spec.py) — and returns one `SeqOutput` per sequence; the scheduler's postprocess
applies them (tokens, stop checks, blocks). State flows one way. `LLM` (offline) and
`AsyncLLM` (server) are thin loops around it; engine/outputs.py turns sequences into
`RequestOutput`s, with text decoded incrementally.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from nanoseek.engine.block_manager import BlockManager
from nanoseek.engine.cache import budget_bytes
from nanoseek.engine.kv_cache import paged_cache_class
from nanoseek.engine.outputs import IncrementalDetokenizer
from nanoseek.engine.dtype import activation_dtype
from nanoseek.engine.runner import ModelRunner
from nanoseek.engine.sampler import SamplingParams, make_generator
from nanoseek.engine.scheduler import Scheduler
from nanoseek.engine.sequence import Sequence
from nanoseek.engine.spec import SpecStats
from nanoseek.engine.spec_policy import SpecPolicy
from nanoseek.engine.v4_blocks import V4BlockManager, window_blocks_needed
from nanoseek.engine.v4_cache import PagedV4Cache, aligned_block_size
from nanoseek.engine.weight_layout import LAYOUTS, apply_weight_layout
from nanoseek.model import CausalLM
from nanoseek.model.expert_stack import stack_experts
from nanoseek.text.tokenizer import Tokenizer


@dataclass
class EngineConfig:
    kv_cache_memory: str | float | None = None  # bytes (> 1, or '512MiB') or a fraction of free memory;
    #                                             None: 0.9 of free GPU memory, 0.05 of free CPU memory
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512    # token budget of one step (decodes + prefill chunks)
    enable_prefix_caching: bool = True
    speculative: bool | None = None      # None: on when the model has MTP layers
    spec_max_batch: int = 16             # MTP drafts only while the engine holds at most this many requests
    max_model_len: int | None = None     # default: max_position_embeddings
    weight_layout: str = "auto"          # CPU linear weights: "auto" (timed), "k-major", "as-loaded"

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)} must be >= 1")
        if self.weight_layout not in LAYOUTS:
            raise ValueError(f"EngineConfig.weight_layout={self.weight_layout!r}: expected one of {list(LAYOUTS)}")


def vision_side(model, image_processor=None):
    """(what handles images: a vision.VisionPrompts, the language model) of the model the
    engine is given: (None, model) for a CausalLM. A vision-language model's language model
    is paged as its attention needs (MLA latents, or MHA/GQA keys and values): DeepSeek-VL
    (engine/vision.py) and DeepSeek-OCR-2 (engine/vision_ocr2.py). The vision modules (and
    transformers' towers) are imported only for such a model."""
    if isinstance(model, CausalLM):
        return None, model
    from nanoseek.model.vl.vl_load import language_model
    lm = language_model(model)
    if type(model).__name__ == "DeepseekOCR2":
        from nanoseek.engine.vision_ocr2 import OCR2Prompts
        return OCR2Prompts(model, image_processor), lm
    from nanoseek.engine.vision import VisionPrompts
    return VisionPrompts(model, image_processor), lm


def split_prompt(prompt) -> tuple[str | list[int], list | None]:
    """A request's prompt -> (text or token ids, its images or None)."""
    if not isinstance(prompt, dict):
        return prompt, None
    unknown = set(prompt) - {"prompt", "prompt_token_ids", "images"}
    if unknown or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise ValueError(f"a prompt dict has one of 'prompt' (text) and 'prompt_token_ids', and "
                         f"optionally 'images'; got keys {sorted(prompt)}")
    return prompt.get("prompt", prompt.get("prompt_token_ids")), prompt.get("images")


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer=None, config: EngineConfig | None = None,
                 image_processor=None, **kw):
        """model: a CausalLM, or a DeepSeek-VL model (its prompts may carry images:
        engine/vision.py; `image_processor` preprocesses them, default the model's)."""
        self.config = config = config or EngineConfig(**kw)
        self.vision, model = vision_side(model.eval(), image_processor)
        self.model, self.tokenizer = model, Tokenizer.of(tokenizer)
        # CPU decode's few-row GEMMs: the layout of the linear weights (values unchanged)
        self.weight_layout = apply_weight_layout(model, config.weight_layout)
        # CPU inference: each MoE layer's experts as two grouped GEMMs, not a loop (model/expert_stack.py)
        self.stacked_moe_layers = stack_experts(model)
        cfg = model.config
        self.device = next(model.parameters()).device
        has_mtp = len(model.mtp) > 0
        if config.speculative and not has_mtp:
            raise ValueError("speculative=True needs a checkpoint with MTP layers (num_nextn_predict_layers >= 1)")
        # V4's MTP block is served when its attention is a sliding window (every published V4's):
        # a compressed one would need its compressors' state rolled back with each rejected draft
        compressed_mtp = cfg.is_v4 and bool(cfg.compress_rate(cfg.mtp_layer_type))
        if compressed_mtp and config.speculative:
            raise ValueError(f"speculative decoding serves a DeepSeek-V4 MTP block with sliding-window attention; "
                             f"this one's is {cfg.mtp_layer_type!r}: leave speculation off (--no-speculative)")
        self.speculative = (has_mtp and not compressed_mtp) if config.speculative is None else config.speculative
        num_layers = cfg.num_hidden_layers + (1 if self.speculative else 0)
        dtype = activation_dtype(model)  # the cache follows the model: bf16 halves its bytes per token
        max_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        # No point holding more blocks than max_num_seqs full-length sequences can use.
        enough = config.max_num_seqs * -(-max_len // config.block_size) + 1
        budget = budget_bytes(config.kv_cache_memory or (0.9 if self.device.type == "cuda" else 0.05), self.device)
        if cfg.is_v4:
            self.cache, self.block_manager = self._v4_cache(cfg, config, budget, dtype, max_len, num_layers)
        else:
            self.cache = paged_cache_class(cfg).from_budget(cfg, budget, config.block_size, num_layers, dtype,
                                                            self.device, max_blocks=enough)
            self.block_manager = BlockManager(self.cache.num_blocks, config.block_size, config.enable_prefix_caching)
        eos = set(cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else
                  [] if cfg.eos_token_id is None else [cfg.eos_token_id])
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   min(max_len, self.cache.capacity_tokens), eos)
        self.runner = ModelRunner(model, self.cache, self.speculative, SpecPolicy(max_batch=config.spec_max_batch),
                                  self.vision)
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()

    def _v4_cache(self, cfg, config: EngineConfig, budget: int, dtype, max_len: int, num_layers: int):
        """DeepSeek-V4's pools and two block spaces (engine/v4_cache.py, v4_blocks.py). The
        block size is raised to a multiple of every compression rate if it is not one."""
        bs = aligned_block_size(cfg, config.block_size)
        windows = window_blocks_needed(cfg.sliding_window, bs, config.max_num_seqs, config.max_num_batched_tokens)
        enough = config.max_num_seqs * -(-max_len // bs) + 1
        cache = PagedV4Cache.from_budget(cfg, budget, bs, windows, dtype, self.device, max_blocks=enough,
                                         num_layers=num_layers)
        return cache, V4BlockManager(cache.num_blocks, windows, bs, cfg.sliding_window, config.enable_prefix_caching)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        """prompt: text, token ids, or {"prompt" | "prompt_token_ids": ..., "images": [...]}
        (a vision-language engine's images: PIL images, text/images.LoadedImage or pixel
        values, one placeholder run, or one placeholder, per image: engine/vision.py)."""
        params = params or SamplingParams()
        prompt, images = split_prompt(prompt)
        if images is not None and self.vision is None:
            raise ValueError("this engine serves a text-only model: a prompt with images needs a "
                             "vision-language checkpoint (DeepSeek-VL)")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer (tokenizer.json): give prompts as token-id lists")
            prompt_text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, ids = None, [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.model.config.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        detok = IncrementalDetokenizer(self.tokenizer, params) if self.tokenizer is not None else None
        ids, prompt_images = self.vision.prepare(ids, images) if self.vision is not None else (ids, [])
        seq = Sequence(request_id, ids, params, prompt=prompt_text, generator=make_generator(params, self.device),
                       detokenizer=detok, images=prompt_images)
        self.scheduler.add(seq)
        self.requests[request_id] = seq
        return seq

    def preprocess_images(self, prompt):
        """The prompt with its images preprocessed (pixel values, content hashes, OCR-2's tiles)
        once, for several requests of it: the n samples of one prompt preprocess once, and a
        server does it in a worker thread. Any other prompt is returned as it is."""
        _, images = split_prompt(prompt)
        if images is None or self.vision is None:
            return prompt
        return {**prompt, "images": self.vision.images(images)}

    def abort(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq, "abort")

    @property
    def spec_stats(self) -> SpecStats:
        """MTP drafts verified / accepted so far (zeros without speculation)."""
        return self.runner.spec.stats if self.runner.spec is not None else SpecStats()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def max_model_len(self) -> int:
        """The longest prompt + output one request may have: the model's context (or
        EngineConfig.max_model_len), capped by what the KV cache holds."""
        return self.scheduler.max_model_len

    def reset_stats(self, spec_policy: SpecPolicy | None = None) -> None:
        """Zero the counters `stats()` reports (forwards, preemptions, prefix-cache hits and
        queries, MTP drafts) and restart the drafting policy (`spec_policy`, or a fresh one
        like the current), so that a measurement after a warm-up counts only itself."""
        self.runner.forwards = self.scheduler.num_preemptions = 0
        self.block_manager.hits = self.block_manager.queries = 0
        spec = self.runner.spec
        if spec is not None:
            spec.stats.drafted = spec.stats.accepted = 0
            spec.policy = spec_policy or SpecPolicy(max_batch=spec.policy.max_batch)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block's hash. Call after changing the model's weights (e.g.
        between GRPO updates): cached latents were computed by the old weights."""
        self.block_manager.reset_prefix_cache()

    def stats(self) -> dict:
        """Gauges and counters for /metrics and logs."""
        bm, sch = self.block_manager, self.scheduler
        return {"running": len(sch.running), "waiting": len(sch.waiting),
                "kv_blocks_total": bm.num_blocks, "kv_blocks_used": bm.num_used,
                "kv_cache_usage": bm.num_used / bm.num_blocks, "kv_cache_bytes": self.cache.nbytes,
                "kv_cache_bytes_by_kind": self.cache.nbytes_by_kind(),
                "kv_cache_bytes_used_by_kind": self.bytes_used_by_kind(),
                "prefix_cache_queries": bm.queries, "prefix_cache_hits": bm.hits,
                "preemptions": sch.num_preemptions, "forwards": self.runner.forwards,
                "spec_drafted": self.spec_stats.drafted, "spec_accepted": self.spec_stats.accepted}

    def bytes_used_by_kind(self) -> dict[str, int]:
        """Bytes of the blocks requests hold, per cache kind. V4's window rows and carry are in
        window blocks, its compressed entries and indexer keys in main blocks."""
        bm, kinds = self.block_manager, self.cache.nbytes_by_kind()
        window = {"window", "compressor_state"} if isinstance(bm, V4BlockManager) else set()
        spaces = {k: bm.window if k in window else bm for k in kinds}
        return {k: v * spaces[k].num_used // spaces[k].num_blocks for k, v in kinds.items()}

    # ---------------------------------------------------------------------- step
    def step(self) -> list[Sequence]:
        """Run one scheduler step; return the sequences that produced tokens or finished."""
        batch = self.scheduler.schedule(self.speculative)
        if not batch and self.scheduler.has_work():  # cannot happen by construction; never spin
            raise RuntimeError(f"the scheduler cannot make progress: {len(self.scheduler.waiting)} waiting, "
                               f"{self.block_manager.num_free}/{self.block_manager.num_blocks} blocks free")
        outs = self.runner.run(batch.decodes, batch.prefills, self.scheduler.load)
        touched = self.scheduler.postprocess(batch.decodes, batch.prefills, outs)
        for seq in touched:
            if seq.finished:
                self.requests.pop(seq.request_id, None)
        return touched
