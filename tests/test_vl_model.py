"""DeepSeek-VL in nanoseek (nanoseek/model/vl/) against transformers' DeepseekVLForConditionalGeneration.

Tiny checkpoints are written by transformers with random weights (SigLIP tower, Llama or
DeepSeek-V2/V3 text model); nanoseek loads them and gives the same logits (fp32, <= 1e-5),
saves them back for transformers to read, and preprocesses images as the processor does.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DeepseekVLConfig, DeepseekVLProcessor, PreTrainedTokenizerFast
from transformers import DeepseekVLForConditionalGeneration as HFVL

import nanoseek
from nanoseek.checkpoint.hf import CheckpointError
from nanoseek.engine.llm import load_model
from nanoseek.model import CausalLM, ContiguousCache
from nanoseek.model.vl import DeepseekVLForConditionalGeneration, VLConfig
from nanoseek.model.vl.vl_checkpoint import half_to_pairs, pairs_to_half
from nanoseek.model.vl.vl_image import ImagePreprocessError, image_processor, preprocess
from nanoseek.model.vl.vl_layout import ImageTokenError, expand_image_placeholders

IMG = 5  # the image placeholder token
T = 16  # image tokens per image: (32 / 8)^2 SigLIP patches
VISION = dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=40, num_hidden_layers=1,
              num_attention_heads=2, image_size=32, patch_size=8)
LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0)
MLA_MOE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
               kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
               num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
               n_shared_experts=1, max_position_embeddings=128)
TOL = 1e-5


def hf_model(text: dict, tie: bool = True) -> HFVL:
    """A transformers DeepSeek-VL with random weights big enough that a wrong mapping shows."""
    torch.manual_seed(0)
    model = HFVL(DeepseekVLConfig(text_config=text, vision_config=VISION, image_token_id=IMG,
                                  tie_word_embeddings=tie)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def inputs():
    """Two prompts, an image each at a different place, and their pixels."""
    ids = torch.tensor([[1, 7, 8] + [IMG] * T + [9, 10, 11],
                        [1, 12] + [IMG] * T + [13, 14, 15, 16]])
    torch.manual_seed(1)
    return ids, torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def llama_ckpt(request, tmp_path_factory):
    model = hf_model(LLAMA, tie=request.param)
    path = tmp_path_factory.mktemp("vl")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    """DeepseekVLConfig's default: lm_head tied to embed_tokens."""
    model = hf_model(LLAMA)
    path = tmp_path_factory.mktemp("vl_tied")
    model.save_pretrained(path)
    return model, path


def hf_logits(model, ids, px):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=px).logits


def test_logits_equal_transformers(llama_ckpt):
    hf, path = llama_ckpt
    ids, px = inputs()
    ns = DeepseekVLForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        got = ns(ids, pixel_values=px)
    want = hf_logits(hf, ids, px)
    assert want.abs().max() > 1  # the weights say something
    assert (got - want).abs().max() <= TOL


def test_saved_checkpoint_loads_in_transformers(llama_ckpt, tmp_path):
    hf, path = llama_ckpt
    ids, px = inputs()
    ns = DeepseekVLForConditionalGeneration.from_pretrained(path)
    ns.save_pretrained(tmp_path)
    back = HFVL.from_pretrained(tmp_path).eval()
    assert (hf_logits(back, ids, px) - hf_logits(hf, ids, px)).abs().max() <= TOL
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["DeepseekVLForConditionalGeneration"]
    again = DeepseekVLForConditionalGeneration.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids, pixel_values=px), ns(ids, pixel_values=px))


def test_greedy_generation_equals_transformers(tied_ckpt):
    hf, path = tied_ckpt
    ids, px = inputs()
    ns = DeepseekVLForConditionalGeneration.from_pretrained(path)
    want = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False,
                       attention_mask=torch.ones_like(ids))
    assert torch.equal(ns.generate(ids, px, max_new_tokens=6), want)


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_mla_moe_text_model(model_type, tmp_path):
    """A DeepSeek-V2/V3 text_config (MLA, DeepSeekMoE) loads, matches and saves back too."""
    hf = hf_model({"model_type": model_type, **MLA_MOE})
    hf.save_pretrained(tmp_path / "hf")
    ids, px = inputs()
    ns = DeepseekVLForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert ns.config.text.attention_type == "mla" and ns.config.text.is_moe
    with torch.no_grad():
        assert (ns(ids, pixel_values=px) - hf_logits(hf, ids, px)).abs().max() <= TOL
    ns.save_pretrained(tmp_path / "ns")
    back = HFVL.from_pretrained(tmp_path / "ns").eval()
    assert (hf_logits(back, ids, px) - hf_logits(hf, ids, px)).abs().max() <= TOL


