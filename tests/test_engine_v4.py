"""DeepSeek-V4 through the paged engine: greedy outputs equal transformers' DeepseekV4ForCausalLM
(and CausalLM.generate) for 32 prompts of mixed lengths, through chunked prefill that crosses
windows mid-chunk, prefix-cache hits that end on a window boundary and mid-window, preemption
and recompute, MTP speculation (accepted and rolled-back drafts), bf16 and FP8 weights; window
blocks are released as the window slides."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from nanoseek.engine import LLM, SamplingParams
from nanoseek.engine.engine import LLMEngine
from nanoseek.engine.v4_blocks import window_span
from nanoseek.engine.v4_cache import PagedV4Cache, aligned_block_size
from nanoseek.engine.v4_decode import DecodeView
from nanoseek.model import CausalLM
from tests.conftest import randomize
from tests.test_engine import OracleDraftEngine, token_ids
from tests.test_v4_model import hf_to_ours, random_tid2eid, v4_config

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8                                    # tokens generated per prompt
GREEDY = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
BS = 16                                  # block size: one HCA window (m' = 16), four CSA windows (m = 4)


@pytest.fixture(scope="module")
def hf_and_model():
    """transformers' V4 with random weights and nanoseek's with the same (its MTP block, which
    transformers does not build, stays random: the engine does not speculate for V4)."""
    torch.manual_seed(0)
    cfg = v4_config(max_position_embeddings=512)
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")}
    hf = randomize(transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**d))).eval()
    random_tid2eid(hf, cfg.n_routed_experts, cfg.num_experts_per_tok)
    model = CausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(hf_to_ours(hf.state_dict()), strict=False)
    assert not unexpected and all(k.startswith("mtp.") for k in missing)
    return hf, model


@pytest.fixture(scope="module")
def model(hf_and_model):
    return hf_and_model[1]


@pytest.fixture(scope="module")
def load():
    """32 prompts of 1..150 tokens (up to 9 sliding windows, 37 CSA entries, 9 HCA entries):
    the longer ones take several 24-token prefill chunks, each ending at a different offset
    within the windows."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 151, (32,), generator=g).tolist()
    lengths[:4] = [1, 15, 16, 150]
    return [torch.randint(3, 97, (L,), generator=g).tolist() for L in lengths]


def generate_refs(model, prompts) -> list[list[int]]:
    return [model.generate(torch.tensor([p]), N)[0, len(p):].tolist() for p in prompts]


@pytest.fixture(scope="module")
def refs(model, load):
    return generate_refs(model, load)


def test_generate_equals_transformers_and_is_sparse(hf_and_model, load, refs):
    """The reference: CausalLM.generate equals transformers' greedy generate, and the longer
    prompts have more CSA entries than the indexer keeps."""
    hf, _ = hf_and_model
    with torch.no_grad():
        ref_hf = [hf.generate(torch.tensor([p]), max_new_tokens=N, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist() for p in load]
    assert ref_hf == refs
    assert max(len(p) for p in load) // 4 > hf.config.index_topk


def engine_kw(**kw):
    """Small blocks and a 24-token step: chunked prefill; no speculation unless asked for."""
    return {"kv_cache_memory": 2**22, "block_size": BS, "max_num_batched_tokens": 24, "max_num_seqs": 8,
            "speculative": False, **kw}


def test_greedy_equals_generate_with_chunked_prefill(model, load, refs):
    llm = LLM(model, **engine_kw())
    assert token_ids(llm.generate(load, GREEDY, use_tqdm=False)) == refs
    engine = llm.engine
    assert engine.stats()["forwards"] > len(load)
    engine.block_manager.check()
    assert engine.block_manager.window.num_free == engine.block_manager.window.num_blocks


def test_staggered_arrivals_batch_continuously(model, load, refs):
    engine = LLMEngine(model, None, **engine_kw(enable_prefix_caching=False))
    seqs = [engine.add_request(load[0], GREEDY)]
    for p in load[1:12]:
        engine.step()
        seqs.append(engine.add_request(p, GREEDY))
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == refs[:12]


@pytest.mark.parametrize("shared, hit", [(48, 48), (40, 32)])
def test_prefix_hits_on_a_window_boundary_and_mid_window(model, shared, hit):
    """A second prompt sharing `shared` tokens with the first: a prefix that ends on a block
    (= window) boundary is reused whole; one that ends mid-window is reused up to the last
    boundary before it and the rest computed. Outputs equal generate either way."""
    g = torch.Generator().manual_seed(shared)
    common = torch.randint(3, 97, (shared,), generator=g).tolist()
    prompts = [common + torch.randint(3, 97, (L,), generator=g).tolist() for L in (20, 7)]
    refs = generate_refs(model, prompts)
    llm = LLM(model, **engine_kw())
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    second = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert token_ids(first + second) == refs
    assert second[0].num_cached_tokens == hit
    llm.engine.block_manager.check()


def test_a_hit_waits_for_its_window_blocks(model):
    """A prefix whose window blocks were evicted is shortened to where they are still cached
    (here: to nothing), and the output is still right."""
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, 97, (64,), generator=g).tolist()
    llm = LLM(model, **engine_kw())
    llm.generate([prompt], GREEDY, use_tqdm=False)
    bm = llm.engine.block_manager
    bm.window.reset_prefix_cache()  # as if every window block had been reused
    again = llm.generate([prompt + [5]], GREEDY, use_tqdm=False)
    assert again[0].num_cached_tokens == 0
    assert token_ids(again) == generate_refs(model, [prompt + [5]])


