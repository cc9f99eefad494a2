"""nanoseek: the DeepSeek-V3 stack, small enough to read in an afternoon."""

from nanoseek.config import ModelConfig, preset
from nanoseek.model import CausalLM

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device=None) -> CausalLM:
    """Load an HF-format DeepSeek checkpoint directory (nanoseek-, transformers- or DeepSeek-written)."""
    from nanoseek.checkpoint import from_pretrained as _load
    return _load(path, dtype=dtype, device=device)


__all__ = ["CausalLM", "ModelConfig", "from_pretrained", "preset", "__version__"]