def test_engine_interface_chunked_prefill_with_cache(tied_ckpt):
    """Image features computed once, a prompt prefilled in two chunks (the image split between
    them, each chunk given its own feature rows), then a decode step: the full forward's logits."""
    _, path = tied_ckpt
    ns = DeepseekVLForConditionalGeneration.from_pretrained(path)
    ids, px = inputs()
    ids, px = ids[:1], px[:1]
    with torch.no_grad():
        feats = ns.encode_images(px)
        assert feats.shape == (1, T, 32)
        full = ns(ids, image_features=feats)
        cache = ContiguousCache(1, ids.shape[1])
        cut, rows = 10, feats.reshape(-1, 32)
        n_first = int((ids[:, :cut] == IMG).sum())
        a = ns(ids[:, :cut], image_features=rows[:n_first], cache=cache)
        b = ns(ids[:, cut:], image_features=rows[n_first:], cache=cache)
        embeds = ns.embed(ids, feats)
    assert (torch.cat([a, b], 1) - full).abs().max() <= TOL
    with torch.no_grad():
        assert (ns(inputs_embeds=embeds) - full).abs().max() <= TOL


def test_placeholders_and_features_must_match(tied_ckpt):
    _, path = tied_ckpt
    ns = DeepseekVLForConditionalGeneration.from_pretrained(path)
    ids, px = inputs()
    with pytest.raises(ImageTokenError, match="32 image placeholder token.*16 image feature row"):
        ns(ids, pixel_values=px[:1])
    with pytest.raises(ImageTokenError, match="no image given"):
        ns(ids)


def test_text_only_through_the_loaders(tied_ckpt):
    """nanoseek.from_pretrained picks the VL class; the engine's loader serves text with its
    language model; CausalLM.from_pretrained says where to go."""
    hf, path = tied_ckpt
    vl = nanoseek.from_pretrained(path)
    assert isinstance(vl, DeepseekVLForConditionalGeneration)
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    lm, _ = load_model(path, dtype=torch.float32)
    assert isinstance(lm, CausalLM)
    with torch.no_grad():
        assert (lm(ids) - want).abs().max() <= TOL
    with pytest.raises(CheckpointError, match="vision-language checkpoint"):
        CausalLM.from_pretrained(path)


def test_rope_pair_permutation_is_a_bijection():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)
    p = half_to_pairs(w, 8)
    assert torch.equal(p[1], w[4]) and torch.equal(p[2], w[1])  # row 2i+1 = i + d/2
    assert torch.equal(pairs_to_half(p, 8), w)


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("change, match", [
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "llama3"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"sliding_window": 8}, "sliding_window"),
])
def test_llama_configs_nanoseek_cannot_build_are_refused(change, match):
    d = {"model_type": "deepseek_vl", "text_config": {**LLAMA, **change}, "vision_config": VISION,
         "image_token_id": IMG}
    with pytest.raises(ValueError, match=match):
        VLConfig.from_dict(d)


def test_other_towers_and_tokens_are_refused():
    base = {"model_type": "deepseek_vl", "text_config": LLAMA, "vision_config": VISION}
    with pytest.raises(ValueError, match="SigLIP"):
        VLConfig.from_dict({**base, "vision_config": {"model_type": "clip_vision_model"}})
    with pytest.raises(ValueError, match="image_token_id"):
        VLConfig.from_dict({**base, "image_token_id": 100015})  # outside the 64-token vocabulary
    with pytest.raises(ValueError, match="text_config.model_type 'qwen2'"):
        VLConfig.from_dict({**base, "text_config": {"model_type": "qwen2"}})


