"""The engine over MHA/GQA/MQA attention (engine/kv_cache.py): greedy outputs equal the
model's own generate under chunked prefill, batching, prefix hits and preemption."""

import pytest
import torch

from nanoseek.config import preset
from nanoseek.engine import LLM, SamplingParams
from nanoseek.engine.kv_cache import PagedKVCache
from nanoseek.model import CausalLM
from tests.test_engine import prompts, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def dense_model(attention_type: str, kv_heads: int, moe: bool = False, mtp: int = 0) -> CausalLM:
    """2 layers, 4 query heads, random weights big enough that the greedy tokens vary."""
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                 attention_type=attention_type, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8,
                 n_routed_experts=4, n_group=1, topk_group=1, num_nextn_predict_layers=mtp,
                 first_k_dense_replace=1 if moe else 2, max_position_embeddings=256, initializer_range=0.2)
    return CausalLM(cfg).eval()


def reference(model: CausalLM, ids: list[int], n: int = GREEDY.max_tokens) -> list[int]:
    return model.generate(torch.tensor([ids]), max_new_tokens=n)[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=[("mha", 4, True), ("gqa", 2, False), ("mqa", 1, False)],
                ids=["mha-moe", "gqa", "mqa"])
def model(request):
    return dense_model(*request.param)


def test_chunked_batched_prefix_hits_equal_generate(model):
    """Prompts of different lengths prefilled 8 tokens a step, batched; then prompts that
    share a 24-token prefix with the first ones hit its blocks; all equal generate."""
    load = prompts(5, seed=3, lo=5, hi=30, vocab=128)
    llm = LLM(model, kv_cache_memory="1MiB", block_size=4, max_num_seqs=3, max_num_batched_tokens=8)
    assert isinstance(llm.engine.cache, PagedKVCache)
    assert token_ids(llm.generate(load, GREEDY, use_tqdm=False)) == [reference(model, p) for p in load]
    shared = prompts(1, seed=4, lo=24, hi=25, vocab=128)[0]
    first = llm.generate([shared + [9, 10]], GREEDY, use_tqdm=False)
    hits = llm.engine.block_manager.hits
    more = [shared + t for t in ([11], [12, 13, 14])]
    outs = llm.generate(more, GREEDY, use_tqdm=False)
    assert llm.engine.block_manager.hits - hits == 12  # 6 full blocks of the shared prefix, twice
    assert [o.num_cached_tokens for o in outs] == [24, 24]
    assert token_ids(first + outs) == [reference(model, p) for p in [shared + [9, 10]] + more]


def test_preemption_equals_generate(model):
    """A cache for about one and a half requests: preemption and recompute, same tokens."""
    load = prompts(4, seed=5, lo=20, hi=30, vocab=128)
    cfg = model.config
    per_token = PagedKVCache.bytes_per_token(cfg, cfg.num_hidden_layers, torch.float32)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm = LLM(model, kv_cache_memory=per_token * 70, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    assert token_ids(llm.generate(load, params, use_tqdm=False)) == [reference(model, p, 16) for p in load]
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free == llm.engine.block_manager.num_blocks


def test_only_kv_heads_are_stored():
    """GQA's cache row holds its 2 KV heads, not the 4 query heads; MLA is refused here."""
    gqa = dense_model("gqa", 2).config
    assert PagedKVCache.bytes_per_token(gqa, 2, torch.float32) == 2 * 2 * (8 + 8) * 4
    mla = preset("tiny", num_hidden_layers=1)
    with pytest.raises(ValueError, match="per-head keys and values.*attention_type='mla'"):
        PagedKVCache(mla, 1, 4, 1, torch.float32)


def test_mtp_speculation_over_the_kv_cache():
    """A GQA model with an MTP layer: the MTP layer's keys and values get a cache layer of
    their own; speculative greedy decoding gives generate's tokens."""
    model = dense_model("gqa", 2, mtp=1)
    load = prompts(3, seed=6, lo=5, hi=20, vocab=128)
    llm = LLM(model, kv_cache_memory="1MiB", block_size=4, max_num_seqs=3, max_num_batched_tokens=16,
              speculative=True)
    assert len(llm.engine.cache.kv) == 3
    assert token_ids(llm.generate(load, GREEDY, use_tqdm=False)) == [reference(model, p) for p in load]
    assert llm.engine.spec_stats.drafted > 0
