"""The DeepSeek-V3 model: MLA, DeepSeekMoE, MTP."""

from nanoseek.model.cache import ContiguousCache
from nanoseek.model.transformer import CausalLM, LossOutput

__all__ = ["CausalLM", "ContiguousCache", "LossOutput"]
