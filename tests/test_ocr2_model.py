"""DeepSeek-OCR-2 (model/vl/ocr2_*.py) against transformers' DeepseekOcr2ForConditionalGeneration:
a tiny random checkpoint written by transformers gives the same vision tokens and logits in
nanoseek, nanoseek writes it back so transformers reads the same logits, and the pixels are
the image processor's."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

transformers = pytest.importorskip("transformers")
from transformers import AutoImageProcessor, DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration  # noqa: E402
from transformers.models.deepseek_ocr2.processing_deepseek_ocr2 import DeepseekOcr2Processor  # noqa: E402

from nanoseek.config import ConfigError  # noqa: E402
from nanoseek.model.cache import ContiguousCache  # noqa: E402
from nanoseek.model.vl import ocr2_weights  # noqa: E402
from nanoseek.model.vl.ocr2_config import from_hf_json  # noqa: E402
from nanoseek.model.vl.ocr2_model import DeepseekOCR2  # noqa: E402
from nanoseek.model.vl.ocr2_processor import OCR2ImageProcessor  # noqa: E402
from nanoseek.model.vl.ocr2_vision import hybrid_mask  # noqa: E402

IMAGE_ID = 100
# The published sizes scaled by 4 (SAM patch 4 instead of 16): a 256-pixel global view gives 256
# vision tokens and a 192-pixel tile 144, the query counts DeepEncoder V2 has.
SIZE, TILE, PATCH = 256, 192, 4


def tiny_config() -> DeepseekOcr2Config:
    return DeepseekOcr2Config(
        vision_config=dict(
            sam_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                            patch_size=PATCH, output_channels=16, downsample_channels=[16, 24], window_size=8,
                            global_attn_indexes=[1], mlp_dim=32),
            encoder_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                intermediate_size=48, max_position_embeddings=1024, vocab_size=8)),
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=16,
                         n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                         mlp_layer_types=["dense", "sparse", "sparse"], routed_scaling_factor=1.5,
                         max_position_embeddings=2048),
        image_token_id=IMAGE_ID)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A transformers-written checkpoint with every weight perturbed (SAM's position tables and
    rel-pos biases start at zero, which would hide a mistake in them)."""
    torch.manual_seed(0)
    ref = DeepseekOcr2ForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("ocr2")
    ref.save_pretrained(path)
    return path, ref


@pytest.fixture(scope="module")
def reference(checkpoint):
    """transformers' vision tokens and logits on the test prompt, computed once."""
    _, ref = checkpoint
    processor, px, ids = inputs()
    with torch.no_grad():
        feats = ref.model.get_image_features(px["pixel_values"], px["pixel_values_local"],
                                             px["num_local_patches"]).pooler_output
        logits = ref(input_ids=ids, **px).logits
    return SimpleNamespace(processor=processor, px=px, ids=ids, image_tokens=feats, logits=logits)


@pytest.fixture(scope="module")
def model(checkpoint):
    return DeepseekOCR2.from_pretrained(checkpoint[0])


def images() -> list[Image.Image]:
    """A wide image (tiled) and a small one (global view only), with some structure in them."""
    wide = Image.new("RGB", (300, 170), (240, 240, 230))
    d = ImageDraw.Draw(wide)
    d.text((10, 60), "12 + 34 = ?", fill=(0, 0, 0))
    d.ellipse((200, 20, 280, 150), outline=(200, 30, 30), width=5)
    small = Image.new("RGB", (90, 130), (20, 90, 160))
    ImageDraw.Draw(small).rectangle((10, 10, 50, 70), fill=(250, 250, 0))
    return [wide, small]


def prompt(processor: OCR2ImageProcessor, tiles: list[int]) -> torch.Tensor:
    ids = [1, 5, IMAGE_ID, 7, 8, IMAGE_ID, 9, 10, 11]
    return torch.tensor([processor.expand_placeholders(ids, tiles, IMAGE_ID)])


def inputs():
    processor = OCR2ImageProcessor(size=SIZE, tile_size=TILE, patch_size=PATCH)
    px = processor(images())
    return processor, px, prompt(processor, px["num_local_patches"])


def test_logits_match_transformers(model, reference):
    px, ids, processor = reference.px, reference.ids, reference.processor
    assert px["num_local_patches"][0] > 0 and px["num_local_patches"][1] == 0
    with torch.no_grad():
        tokens = model.encode_images(px["pixel_values"], px["pixel_values_local"], px["num_local_patches"])
        got = model(ids, tokens)
    assert [t.shape[0] for t in tokens] == [processor.num_image_tokens(n) for n in px["num_local_patches"]]
    for t, w in zip(tokens, reference.image_tokens):
        assert (t - w).abs().max() <= 1e-5
    assert (got - reference.logits).abs().max() <= 1e-5