def test_window_blocks_are_released_as_the_window_slides(model):
    """While a long request decodes, it holds the window blocks of its last n_win - 1 tokens
    only; its compressed blocks cover the whole sequence."""
    engine = LLMEngine(model, None, **engine_kw(enable_prefix_caching=False))
    seq = engine.add_request(list(range(3, 83)) * 2, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    bm = engine.block_manager
    held = []
    while engine.has_unfinished():
        engine.step()
        if not seq.finished:
            held.append(sum(w is not None for w in seq.window_table))
            assert len(seq.block_table) >= -(-seq.num_computed // bm.block_size)
    assert max(held) <= window_span(model.config.sliding_window, bm.block_size)
    assert bm.window.num_free == bm.window.num_blocks


def test_preemption_and_recompute_change_nothing(model, load, refs):
    cfg = model.config
    per = PagedV4Cache.block_bytes(cfg, BS, torch.float32)
    windows = engine_kw()["max_num_seqs"] * (window_span(cfg.sliding_window, BS) + 1) + 2
    main = per["compressed"] + per["indexer"]
    longest = max(len(p) for p in load) + N
    memory = windows * (per["window"] + per["compressor_state"]) + main * (-(-longest // BS) + 3)
    llm = LLM(model, **{**engine_kw(), "kv_cache_memory": memory})
    engine = llm.engine
    assert engine.cache.num_window_blocks == windows
    assert engine.cache.capacity_tokens < 2 * longest
    assert token_ids(llm.generate(load, GREEDY, use_tqdm=False)) == refs
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_block_size_is_raised_to_a_window_boundary(model):
    engine = LLMEngine(model, None, kv_cache_memory=2**22, block_size=6, speculative=False)
    assert aligned_block_size(model.config, 6) == 16 == engine.cache.block_size
    with pytest.raises(ValueError, match="multiple of every compression rate"):
        PagedV4Cache(model.config, 4, 4, 8, torch.float32)


@pytest.mark.parametrize("memory", [2**22, "tight"])
def test_accepted_and_rejected_drafts_keep_the_output(model, load, refs, memory):
    """MTP speculation (the MTP block is a sliding-window layer): drafts right two times in
    three (OracleDraftEngine), so verification keeps two tokens from one forward or rolls the
    draft back, also where the draft closes a compressor window (its entry and carry must not
    survive a reject), in a roomy cache and one that preempts."""
    if memory == "tight":
        cfg = model.config
        per = PagedV4Cache.block_bytes(cfg, BS, torch.float32, cfg.num_hidden_layers + 1)
        windows = 8 * (window_span(cfg.sliding_window, BS) + 1) + 2
        longest = max(len(p) for p in load) + N
        memory = windows * (per["window"] + per["compressor_state"]) + (per["compressed"] + per["indexer"]) * (
            -(-longest // BS) + 3)
    engine = OracleDraftEngine(model, None, **{**engine_kw(speculative=True), "kv_cache_memory": memory})
    assert engine.speculative and len(engine.cache.window) == model.config.num_hidden_layers + 1
    engine.truth = {tuple(p): p + r for p, r in zip(load, refs)}
    closing = []
    real_commit = DecodeView.commit

    def spy(view, keep):
        ends = (view.starts + view.q_lens).tolist()
        closing.extend(k < q and e % 4 == 0 for k, q, e in zip(keep, view.q_lens.tolist(), ends))
        return real_commit(view, keep)

    DecodeView.commit = spy
    try:
        seqs = [engine.add_request(p, GREEDY) for p in load]
        while engine.has_unfinished():
            engine.step()
    finally:
        DecodeView.commit = real_commit
    assert [s.output_token_ids for s in seqs] == refs
    assert 0 < engine.spec_stats.accepted < engine.spec_stats.drafted
    assert any(closing), "no rejected draft closed a CSA window"
    assert (engine.scheduler.num_preemptions > 0) == (memory != 2**22)


def test_real_mtp_drafts_keep_the_output(model, load, refs):
    """The model's own (random) MTP block drafts: whatever it proposes, the output is greedy's."""
    llm = LLM(model, **engine_kw(speculative=True))
    assert token_ids(llm.generate(load, GREEDY, use_tqdm=False)) == refs
    assert llm.engine.spec_stats.drafted > 0
    assert llm.engine.cache.window[model.config.num_hidden_layers].abs().sum() > 0  # the MTP layer's rows


def test_a_compressed_mtp_block_is_not_speculated(model):
    cfg = model.config
    compressed = CausalLM(v4_config(max_position_embeddings=512, mtp_layer_type=cfg.layer_types[2])).eval()
    assert LLMEngine(compressed, None, kv_cache_memory=2**22).speculative is False
    with pytest.raises(ValueError, match="sliding-window attention"):
        LLMEngine(compressed, None, kv_cache_memory=2**22, speculative=True)
    assert LLMEngine(model, None, kv_cache_memory=2**22).speculative is True


def test_bf16_engine_follows_bf16_generate(model, load):
    """bf16 rounds differently in chunks than in generate's one prefill, so a near tie may
    flip a token: most first tokens agree, and every pool but the fp32 carry is bf16."""
    bf16_model = copy.deepcopy(model)
    llm = LLM(bf16_model, dtype="bfloat16", **engine_kw())
    cache = llm.engine.cache
    assert cache.window[0].dtype == cache.entries[1].dtype == cache.index_k[1].dtype == torch.bfloat16
    assert cache.carry[1]["compressor"]["overlap_kv"].dtype == torch.float32
    outs = token_ids(llm.generate(load, GREEDY, use_tqdm=False))
    ref = [bf16_model.generate(torch.tensor([p]), 1)[0, -1].item() for p in load]
    assert all(len(o) == N for o in outs)
    assert sum(o[0] == r for o, r in zip(outs, ref)) >= 24


def test_fp8_weights_serve_as_generate_does(model, load):
    fp8 = copy.deepcopy(model)
    llm = LLM(fp8, quantization="fp8", **engine_kw())
    assert type(fp8.model.layers[1].self_attn.q_b_proj).__name__ == "FP8Linear"
    assert token_ids(llm.generate(load[:8], GREEDY, use_tqdm=False)) == generate_refs(fp8, load[:8])


def test_a_decode_step_is_one_batched_forward(model, load, refs, monkeypatch):
    """Every decoding sequence, each at its own length, goes through one forward per step
    (model/v4/decode.py over engine/v4_decode.py's DecodeView), and the outputs stay equal."""
    import nanoseek.model.v4.attention as attention
    batches = []
    real = attention.decode_attention

    def spy(attn, x, positions, state):
        batches.append(positions[:, 0].tolist())
        return real(attn, x, positions, state)

    monkeypatch.setattr(attention, "decode_attention", spy)
    llm = LLM(model, **engine_kw(enable_prefix_caching=False))
    assert token_ids(llm.generate(load[:8], GREEDY, use_tqdm=False)) == refs[:8]
    layers = model.config.num_hidden_layers
    assert max(len(b) for b in batches) >= 4 and len(batches) % layers == 0
    assert any(len(set(p % 16 for p in b)) >= 4 for b in batches)  # rows at different offsets in their windows


@pytest.mark.parametrize("shape, block_size", [
    (dict(sliding_window=40, compress_rate_csa=4, compress_rate_hca=8), 8),   # window spans 5+ blocks
    (dict(sliding_window=9, compress_rate_csa=2, compress_rate_hca=8), 4),    # block raised to 8
    (dict(sliding_window=16, compress_rate_csa=4, compress_rate_hca=16, index_topk=3), 48),  # block > window
])
def test_other_windows_rates_and_block_sizes(shape, block_size):
    """Windows longer and shorter than a block, other compression rates, a block size raised to
    a window boundary: greedy outputs equal generate, with speculation, and a prefix hit."""
    torch.manual_seed(0)
    model = randomize(CausalLM(v4_config(max_position_embeddings=512, **shape))).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 97, (L,), generator=g).tolist() for L in (1, 9, 41, 77, 200)]
    prompts.append(prompts[-1][:150] + [7, 8, 9])
    llm = LLM(model, kv_cache_memory=2**22, block_size=block_size, max_num_batched_tokens=20, max_num_seqs=5,
              speculative=True)
    outs = llm.generate(prompts[:-1], GREEDY, use_tqdm=False) + llm.generate(prompts[-1:], GREEDY, use_tqdm=False)
    assert token_ids(outs) == generate_refs(model, prompts)
    bs = llm.engine.cache.block_size
    assert outs[-1].num_cached_tokens == 150 // bs * bs > 0
    llm.engine.block_manager.check()
