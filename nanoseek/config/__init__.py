"""Model configuration: the dataclass and its checks (model_config.py), the config.json
dialects it reads and writes (hf_json.py), and the named presets (presets.py)."""

from nanoseek.config.errors import ConfigError
from nanoseek.config.model_config import ModelConfig
from nanoseek.config.presets import PRESETS, preset

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "preset"]
