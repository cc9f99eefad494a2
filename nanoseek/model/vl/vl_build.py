"""A DeepSeek-VL model built around an existing text checkpoint: a named SigLIP tower (`tiny-vl`), a fresh aligner, the checkpoint's language model, and one new `<image_placeholder>` token.

DeepSeek-VL (Lu et al., 2024, §3) starts from a pretrained language model (DeepSeek-LLM)
and adds a vision encoder and the vision-language adaptor; the placeholder that stands for
an image is a token of its own. Here the same is done to any nanoseek text checkpoint with
an MLA language model (the engine pages MLA latents): the vocabulary grows by one row, the
placeholder, whose id is the old vocabulary size (its embedding the mean of the others, its
output row zero, so the text model's predictions are unchanged), and the tokenizer learns
the token as a special one, so decoding skips it. The MTP heads are dropped: transformers'
DeepSeek-VL builds none. The result saves as transformers' DeepseekVLForConditionalGeneration
(config.json `deepseek_vl`, a `deepseek_v3` text_config).

`tiny-vl` is sized for CPU training on the rendered_arithmetic pictures: 96 px images, 16 px
patches (36 image tokens), two SigLIP layers of width 128.
"""

from __future__ import annotations

import copy

import torch
from tokenizers import AddedToken

from nanoseek.model.vl.deepseek_vl import DeepseekVLForConditionalGeneration
from nanoseek.model.vl.vl_config import ARCHITECTURE, MODEL_TYPE, VLConfig
from nanoseek.text.chat_template import IMAGE_PLACEHOLDER

VISION_PRESETS: dict[str, dict] = {
    "tiny-vl": dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256,
                    num_hidden_layers=2, num_attention_heads=4, image_size=96, patch_size=16,
                    num_channels=3),
}


class VisionBuildError(ValueError):
    """A vision-language model cannot be built from this text model or preset."""


def vision_preset(name: str) -> dict:
    if name not in VISION_PRESETS:
        raise VisionBuildError(f"unknown vision preset {name!r}; choose one of {sorted(VISION_PRESETS)}")
    return dict(VISION_PRESETS[name])


def vl_config_for(text_config, vision: dict) -> VLConfig:
    """The VLConfig of `text_config` (a nanoseek ModelConfig) with one more vocabulary row,
    the image placeholder, and the SigLIP config `vision`."""
    if text_config.arch != "v3" or text_config.attention_type != "mla":
        raise VisionBuildError(f"the language model must be a V3-family MLA model (arch 'v3', "
                               f"attention 'mla'), got arch {text_config.arch!r}, attention "
                               f"{text_config.attention_type!r}")
    text = text_config.replace(vocab_size=text_config.vocab_size + 1, num_nextn_predict_layers=0).to_dict()
    text["model_type"] = "deepseek_v3"
    return VLConfig.from_dict({"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE],
                               "text_config": text, "vision_config": vision,
                               "image_token_id": text_config.vocab_size,
                               "tie_word_embeddings": bool(getattr(text_config, "tie_word_embeddings", False))},
                              source="vision preset")


def vl_from_text(text_model, tokenizer, preset: str = "tiny-vl", seed: int = 0):
    """(DeepSeek-VL model, tokenizer with `<image_placeholder>`) from a nanoseek CausalLM and
    its tokenizer: the language model's weights copied, the tower and aligner fresh."""
    cfg = vl_config_for(text_model.config, vision_preset(preset))
    torch.manual_seed(seed)
    model = DeepseekVLForConditionalGeneration(cfg)
    state = {k: v for k, v in text_model.state_dict().items() if not k.startswith("mtp.")}
    lm = model.language_model
    own = lm.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            if name not in own:
                raise VisionBuildError(f"text model tensor {name!r} has no place in the VL language model")
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                extra = t.mean(0, keepdim=True) if name.startswith("model.") else torch.zeros_like(t[:1])
                t = torch.cat([t, extra])
            own[name].copy_(t)
    lm.load_state_dict(own)
    return model.float().eval(), with_placeholder(tokenizer, cfg.image_token_id)


def with_placeholder(tokenizer, image_token_id: int):
    """A copy of `tokenizer` (transformers') knowing `<image_placeholder>` as `image_token_id`."""
    tok = copy.deepcopy(tokenizer)
    have = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if have is None or have == tok.unk_token_id:
        tok.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
        have = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if have != image_token_id:
        raise VisionBuildError(f"the tokenizer gives {IMAGE_PLACEHOLDER} id {have}, the model's "
                               f"image_token_id is {image_token_id} (the tokenizer's size must "
                               "equal the text model's vocabulary)")
    return tok
