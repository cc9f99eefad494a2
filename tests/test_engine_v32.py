"""DeepSeek-V3.2 through the paged engine: the indexer keys are paged beside the latents, and
greedy outputs equal CausalLM.generate and transformers' DeepseekV32ForCausalLM through
chunked prefill, prefix-cache hits, preemption and MTP speculation."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from nanoseek.calc.kv import cache_terms, dtype_name, kv_bytes_per_token, kv_cache_bytes, uniform_dtypes
from nanoseek.config import preset
from nanoseek.engine import LLM, SamplingParams
from nanoseek.engine.cache import BatchView, PagedLatentCache
from nanoseek.engine.engine import LLMEngine
from nanoseek.model import CausalLM
from nanoseek.model.attention import MLA
from nanoseek.model.dsa import LightningIndexer
from tests.conftest import randomize
from tests.test_engine import OracleDraftEngine, token_ids
from tests.test_v32 import per_expert

pytestmark = pytest.mark.usefixtures("one_thread")

N = 10                                   # tokens generated per prompt
GREEDY = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
TOPK = 16                                # every prompt is longer: attention is sparse throughout


def small_v32_config(**kw):
    """tiny-v32 shrunk to 2 layers of width 64 and vocab 256, keeping 16 indexer heads (exact
    ties of I straddling the top-k boundary stay rare; dsa.top_k_mask) and one MTP layer."""
    return preset("tiny-v32", vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_group=2,
                  topk_group=1, index_n_heads=16, index_head_dim=16, index_topk=TOPK,
                  max_position_embeddings=512, **kw)


@pytest.fixture(scope="module")
def hf_and_model():
    """transformers' model with random weights large enough for clear argmaxes, and nanoseek's
    with the same weights (its MTP layer, which transformers does not build, stays random)."""
    cfg = small_v32_config()
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")}
    hf = randomize(transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**d)).eval())
    torch.manual_seed(0)  # the MTP layer's weights, whatever ran before this module
    model = CausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in per_expert(hf.state_dict()).items() if v.numel() > 0}, strict=False)
    assert not unexpected and missing and all(k.startswith("mtp.") for k in missing)
    return hf, model


@pytest.fixture(scope="module")
def model(hf_and_model):
    return hf_and_model[1]


@pytest.fixture(scope="module")
def load():
    """32 prompts of 17..100 tokens: the longer ones take several 24-token prefill chunks, and
    the last four share a 40-token prefix (5 blocks of 8), so later ones hit the prefix cache."""
    g = torch.Generator().manual_seed(1)
    lengths = [17, 25, 33, 63] + torch.randint(17, 101, (24,), generator=g).tolist()
    own = [torch.randint(3, 256, (L,), generator=g).tolist() for L in lengths]
    shared = torch.randint(3, 256, (40,), generator=g).tolist()
    return own + [shared + torch.randint(3, 256, (L,), generator=g).tolist() for L in (1, 5, 9, 20)]


def generate_refs(model, load) -> list[list[int]]:
    return [model.generate(torch.tensor([p]), N)[0, len(p):].tolist() for p in load]


@pytest.fixture(scope="module")
def refs(model, load):
    return generate_refs(model, load)


def test_the_references_agree_and_are_sparse(hf_and_model, load, refs):
    """CausalLM.generate equals transformers' greedy generate on the same weights, and the
    top-k selection matters: the same model attending densely generates something else."""
    hf, model = hf_and_model
    with torch.no_grad():
        ref_hf = [hf.generate(torch.tensor([p]), max_new_tokens=N, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist() for p in load]
    assert ref_hf == refs
    dense = copy.deepcopy(model)
    for m in dense.modules():
        if isinstance(m, LightningIndexer):
            m.index_topk = 10 ** 9
    assert generate_refs(dense, load) != refs
    assert min(len(p) for p in load) > TOPK


@pytest.mark.parametrize("speculative", [False, True])
def test_greedy_equals_generate_with_chunks_and_prefix_hits(model, load, refs, speculative):
    llm = LLM(model, kv_cache_memory=2**22, block_size=8, max_num_batched_tokens=24, max_num_seqs=8,
              speculative=speculative)
    first = llm.generate(load[:-3], GREEDY, use_tqdm=False)  # the first shared-prefix prompt fills the cache
    rest = llm.generate(load[-3:], GREEDY, use_tqdm=False)
    assert token_ids(first + rest) == refs
    assert max(len(p) for p in load) > 24  # a prompt longer than a step's token budget: chunked
    assert [o.num_cached_tokens for o in rest] == [40, 40, 40]
    if speculative:
        assert llm.engine.spec_stats.drafted > 0
        mtp_keys = llm.engine.cache.index_k[model.config.num_hidden_layers]
        assert mtp_keys.abs().sum() > 0, "the MTP layer's indexer keys were never written"
    llm.engine.block_manager.check()


def test_staggered_arrivals_batch_continuously(model, load, refs):
    engine = LLMEngine(model, None, kv_cache_memory=2**22, block_size=4, max_num_batched_tokens=32,
                       max_num_seqs=8, speculative=False, enable_prefix_caching=False)
    seqs = [engine.add_request(load[0], GREEDY)]
    for p in load[1:]:
        engine.step()
        seqs.append(engine.add_request(p, GREEDY))
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == refs


@pytest.mark.parametrize("speculative", [False, True])
def test_preemption_and_recompute_change_nothing(model, load, refs, speculative):
    cfg = model.config
    per_token = PagedLatentCache.bytes_per_token(cfg, cfg.num_hidden_layers + speculative, torch.float32)
    longest = max(len(p) for p in load) + N
    llm = LLM(model, kv_cache_memory=per_token * (longest + 16), block_size=4, max_num_batched_tokens=32,
              max_num_seqs=8, speculative=speculative)
    engine = llm.engine
    assert engine.cache.capacity_tokens < 2 * longest
    assert token_ids(llm.generate(load, GREEDY, use_tqdm=False)) == refs
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_accepted_and_rejected_drafts_keep_the_output(model, load, refs):
    """Drafts right two times in three (OracleDraftEngine): the accept path (two tokens from
    one forward, the second row's top-k over a context that includes the draft) and the
    roll-back path both run, in a roomy and in a preempting cache."""
    cfg = model.config
    tiny = PagedLatentCache.bytes_per_token(cfg, cfg.num_hidden_layers + 1, torch.float32) * (
        max(len(p) for p in load) + N + 16)
    for memory in (2**22, tiny):
        engine = OracleDraftEngine(model, None, kv_cache_memory=memory, block_size=4, max_num_batched_tokens=24,
                                   max_num_seqs=8, speculative=True)
        engine.truth = {tuple(p): p + r for p, r in zip(load, refs)}
        seqs = [engine.add_request(p, GREEDY) for p in load]
        while engine.has_unfinished():
            engine.step()
        assert [s.output_token_ids for s in seqs] == refs
        assert 0 < engine.spec_stats.accepted < engine.spec_stats.drafted
        assert (engine.scheduler.num_preemptions > 0) == (memory == tiny)


def test_bf16_engine_pages_bf16_keys_and_follows_bf16_generate(model, load):
    """bf16 rounds differently in a batched, paged forward than in generate's, so a near tie
    may flip a token: most first tokens agree."""
    bf16_model = copy.deepcopy(model)
    llm = LLM(bf16_model, dtype="bfloat16", kv_cache_memory="4MiB", speculative=True)
    cache = llm.engine.cache
    assert cache.kv[0].dtype == cache.index_k[0].dtype == torch.bfloat16
    outs = token_ids(llm.generate(load, GREEDY, use_tqdm=False))
    ref = [bf16_model.generate(torch.tensor([p]), 1)[0, -1].item() for p in load]
    assert all(len(o) == N for o in outs)
    assert sum(o[0] == r for o, r in zip(outs, ref)) >= 6


def test_fp8_weights_serve_as_generate_does(model, load):
    """FP8 projection weights (the indexer's wq_b and wk included, as DeepSeek ships them):
    the engine generates what the same quantised model's generate does."""
    fp8 = copy.deepcopy(model)
    llm = LLM(fp8, quantization="fp8", kv_cache_memory="4MiB", block_size=8, max_num_batched_tokens=24, max_num_seqs=4,
              speculative=False)
    assert type(fp8.model.layers[0].self_attn.indexer.wq_b).__name__ == "FP8Linear"
    assert token_ids(llm.generate(load[:4], GREEDY, use_tqdm=False)) == generate_refs(fp8, load[:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("speculative", [False, True])
def test_bytes_per_token_equal_calc_kv_for_the_tiny_v32_preset(dtype, speculative):
    cfg = preset("tiny-v32")
    llm = LLM(CausalLM(cfg), dtype=dtype, kv_cache_memory="8MiB", speculative=speculative)
    engine, cache = llm.engine, llm.engine.cache
    assert len(cache.index_k) == len(cache.kv) == cfg.num_hidden_layers + speculative
    tokens = cache.capacity_tokens
    measured = engine.stats()["kv_cache_bytes"]
    assert measured % tokens == 0
    name = dtype_name(dtype)
    assert measured // tokens == kv_bytes_per_token(cfg, dtype=name, include_mtp=speculative)
    assert measured // tokens == PagedLatentCache.bytes_per_token(cfg, len(cache.kv), dtype)
    for L in (1024, 8192, 32768):
        assert kv_cache_bytes(cfg, L, uniform_dtypes(name), include_mtp=speculative) == L * measured // tokens
    # per kind: the latent and the indexer keys, as calc kv's terms name them
    terms = {t.name: t.bytes for t in cache_terms(cfg, tokens, uniform_dtypes(name), include_mtp=speculative)}
    kinds = engine.stats()["kv_cache_bytes_by_kind"]
    assert kinds == {"latent": terms["MLA latent c_KV + k_pe"], "indexer": terms["indexer keys"]}
    assert kinds["indexer"] > 0


def test_batch_view_pages_the_indexer_keys():
    cfg = small_v32_config()
    cache = PagedLatentCache(cfg, num_blocks=6, block_size=4, num_layers=1, dtype=torch.float32)
    assert cache.index_k[0].shape == (6, 4, cfg.index_head_dim)
    view = BatchView(cache, [[2, 5], [1]], starts=[5, 0], q_lens=[2, 3], absorb=True)
    c_kv, k_pe, index_k = torch.randn(2, 3, 32), torch.randn(2, 3, 8), torch.randn(2, 3, cfg.index_head_dim)
    (c_all, pe_all, ik_all), mask = view.update(0, c_kv, k_pe, index_k)
    assert ik_all.shape == (2, 7, cfg.index_head_dim) and mask.shape == (2, 3, 7)
    assert torch.equal(ik_all[0, 5:7], index_k[0, :2]) and torch.equal(ik_all[1, :3], index_k[1])
    assert torch.equal(c_all[0, 5:7], c_kv[0, :2]) and torch.equal(pe_all[1, :3], k_pe[1])
    flat = cache.index_k[0].view(-1, cfg.index_head_dim)
    assert torch.equal(flat[5 * 4 + 1], index_k[0, 0]) and torch.equal(flat[4], index_k[1, 0])
    assert flat[23].abs().sum() == 0  # the padding row wrote nothing
    with pytest.raises(ValueError, match="layer 0.*indexer keys.*update got none"):
        view.update(0, c_kv, k_pe)


def test_gather_reads_the_top_k_latents_through_the_block_table():
    """update_index_keys writes what update writes but returns only the indexer keys; gather
    returns, for each query's positions, the rows update's full read has there."""
    cfg = small_v32_config()
    g = torch.Generator().manual_seed(0)
    new = [torch.randn(2, 3, d, generator=g) for d in (32, 8, cfg.index_head_dim)]
    caches, outs = [], []
    for method in ("update", "update_index_keys"):
        cache = PagedLatentCache(cfg, num_blocks=6, block_size=4, num_layers=1, dtype=torch.float32)
        cache.kv[0].normal_(generator=torch.Generator().manual_seed(1))  # earlier tokens' latents
        view = BatchView(cache, [[2, 5], [1]], starts=[5, 0], q_lens=[2, 3], absorb=True)
        outs.append(getattr(view, method)(0, *new))
        caches.append(cache)
    (c_all, pe_all, ik_all), mask = outs[0]
    (ik_only,), mask_only = outs[1]
    assert torch.equal(caches[0].kv[0], caches[1].kv[0]) and torch.equal(caches[0].index_k[0], caches[1].index_k[0])
    assert torch.equal(ik_only, ik_all) and torch.equal(mask_only, mask)
    idx = torch.tensor([[[6, 0, 3], [5, 6, 1]], [[2, 0, 1], [0, 1, 2]]])
    c_kv, k_pe = view.gather(0, idx)
    assert c_kv.shape == (2, 2, 3, 32) and k_pe.shape == (2, 2, 3, 8)
    for b in range(2):
        for s in range(2):
            assert torch.equal(c_kv[b, s], c_all[b, idx[b, s]]) and torch.equal(k_pe[b, s], pe_all[b, idx[b, s]])
    assert c_kv[0, 0, 0].abs().sum() > 0 and torch.equal(c_kv[0, 1, 1], new[0][0, 1])


def test_engine_decode_gathers_the_top_k_and_equals_the_masked_path(model, monkeypatch):
    """Two sequences in scattered blocks, prefilled, then decoded one token per step and one
    step of two rows (a speculative verification): each decode layer reads index_topk latents
    per query through `gather`, never all of them through `update`, and the logits equal the
    masked path's over every cached latent (fp32, to 1e-6 of the largest logit)."""
    cfg = model.config
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 256, (L,), generator=g).tolist() for L in (30, 21)]
    steps = [[[t] for t in torch.randint(3, 256, (2,), generator=g).tolist()] for _ in range(3)]
    steps.append([torch.randint(3, 256, (2,), generator=g).tolist(), [7]])  # rows of 2 and 1 (padding)
    tables = [[7, 2, 9, 4, 11, 0, 5, 13], [1, 12, 3, 10, 6, 8]]
    reads = []

    def run():
        cache = PagedLatentCache(cfg, num_blocks=14, block_size=4, num_layers=cfg.num_hidden_layers,
                                 dtype=torch.float32)
        starts, out = [0, 0], []
        for rows, absorb in [(prompts, False)] + [(step, True) for step in steps]:
            view = BatchView(cache, tables, starts, [len(r) for r in rows], absorb)
            S = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (S - len(r)) for r in rows])
            with torch.no_grad():
                logits = model(ids, view.positions, view)
            if absorb:
                out.append(logits[0])  # sequence 0's rows are all real
            starts = [st + len(r) for st, r in zip(starts, rows)]
        return torch.cat(out)

    full_update = BatchView.update
    monkeypatch.setattr(BatchView, "update", lambda self, *a: (reads.append(("update", self.absorb)),
                                                               full_update(self, *a))[1])
    gather = BatchView.gather
    monkeypatch.setattr(BatchView, "gather", lambda self, layer, idx: (reads.append(("gather", idx.shape[2])),
                                                                      gather(self, layer, idx))[1])
    gathered = run()
    assert set(reads) == {("update", False), ("gather", TOPK)}
    assert reads.count(("gather", TOPK)) == len(steps) * cfg.num_hidden_layers
    with monkeypatch.context() as m:
        m.setattr(MLA, "reads_top_k", lambda self, cache: False)
        masked = run()
    assert (gathered - masked).abs().max().item() <= 1e-6 * masked.abs().max().item()
    assert masked.abs().max() > 0.5
