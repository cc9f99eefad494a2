"""Vision-language models: vision encoders from transformers, DeepSeek's aligners, token compression and image-token layouts, nanoseek's language models."""

from nanoseek.model.vl.deepseek_vl import Aligner, DeepseekVLForConditionalGeneration
from nanoseek.model.vl.vl_config import VLConfig
from nanoseek.model.vl.vl_load import VISION_CLASSES, vision_class

__all__ = ["Aligner", "DeepseekVLForConditionalGeneration", "VLConfig", "VISION_CLASSES", "vision_class"]