# ---------------------------------------------------------- image preprocessing
def tiny_processor(path):
    """transformers' DeepseekVLProcessor with a word-level tokenizer, saved to `path`."""
    vocab = {f"w{i}": i for i in range(60) if i != IMG} | {"<image_placeholder>": IMG, "<unk>": 60}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                  extra_special_tokens={"image_token": "<image_placeholder>"})
    proc = DeepseekVLProcessor(image_processor=image_processor(image_size=32), tokenizer=tok,
                               num_image_tokens=T)
    proc.save_pretrained(path)
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(path)


def test_preprocessing_equals_the_processor(tmp_path):
    """Pixels equal AutoProcessor's for wide, tall, small and square images, and the prompt's
    placeholder expands to the same run of image tokens."""
    proc = tiny_processor(tmp_path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((20, 50), (70, 9), (5, 5), (32, 32), (64, 64))]
    ours = preprocess(images, image_processor(tmp_path))
    for im, px in zip(images, ours):
        out = proc(text="w1 w7 <image_placeholder> w9", images=[im], return_tensors="pt")
        assert torch.equal(px, out["pixel_values"][0])
    assert out["input_ids"][0].tolist() == expand_image_placeholders([1, 7, IMG, 9], IMG, T)
    cfg = VLConfig.from_dict({"model_type": "deepseek_vl", "text_config": LLAMA, "vision_config": VISION,
                              "image_token_id": IMG})
    assert cfg.image_tokens == proc.num_image_tokens
    grey = Image.fromarray(rng.integers(0, 256, (12, 30), dtype=np.uint8))
    assert torch.equal(preprocess([grey], proc.image_processor)[0],
                       proc(text="<image_placeholder>", images=[grey.convert("RGB")], return_tensors="pt")["pixel_values"][0])


def test_preprocessing_bounds():
    proc = image_processor(image_size=32)
    im = Image.new("RGB", (8, 8))
    with pytest.raises(ImagePreprocessError, match="max_images"):
        preprocess([im] * 3, proc, max_images=2)
    with pytest.raises(ImagePreprocessError, match="max_pixels"):
        preprocess([Image.new("RGB", (100, 100))], proc, max_pixels=99 * 100)
    with pytest.raises(ImagePreprocessError, match="not a PIL image"):
        preprocess([np.zeros((8, 8, 3))], proc)


def test_published_size_names_and_parameter_count():
    """At DeepSeek-VL 1.3B's shapes (SigLIP-L/16 at 384 px, a 24-layer Llama of width 2048),
    built on the meta device: one checkpoint name per transformers tensor, the same count."""
    text = dict(model_type="llama", vocab_size=102400, hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                max_position_embeddings=16384)
    vision = dict(model_type="siglip_vision_model", hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=24, num_attention_heads=16, image_size=384, patch_size=16)
    d = {"model_type": "deepseek_vl", "text_config": text, "vision_config": vision}
    with torch.device("meta"):
        hf = HFVL(DeepseekVLConfig(**d))
        ns = DeepseekVLForConditionalGeneration(VLConfig.from_dict(d))
    from nanoseek.model.vl.vl_checkpoint import to_disk
    cfg = ns.config
    ours = {to_disk(n, cfg): tuple(p.shape) for n, p in ns.state_dict().items()
            if not (cfg.tie_word_embeddings and n == "language_model.lm_head.weight")}
    theirs = {n: tuple(p.shape) for n, p in hf.state_dict().items() if n != "lm_head.weight"}
    assert ours == theirs
    assert cfg.image_tokens == 576
    count = sum(p.numel() for p in ns.parameters())  # tied: lm_head counted once
    assert count == sum(p.numel() for p in hf.parameters())


def test_vision_classes_by_architecture(tmp_path):
    from nanoseek.model.vl import vision_class
    from nanoseek.model.vl.ocr2_model import DeepseekOCR2
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekOcr2ForConditionalGeneration"]}))
    assert vision_class(tmp_path) is DeepseekOCR2
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_vl"}))
    assert vision_class(tmp_path) is DeepseekVLForConditionalGeneration
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"]}))
    assert vision_class(tmp_path) is None