def test_saved_checkpoint_reads_back_in_transformers(model, reference, tmp_path):
    model.save_pretrained(tmp_path)
    again = DeepseekOcr2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        logits = again(input_ids=reference.ids, **reference.px).logits
    assert (logits - reference.logits).abs().max() <= 1e-5
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_ocr2"


def test_pixels_and_placeholders_are_the_processors(tmp_path):
    """Pixels equal AutoImageProcessor's (from the same preprocessor_config.json) and the
    placeholder counts equal DeepseekOcr2Processor's, at the tiny and the published sizes."""
    for size, tile, patch in ((SIZE, TILE, PATCH), (1024, 768, 16)):
        ours = OCR2ImageProcessor(size=size, tile_size=tile, patch_size=patch)
        ours.image_processor.save_pretrained(tmp_path / str(size))
        auto = AutoImageProcessor.from_pretrained(tmp_path / str(size))
        pics = images() if size == SIZE else [im.resize((im.width * 4, im.height * 4)) for im in images()]
        got, want = ours(pics), auto(pics, return_tensors="pt")
        assert torch.equal(got["pixel_values"], want["pixel_values"])
        assert torch.equal(got["pixel_values_local"], want["pixel_values_local"])
        oracle = SimpleNamespace(image_processor=auto, patch_size=patch, downsample_ratio=4)
        for n in got["num_local_patches"]:
            assert ours.num_image_tokens(n) == DeepseekOcr2Processor._get_num_image_tokens(oracle, n)
    assert OCR2ImageProcessor().num_image_tokens(6) == 256 + 6 * 144 + 1
    clear = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # transparency: composited onto white, as transformers does
    clear.putpixel((3, 3), (0, 0, 0, 255))
    ours = OCR2ImageProcessor(size=SIZE, tile_size=TILE, patch_size=PATCH)
    assert torch.equal(ours([clear])["pixel_values"], ours.image_processor([clear], return_tensors="pt")["pixel_values"])


def test_bad_inputs_get_clear_errors(model):
    processor = OCR2ImageProcessor(size=SIZE, tile_size=TILE, patch_size=PATCH, max_pixels=100 * 100)
    with pytest.raises(ValueError, match="max_pixels"):
        processor([Image.new("RGB", (101, 100))])
    with pytest.raises(ValueError, match="2 image placeholders"):
        processor.expand_placeholders([IMAGE_ID, 3, IMAGE_ID], [0], IMAGE_ID)
    ids = torch.tensor([[1, IMAGE_ID, IMAGE_ID, 2]])
    with pytest.raises(ValueError, match="2 image placeholder tokens but the images give 3"):
        model(ids, [torch.zeros(3, 32)])
    with pytest.raises(ValueError, match="no image tokens"):
        model(ids)


@pytest.mark.parametrize("field, value, name", [
    ("attention_bias", True, "text_config.attention_bias"),
    ("mlp_layer_types", ["sparse", "dense", "sparse"], "text_config.mlp_layer_types"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, "text_config.rope_parameters"),
])
def test_what_does_not_map_is_refused(field, value, name):
    raw = copy.deepcopy(tiny_config().to_dict())
    raw["text_config"][field] = value
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        from_hf_json(raw)


def test_language_side_is_nanoseeks_mha_moe():
    cfg = from_hf_json(tiny_config().to_dict()).text
    assert (cfg.attention_type, cfg.num_key_value_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim) == ("gqa", 2, 0, 8)
    assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob, cfg.first_k_dense_replace) == (
        "softmax", "greedy", False, 1)


def test_rope_rows_round_trip_and_pair_halves():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)
    pairs = ocr2_weights.permute_rope_rows(w, 8)
    assert torch.equal(pairs[:2], w[[0, 4]]) and torch.equal(pairs[8:10], w[[8, 12]])
    assert torch.equal(ocr2_weights.permute_rope_rows(pairs, 8, inverse=True), w)


def test_hybrid_mask():
    """Visual tokens see each other both ways; queries see all visual tokens and earlier queries."""
    m = hybrid_mask(2, 3)
    assert m[:2].tolist() == [[True, True, False, False, False]] * 2
    assert m[2:].tolist() == [[True, True, True, False, False], [True, True, True, True, False], [True] * 5]


