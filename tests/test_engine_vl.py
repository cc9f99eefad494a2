"""Images through the engine (engine/vision.py): a tiny DeepSeek-VL with an MLA/MoE language
model served by `LLM`, greedy outputs equal to the model's own `generate` (which
tests/test_vl_model.py checks against transformers) under chunked prefill, batching and
prefix caching keyed by the image's content."""

import pytest
import torch
from PIL import Image

from nanoseek.engine import LLM, SamplingParams
from nanoseek.model.vl import DeepseekVLForConditionalGeneration, VLConfig

IMG = 5  # the image placeholder token
T = 16  # vision tokens per image: (32 / 8)^2 SigLIP patches
VISION = dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=40, num_hidden_layers=1,
              num_attention_heads=2, image_size=32, patch_size=8)
MLA_MOE = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48,
               moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
               n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
               n_shared_experts=1, max_position_embeddings=128)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def vl_model(text=MLA_MOE) -> DeepseekVLForConditionalGeneration:
    """Random weights large enough that the greedy tokens vary and depend on the image."""
    cfg = VLConfig.from_dict({"model_type": "deepseek_vl", "text_config": text, "vision_config": VISION,
                              "image_token_id": IMG})
    torch.manual_seed(0)
    model = DeepseekVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model():
    return vl_model()


def pixels(seed: int) -> torch.Tensor:
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference(model, ids: list[int], images: list[torch.Tensor], n: int = GREEDY.max_tokens) -> list[int]:
    """The model's own greedy generate (images encoded once, a contiguous cache)."""
    px = torch.stack(images) if images else None
    return model.generate(torch.tensor([ids]), px, max_new_tokens=n)[0, len(ids):].tolist()


def engine(model, **kw) -> LLM:
    kw = dict(kv_cache_memory="2MiB", block_size=4, max_num_seqs=2, max_num_batched_tokens=8) | kw
    return LLM(model, **kw)


def run(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def count_encodes(model, monkeypatch) -> list[int]:
    """How many images each encode_images call ran."""
    calls, encode = [], model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda px: (calls.append(px.shape[0]), encode(px))[1])
    return calls


A = [1, 7, 8] + [IMG] * T + [9, 10, 11]                    # an image at 3..18 (inside blocks 0..4)
B = [1, 12] + [IMG] * T + [13, 14] + [IMG] * T + [15, 16]   # two images, both across block edges


def test_chunked_batched_equal_generate(model, monkeypatch):
    """Two requests batched, prefilled 8 tokens a step (chunk edges inside the images):
    the model's generate's tokens, each image through the vision tower once."""
    calls = count_encodes(model, monkeypatch)
    llm = engine(model)
    got = run(llm, [{"prompt_token_ids": A, "images": [pixels(1)]},
                    {"prompt_token_ids": B, "images": [pixels(2), pixels(3)]}])
    assert llm.engine.runner.forwards > 2 * (len(B) // 8)  # the prompts did run in chunks
    monkeypatch.undo()
    assert got == [reference(model, A, [pixels(1)]), reference(model, B, [pixels(2), pixels(3)])]
    assert sum(calls) == 3 and llm.engine.vision.encoded == 3


def test_whole_prefill_and_one_placeholder_per_image(model):
    """A prompt with one placeholder per image is expanded to the image's run; a budget that
    takes the prompt whole gives the same tokens."""
    llm = engine(model, max_num_batched_tokens=128)
    short = [1, 7, 8, IMG, 9, 10, 11]
    assert run(llm, [{"prompt_token_ids": short, "images": [pixels(1)]}]) == [reference(model, A, [pixels(1)])]


def test_n_samples_preprocess_and_encode_their_image_once(model, monkeypatch):
    """One request of n samples: its picture is preprocessed once and, the samples prefilling
    together, run through the tower once; each sample still has its own PromptImage."""
    import nanoseek.engine.vision as vision
    vision_preprocess = vision.preprocess
    calls = count_encodes(model, monkeypatch)
    preprocessed = []
    monkeypatch.setattr(vision, "preprocess", lambda pil, proc: (preprocessed.append(len(pil)),
                                                                  vision_preprocess(pil, proc))[1])
    llm = engine(model, max_num_seqs=4, max_num_batched_tokens=256)
    picture = Image.new("RGB", (40, 30), (200, 30, 60))
    outs = llm.generate([{"prompt_token_ids": A, "images": [picture]}],
                        SamplingParams(temperature=1.0, seed=3, max_tokens=4, n=3), use_tqdm=False)
    assert len(outs[0].outputs) == 3
    assert preprocessed == [1] and calls == [1] and llm.engine.vision.encoded == 1


def test_prefix_hit_with_the_same_image(model, monkeypatch):
    """The same picture in a second request: its blocks hit, and an image wholly inside the
    cached blocks is not encoded again."""
    llm = engine(model)
    run(llm, [{"prompt_token_ids": A, "images": [pixels(1)]}])
    calls = count_encodes(model, monkeypatch)
    bm = llm.engine.block_manager
    hits = bm.hits
    other_tail = A[:-1] + [20]
    got = run(llm, [{"prompt_token_ids": other_tail, "images": [pixels(1)]}])
    monkeypatch.undo()
    assert bm.hits - hits == 5  # blocks 0..4 (positions 0..19) hold the image and the text before
    assert calls == []
    assert got == [reference(model, other_tail, [pixels(1)])]


def test_no_hit_with_another_image(model):
    """The same token ids over another picture never hit the first picture's blocks."""
    llm = engine(model)
    run(llm, [{"prompt_token_ids": A, "images": [pixels(1)]}])
    hits = llm.engine.block_manager.hits
    got = run(llm, [{"prompt_token_ids": A, "images": [pixels(4)]}])
    assert llm.engine.block_manager.hits == hits  # the image starts in block 0: nothing to share
    assert got == [reference(model, A, [pixels(4)])]
    # the first picture again, as a PIL image and as its pixels: one content hash each, both hit
    img = Image.fromarray((torch.rand(20, 24, 3, generator=torch.Generator().manual_seed(5)) * 255)
                          .to(torch.uint8).numpy())
    run(llm, [{"prompt_token_ids": A, "images": [img]}])
    hits = llm.engine.block_manager.hits
    run(llm, [{"prompt_token_ids": A, "images": [img.copy()]}])
    assert llm.engine.block_manager.hits == hits + 5


def test_preempted_request_keeps_its_features(model, monkeypatch):
    """A cache too small for both requests preempts one; its recompute reuses the features."""
    calls = count_encodes(model, monkeypatch)
    llm = engine(model, kv_cache_memory=12 * 4 * 2 * (16 + 4) * 4, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": A, "images": [pixels(1)]}, {"prompt_token_ids": A, "images": [pixels(6)]}]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20,
                                                                             ignore_eos=True), use_tqdm=False)]
    monkeypatch.undo()
    assert llm.engine.stats()["preemptions"] >= 1
    assert sum(calls) == 2
    assert got == [reference(model, A, [pixels(1)], 20), reference(model, A, [pixels(6)], 20)]


