"""nanoseek: the DeepSeek-V3 stack, small enough to read in an afternoon."""

from nanoseek.config import ModelConfig, preset

__version__ = "0.1.0"


def __getattr__(name: str):
    """`nanoseek.CausalLM` on first use: importing the package (as `nanoseek --help` and the
    calculators do) must not import torch."""
    if name == "CausalLM":
        from nanoseek.model import CausalLM
        return CausalLM
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")


def from_pretrained(path, dtype=None, device=None, quantization=None):
    """Load an HF-format DeepSeek checkpoint directory (nanoseek-, transformers- or DeepSeek-written);
    quantization="fp8" keeps attention and FFN/expert weights in FP8 (FP8Linear).
    A vision-language checkpoint (DeepSeek-VL) gives its model (nanoseek/model/vl/)."""
    from nanoseek.checkpoint.hf import vision_checkpoint
    if vision_checkpoint(path):
        if quantization is not None:
            raise ValueError(f"{path}: quantization={quantization!r} is not supported for vision-language models")
        from nanoseek.model.vl.vl_load import vision_class
        return vision_class(path).from_pretrained(path, dtype=dtype, device=device)
    from nanoseek.model import CausalLM
    return CausalLM.from_pretrained(path, dtype=dtype, device=device, quantization=quantization)


def save_pretrained(model, path, dtype=None) -> None:
    """Write `model` as an HF-format checkpoint directory (config.json + safetensors) that
    transformers, vLLM and SGLang load (= `model.save_pretrained(path, dtype=dtype)`)."""
    from nanoseek.checkpoint.hf import save_pretrained as _save
    _save(model, path, dtype=dtype)


__all__ = ["CausalLM", "ModelConfig", "from_pretrained", "preset", "save_pretrained", "__version__"]
