"""Images through the engine for MHA/GQA language models (engine/kv_cache.py): a DeepSeek-VL
whose language model is Llama-style GQA, and DeepSeek-OCR-2 (tiles, global view, view
separator; an MHA DeepSeekMoE) give the greedy tokens of their own `generate` under chunked
prefill, batching and prefix caching keyed by the image's content."""

import pytest
import torch
from PIL import Image, ImageDraw

from nanoseek.engine import LLM, SamplingParams
from nanoseek.engine.kv_cache import PagedKVCache
from tests.test_engine_vl import A, B, count_encodes, pixels, reference, run, vl_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)  # test_engine_vl.run's
LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def llama_vl():
    return vl_model(LLAMA)


def test_llama_vl_chunked_batched_prefix_hit(llama_vl, monkeypatch):
    """GQA keys and values paged; chunk edges inside images; the same picture hits its blocks."""
    calls = count_encodes(llama_vl, monkeypatch)
    llm = LLM(llama_vl, kv_cache_memory="2MiB", block_size=4, max_num_seqs=2, max_num_batched_tokens=8)
    assert isinstance(llm.engine.cache, PagedKVCache) and llm.engine.cache.n_kv_heads == 2
    got = run(llm, [{"prompt_token_ids": A, "images": [pixels(1)]},
                    {"prompt_token_ids": B, "images": [pixels(2), pixels(3)]}])
    assert sum(calls) == 3
    hits = llm.engine.block_manager.hits
    tail = A[:-1] + [20]
    got += run(llm, [{"prompt_token_ids": tail, "images": [pixels(1)]}])
    assert llm.engine.block_manager.hits - hits == 5 and sum(calls) == 3  # cached image: not encoded again
    monkeypatch.undo()
    assert got == [reference(llama_vl, A, [pixels(1)]), reference(llama_vl, B, [pixels(2), pixels(3)]),
                   reference(llama_vl, tail, [pixels(1)])]


# ------------------------------------------------------------------ DeepSeek-OCR-2
OCR_IMG = 100


@pytest.fixture(scope="module")
def ocr2():
    """tests/test_ocr2_model.py's tiny config (256-pixel global view, 192-pixel tiles: 256 and
    144 queries), random weights perturbed so the tokens depend on the picture."""
    pytest.importorskip("transformers")
    from nanoseek.model.vl.ocr2_config import from_hf_json
    from nanoseek.model.vl.ocr2_model import DeepseekOCR2
    from tests.test_ocr2_model import tiny_config
    torch.manual_seed(0)
    model = DeepseekOCR2(from_hf_json(tiny_config().to_dict())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if name.startswith("language") else 0.05))
    return model


def pictures():
    """A wide picture (tiled: 2 tiles) and a small one (the global view only)."""
    wide = Image.new("RGB", (300, 150), (240, 240, 230))
    ImageDraw.Draw(wide).ellipse((200, 20, 280, 140), outline=(200, 30, 30), width=5)
    small = Image.new("RGB", (90, 130), (20, 90, 160))
    ImageDraw.Draw(small).rectangle((10, 10, 50, 70), fill=(250, 250, 0))
    return wide, small


def ocr2_reference(model, processor, ids, images, n=GREEDY.max_tokens):
    px = processor(list(images))
    full = processor.expand_placeholders(ids, px["num_local_patches"], OCR_IMG)
    tokens = model.encode_images(px["pixel_values"], px.get("pixel_values_local"), px["num_local_patches"])
    return model.generate(torch.tensor([full]), tokens, max_new_tokens=n)[0, len(full):].tolist()


def test_ocr2_tiles_chunks_and_prefix_hits(ocr2, monkeypatch):
    """Two requests (a tiled image, then both images) prefilled 96 tokens a step, batched,
    each image encoded once; the same picture again hits the blocks it fills."""
    from nanoseek.engine.vision_ocr2 import OCR2Prompts
    wide, small = pictures()
    one, two = [1, 5, OCR_IMG, 7, 8], [1, 6, OCR_IMG, 9, OCR_IMG, 10, 11]
    llm = LLM(ocr2, kv_cache_memory="8MiB", block_size=16, max_num_seqs=2, max_num_batched_tokens=96)
    vision = llm.engine.vision
    assert isinstance(vision, OCR2Prompts) and vision.image_tokens([wide, small]) == [2 * 144 + 257, 257]
    calls = []
    encode = ocr2.encode_images
    monkeypatch.setattr(ocr2, "encode_images", lambda *a: (calls.append(a[0].shape[0]), encode(*a))[1])
    got = run(llm, [{"prompt_token_ids": one, "images": [wide]}, {"prompt_token_ids": two, "images": [small, wide]}])
    assert sum(calls) == 3 and llm.engine.runner.forwards > 10
    hits = llm.engine.block_manager.hits
    got += run(llm, [{"prompt_token_ids": one[:-1] + [12], "images": [wide.copy()]}])
    # 34 full blocks (positions 0..543) hit; the image's last 3 tokens (..546) lie past them, so the
    # chunk that computes them needs its features: encoded once more for this request
    assert llm.engine.block_manager.hits - hits == (2 + 2 * 144 + 257) // 16 and sum(calls) == 4
    monkeypatch.undo()
    want = [ocr2_reference(ocr2, vision.processor, one, [wide]),
            ocr2_reference(ocr2, vision.processor, two, [small, wide]),
            ocr2_reference(ocr2, vision.processor, one[:-1] + [12], [wide])]
    assert got == want
    assert want[0] != want[2] or want[0] != want[1]  # the tokens vary


def test_ocr2_refusals(ocr2):
    llm = LLM(ocr2, kv_cache_memory="8MiB", block_size=16, max_num_seqs=2, max_num_batched_tokens=96)
    wide, small = pictures()
    with pytest.raises(ValueError, match=r"1 image placeholder token\(s\).*for 2 image\(s\) taking \[545, 257\]"):
        llm.generate([{"prompt_token_ids": [1, OCR_IMG, 2], "images": [wide, small]}], use_tqdm=False)
    with pytest.raises(ValueError, match="takes images as pictures"):
        llm.generate([{"prompt_token_ids": [1, OCR_IMG, 2], "images": [torch.zeros(3, 256, 256)]}], use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_ocr2_checkpoint_directory(ocr2, tmp_path):
    """LLM(dir) of a DeepSeek-OCR-2 checkpoint keeps the vision side (engine/llm.py)."""
    from nanoseek.engine.vision_ocr2 import OCR2Prompts
    ocr2.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), kv_cache_memory="8MiB", block_size=16, max_num_batched_tokens=512)
    assert isinstance(llm.engine.vision, OCR2Prompts)
    _, small = pictures()
    got = run(llm, [{"prompt_token_ids": [1, 5, OCR_IMG, 7], "images": [small]}])
    assert got == [ocr2_reference(ocr2, llm.engine.vision.processor, [1, 5, OCR_IMG, 7], [small])]