def test_greedy_generation_equals_transformers(checkpoint, model, reference):
    """Prefill with the images, then decode over the cache: the tokens of transformers' generate,
    and at every step transformers' logits."""
    _, ref = checkpoint
    px, ids = reference.px, reference.ids
    with torch.no_grad():
        tokens = model.encode_images(px["pixel_values"], px["pixel_values_local"], px["num_local_patches"])
        out = ref.generate(input_ids=ids, **px, max_new_tokens=3, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
        cache = ContiguousCache(1, out.sequences.shape[1], absorb=False)
        steps = [model(ids, tokens, cache=cache)[:, -1]]
        steps += [model(out.sequences[:, i:i + 1], cache=cache)[:, -1]
                  for i in range(ids.shape[1], out.sequences.shape[1] - 1)]
    assert (torch.stack(steps, 1) - torch.stack(out.logits, 1)).abs().max() <= 1e-5
    assert torch.equal(model.generate(ids, tokens, max_new_tokens=3), out.sequences)


def test_generate_takes_a_sampled_placeholder_id_as_text(checkpoint, reference):
    """A decode step that samples the `<image>` id feeds it back as a token, as transformers'
    generate does (no image follows the prompt), instead of asking for its image."""
    path, ref = checkpoint
    model, ref = DeepseekOCR2.from_pretrained(path), copy.deepcopy(ref)
    px, ids = reference.px, reference.ids
    with torch.no_grad():
        tokens = model.encode_images(px["pixel_values"], px["pixel_values_local"], px["num_local_patches"])
        first = int(model(ids, tokens)[0, -1].argmax())
        for w in (model.language.lm_head.weight, ref.lm_head.weight):  # the placeholder becomes the argmax
            w[[first, IMAGE_ID]] = w[[IMAGE_ID, first]]
        want = ref.generate(input_ids=ids, **px, max_new_tokens=3, do_sample=False)
    got = model.generate(ids, tokens, max_new_tokens=3)
    assert got[0, ids.shape[1]].item() == IMAGE_ID
    assert torch.equal(got, want)


def test_bf16_model_encodes_the_processors_fp32_pixels(checkpoint, reference):
    model = DeepseekOCR2.from_pretrained(checkpoint[0], dtype=torch.bfloat16)
    px = reference.px
    with torch.no_grad():
        tokens = model.encode_images(px["pixel_values"], px["pixel_values_local"], px["num_local_patches"])
    assert px["pixel_values"].dtype == torch.float32
    assert all(t.dtype == torch.bfloat16 and bool(t.isfinite().all()) for t in tokens)


def test_image_token_outside_the_vocabulary_is_refused():
    raw = tiny_config().to_dict()
    raw["image_token_id"] = 128
    with pytest.raises(ConfigError, match="image_token_id"):
        from_hf_json(raw)


def test_published_sizes_build_with_transformers_parameter_count():
    """DeepSeek-OCR-2's sizes (SAM ViT-B, a Qwen2-0.5B encoder, a 12-layer DeepSeekMoE with 64
    experts), built on the meta device: as many parameters as transformers' model, 3.39 B."""
    cfg = DeepseekOcr2Config(
        vision_config=dict(encoder_config=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                               num_attention_heads=14, num_key_value_heads=2)),
        text_config=dict(vocab_size=129280, hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896,
                         num_hidden_layers=12, num_attention_heads=10, n_routed_experts=64, n_shared_experts=2,
                         num_experts_per_tok=6, mlp_layer_types=["dense"] + ["sparse"] * 11,
                         max_position_embeddings=8192))
    with torch.device("meta"):
        ref = DeepseekOcr2ForConditionalGeneration(cfg)
        ours = DeepseekOCR2(from_hf_json(cfg.to_dict()))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) == 3_389_119_360
    names = [ocr2_weights.to_disk(k) for k in ours.state_dict()]
    assert len(set(names)) == len(names)


def test_nanoseek_from_pretrained_builds_ocr2(checkpoint):
    """nanoseek.from_pretrained picks the class by the config's architecture; the engine's text
    path gets its language model (model/vl/vl_load.py)."""
    import nanoseek
    from nanoseek.model.transformer import CausalLM
    from nanoseek.model.vl.vl_load import language_model

    model = nanoseek.from_pretrained(checkpoint[0])
    assert isinstance(model, DeepseekOCR2)
    assert isinstance(language_model(model), CausalLM)
