"""The inference engine: paged latent KV cache, continuous batching, prefix caching,
chunked prefill, MTP speculative decoding; `LLM` offline and `AsyncLLM` for servers."""

from nanoseek.engine.async_engine import AsyncLLM
from nanoseek.engine.engine import EngineConfig, LLMEngine
from nanoseek.engine.llm import LLM
from nanoseek.engine.outputs import CompletionOutput, RequestOutput
from nanoseek.engine.sampler import SamplingParams

__all__ = ["LLM", "AsyncLLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