def test_features_live_as_long_as_the_request(model):
    """Held while the request runs, dropped when it finishes or is aborted."""
    eng = engine(model).engine
    seq = eng.add_request({"prompt_token_ids": A, "images": [pixels(1)]}, GREEDY)
    held = False
    while eng.has_unfinished():
        eng.step()
        held |= seq.images[0].features is not None
    assert held and seq.finished and seq.images[0].features is None
    seq = eng.add_request({"prompt_token_ids": A, "images": [pixels(2)]}, GREEDY)
    eng.step()
    eng.step()
    assert seq.images[0].features is not None
    eng.abort(seq.request_id)
    assert seq.images[0].features is None


def test_refusals(model):
    llm = engine(model)
    with pytest.raises(ValueError, match=r"prompt \(22 tokens, 16 of them for its 1 image\(s\)\) .* exceeds"):
        llm.generate([{"prompt_token_ids": A, "images": [pixels(1)]}],
                     SamplingParams(max_tokens=120), use_tqdm=False)
    with pytest.raises(ValueError, match="16 image placeholder token.*for 2 image"):
        llm.generate([{"prompt_token_ids": A, "images": [pixels(1), pixels(2)]}], use_tqdm=False)
    with pytest.raises(ValueError, match="16 image placeholder token.*for 0 image"):
        llm.generate([A], use_tqdm=False)
    with pytest.raises(ValueError, match=r"pixel values must be \[3, 32, 32\]"):
        llm.generate([{"prompt_token_ids": A, "images": [torch.zeros(3, 8, 8)]}], use_tqdm=False)
    nan = pixels(1).clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pixel values hold NaN or inf"):
        llm.generate([{"prompt_token_ids": A, "images": [nan]}], use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_text_only_models_are_refused(model):
    """(MHA/GQA language models take images too: tests/test_engine_vl_mha.py.)"""
    text = LLM(model.language_model, kv_cache_memory="2MiB")
    with pytest.raises(ValueError, match="text-only model: a prompt with images"):
        text.generate([{"prompt_token_ids": A, "images": [pixels(1)]}], use_tqdm=False)


def test_checkpoint_directory(model, tmp_path):
    """LLM(dir) of a DeepSeek-VL checkpoint keeps the vision side."""
    model.save_pretrained(tmp_path)
    llm = engine(str(tmp_path))
    assert run(llm, [{"prompt_token_ids": A, "images": [pixels(1)]}]) == [reference(model, A, [pixels(1)])]


def test_async_engine_streams_an_image_request(model):
    """AsyncLLM (the server's engine) takes the same prompt dict, LoadedImage included."""
    import asyncio

    from nanoseek.engine import AsyncLLM
    from nanoseek.text.images import LoadedImage, content_hash

    img = Image.new("RGB", (40, 30), (200, 10, 50))
    loaded = LoadedImage(img, content_hash(img), "data:image/png")

    async def main():
        eng = AsyncLLM(model, kv_cache_memory="2MiB", block_size=4, max_num_seqs=2, max_num_batched_tokens=8)
        try:
            outs = [o async for o in eng.generate({"prompt_token_ids": A, "images": [loaded]}, GREEDY)]
        finally:
            await eng.shutdown()
        return outs[-1].outputs[0].token_ids

    want = engine(model).engine.vision.processor
    px = torch.as_tensor(want(images=[img], return_tensors="pt")["pixel_values"][0]).float()
    assert asyncio.run(main()) == reference(model, A, [px])
