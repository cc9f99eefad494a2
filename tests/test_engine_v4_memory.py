"""The KV bytes the engine holds per cache kind equal `nanoseek calc kv` (V4 and V3.2, 1k, 8k
and 32k tokens), and a prompt the engine can never hold is refused alone.

How a sequence of L tokens is measured: at 8k and 32k a real request would take minutes of
prefill on a CPU, so `hold` places it the way the scheduler does (allocate on admission, then
per step reserve the window blocks of the next chunk, advance num_computed and register the
full blocks, which slides the window) and `LLMEngine.bytes_used_by_kind()` is read. At 1k a
real request runs through `LLM.generate` and the bytes are read between its steps.

What is compared, kind by kind (fp32 model and cache: `uniform_dtypes("fp32")`):
  * V4 "compressed" = calc's "CSA compressed entries" + "HCA compressed entries", and
    "indexer" = calc's "CSA indexer keys": exactly, L being a multiple of the block size.
  * V4 "window": calc counts min(L, n_win) rows per layer; the engine keeps the last
    n_win - 1 rows (the next query is the window's n_win-th) in whole window blocks and
    releases the blocks the window has left. So the engine's window bytes equal calc's rows
    rounded up to whole blocks of block_size rows, computed here from calc's term and the
    block size alone (not from v4_blocks.window_span).
  * V4 "compressor_state": the carry filed with each held window block (fp32): per CSA layer
    the open window's kv and score (m rows of 2·width each, width = head_dim for the
    entries' compressor, index_head_dim for the indexer's) and the overlap half (m rows of
    width each, kv and score); per HCA layer the open window (m' rows of head_dim, kv and
    score). calc's "open window" terms count DeepSeek's fixed buffers instead (2·coff·m rows
    of coff·width per compressor, whether a window is open or not), so they are not compared.
  * V3.2 "latent" and "indexer" = calc's "MLA latent c_KV + k_pe" and "indexer keys".
"""

from __future__ import annotations

import pytest
import torch

from nanoseek.calc.kv import cache_terms, dtype_name, uniform_dtypes
from nanoseek.config import preset
from nanoseek.config.model_config import CSA, HCA
from nanoseek.engine import LLM, SamplingParams
from nanoseek.engine.cache import PagedLatentCache
from nanoseek.engine.engine import LLMEngine
from nanoseek.engine.sequence import Sequence
from nanoseek.engine.v4_blocks import window_blocks_needed
from nanoseek.engine.v4_cache import PagedV4Cache
from nanoseek.model import CausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = (1024, 8192, 32768)
N = 4  # tokens generated per request in the refusal tests
GREEDY = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)


def v4_config(max_len: int = 4096, **kw):
    return preset("tiny-v4", max_position_embeddings=max_len, **kw)


def v32_config(max_len: int = 4096, **kw):
    return preset("tiny-v32", max_position_embeddings=max_len, **kw)


def engine_for(cfg, dtype=torch.float32, **kw) -> LLMEngine:
    torch.manual_seed(0)
    kw = {"kv_cache_memory": "96MiB", "max_num_seqs": 1, "speculative": False, **kw}
    return LLM(CausalLM(cfg), dtype=dtype, **kw).engine


def hold(engine: LLMEngine, L: int) -> Sequence:
    """A sequence whose L tokens are all computed, placed in the cache as the scheduler
    places a prompt: blocks on admission, then per step of at most max_num_batched_tokens
    the window blocks of the chunk (`reserve`), and after it the full blocks registered
    (which, for V4, releases the window blocks the window has left)."""
    bm, chunk = engine.block_manager, engine.config.max_num_batched_tokens
    seq = Sequence("held", torch.randint(3, 200, (L,)).tolist(), SamplingParams())
    seq.num_computed = bm.allocate(seq)
    while seq.num_computed < L:
        n = min(chunk, L - seq.num_computed)
        bm.reserve(seq, seq.num_computed + n)
        seq.num_computed += n
        bm.register_full_blocks(seq)
    return seq


def calc_terms(cfg, L: int, dtype, include_mtp: bool = False) -> dict:
    return {t.name: t for t in cache_terms(cfg, L, uniform_dtypes(dtype_name(dtype)), include_mtp=include_mtp)}


def v4_expected(cfg, L: int, block_size: int, dtype=torch.float32) -> dict[str, int]:
    """What one V4 sequence of L tokens holds per kind, from calc kv's terms (module docstring)."""
    terms = calc_terms(cfg, L, dtype)

    def summed(prefix):
        found = [t.bytes for name, t in terms.items() if name.startswith(prefix)]
        assert found, f"calc kv has no term {prefix!r}: {sorted(terms)}"
        return sum(found)

    win = terms["sliding window"]
    window_blocks = -(-win.entries // block_size)  # calc's min(L, n_win) rows, in whole blocks
    carry = 0  # fp32 bytes of the carry filed with one window block, all layers
    for i in range(cfg.num_hidden_layers):
        kind = cfg.layer_type(i)
        m = cfg.compress_rate(kind)
        if kind == CSA:
            carry += sum(4 * (2 * m * 2 * w + 2 * m * w) for w in (cfg.head_dim, cfg.index_head_dim))
        elif kind == HCA:
            carry += 4 * 2 * m * cfg.head_dim
    return {"window": win.layers * window_blocks * block_size * win.row_bytes,
            "compressed": summed("CSA compressed entries") + summed("HCA compressed entries"),
            "indexer": summed("CSA indexer keys"),
            "compressor_state": window_blocks * carry}


# ------------------------------------------------------------------ V4 bytes
@pytest.mark.parametrize("L", LENGTHS)
def test_v4_bytes_held_per_kind_equal_calc_kv(L):
    cfg = v4_config(L + 64)
    engine = engine_for(cfg)
    bs = engine.block_manager.block_size
    assert L % bs == 0 and L > cfg.sliding_window
    hold(engine, L)
    used = engine.stats()["kv_cache_bytes_used_by_kind"]
    expected = v4_expected(cfg, L, bs)
    assert used == expected
    assert engine.block_manager.num_used == L // bs  # one main block per block_size tokens
    assert engine.block_manager.window.num_used == 1  # the window left every other block
    # the window's rows are calc's min(L, n_win) rows per layer to the block here: n_win = bs
    assert used["window"] == calc_terms(cfg, L, torch.float32)["sliding window"].bytes


def test_v4_bf16_cache_holds_calc_kvs_bf16_bytes():
    """The cache follows the model's dtype: a bf16 model's entries and keys take calc's bf16
    bytes (the carry stays fp32, as DeepSeek keeps it)."""
    L = 8192
    cfg = v4_config(L + 64)
    engine = engine_for(cfg, dtype=torch.bfloat16)
    assert engine.cache.entries[1].dtype == torch.bfloat16
    hold(engine, L)
    used = engine.bytes_used_by_kind()
    assert used == v4_expected(cfg, L, engine.block_manager.block_size, torch.bfloat16)
    assert used["compressed"] * 2 == v4_expected(cfg, L, engine.block_manager.block_size)["compressed"]


def test_v4_block_size_32_keeps_one_window_block_of_32_rows():
    """With blocks of 32 tokens the window's 15 rows sit in one block of 32 rows: calc's 16
    rows rounded up to a block, twice calc's window bytes."""
    L = 1024
    cfg = v4_config(L + 64)
    engine = engine_for(cfg, block_size=32)
    hold(engine, L)
    used = engine.bytes_used_by_kind()
    assert used == v4_expected(cfg, L, 32)
    assert used["window"] == 2 * calc_terms(cfg, L, torch.float32)["sliding window"].bytes


def test_a_real_v4_request_holds_what_calc_kv_counts():
    """A 1k-token prompt through LLM.generate, prefilled in two chunks of 512: read between
    the steps, the bytes held right after the prefill (its first token sampled) equal calc kv's
    for 1k tokens and what `hold` places; once it finishes, nothing is held."""
    L = 1024
    cfg = v4_config()
    torch.manual_seed(0)
    llm = LLM(CausalLM(cfg), kv_cache_memory="64MiB", max_num_seqs=4, speculative=False)
    engine = llm.engine
    seen = []

    def step():
        touched = type(engine).step(engine)
        seq = next(iter(engine.requests.values()), None) or touched[0]
        seen.append((seq.num_computed, len(seq.output_token_ids), seq.finished,
                     engine.stats()["kv_cache_bytes_used_by_kind"]))
        return touched

    engine.step = step
    prompt = torch.randint(3, cfg.vocab_size, (L,), generator=torch.Generator().manual_seed(3)).tolist()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3
    after_prefill = [used for computed, n_out, done, used in seen if computed == L and n_out == 1 and not done]
    assert len(after_prefill) == 1, seen
    expected = v4_expected(cfg, L, engine.block_manager.block_size)
    assert after_prefill[0] == expected
    assert seen[-1][2] and set(seen[-1][3].values()) == {0}  # finished: every block released
    del engine.step
    hold(engine, L)
    assert engine.bytes_used_by_kind() == expected


def test_v4_bytes_used_are_whole_blocks_for_any_count():
    """Bytes held are a whole number of blocks' bytes, whatever share of the pool is used:
    9 of 35 window blocks hold 9 blocks' carry, not a byte less."""
    cfg = v4_config()
    engine = engine_for(cfg)
    bm = engine.block_manager
    per = PagedV4Cache.block_bytes(cfg, bm.block_size, torch.float32)
    assert bm.window.num_blocks == 35
    seq = Sequence("open", list(range(3, 3 + 9 * bm.block_size)), SamplingParams())
    bm.allocate(seq)
    bm.reserve(seq, len(seq))  # nothing computed yet: all 9 window blocks held
    assert bm.window.num_used == 9
    assert engine.bytes_used_by_kind()["compressor_state"] == 9 * per["compressor_state"]


# ---------------------------------------------------------------- V3.2 bytes
@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("L", LENGTHS)
def test_v32_bytes_held_per_kind_equal_calc_kv(L, speculative):
    cfg = v32_config(L + 64)
    engine = engine_for(cfg, speculative=speculative)
    hold(engine, L)
    terms = calc_terms(cfg, L, torch.float32, include_mtp=speculative)
    used = engine.stats()["kv_cache_bytes_used_by_kind"]
    assert used == {"latent": terms["MLA latent c_KV + k_pe"].bytes, "indexer": terms["indexer keys"].bytes}
    assert engine.block_manager.num_used == L // engine.block_manager.block_size


# ------------------------------------------------ what the engine cannot hold
def budget_for(cfg, tokens: int, max_num_seqs: int = 2, block_size: int = 16) -> int:
    """kv_cache_memory whose fp32 cache holds `tokens` tokens (V4: first the window space the
    engine sizes for max_num_seqs and 512 tokens a step, then main blocks)."""
    if cfg.is_v4:
        per = PagedV4Cache.block_bytes(cfg, block_size, torch.float32)
        windows = window_blocks_needed(cfg.sliding_window, block_size, max_num_seqs, 512)
        return windows * (per["window"] + per["compressor_state"]) + tokens // block_size * (
            per["compressed"] + per["indexer"])
    return tokens * PagedLatentCache.bytes_per_token(cfg, cfg.num_hidden_layers, torch.float32)


LIMITS = {  # (max_position_embeddings, tokens the cache holds, the refused prompt's length, the limit named)
    "context": (256, 2048, 300, r"max_model_len \(256 tokens"),
    "capacity": (4096, 128, 200, r"the KV-cache capacity \(128 tokens = 8 blocks x 16\)"),
}


@pytest.mark.parametrize("limit", sorted(LIMITS))
@pytest.mark.parametrize("arch", ["v32", "v4"])
def test_a_prompt_past_the_limit_is_refused_and_the_others_go_on(arch, limit):
    """Two requests running; a third whose prompt is longer than the model's context, or
    than the whole cache holds (yet within the context), is refused at add_request with the
    numbers; the two finish as they do without it."""
    max_len, tokens, P, phrase = LIMITS[limit]
    cfg = (v4_config if arch == "v4" else v32_config)(max_len)
    torch.manual_seed(0)
    model = CausalLM(cfg)
    kw = dict(kv_cache_memory=budget_for(cfg, tokens), max_num_seqs=2, speculative=False)
    engine = LLM(model, **kw).engine
    assert engine.max_model_len == min(max_len, tokens)
    g = torch.Generator().manual_seed(5)
    good = [torch.randint(3, 200, (L,), generator=g).tolist() for L in (40, 21)]
    seqs = [engine.add_request(p, GREEDY) for p in good]
    engine.step()
    with pytest.raises(ValueError, match=rf"prompt \({P} tokens\) \+ max_tokens \(4\) = {P + 4} exceeds.*" + phrase):
        engine.add_request(torch.randint(3, 200, (P,), generator=g).tolist(), GREEDY, request_id="long")
    assert "long" not in engine.requests and len(engine.requests) == 2
    while engine.has_unfinished():
        engine.step()
    assert [len(s.output_token_ids) for s in seqs] == [N, N]
    assert engine.block_manager.num_used == 0
    alone = LLM(model, **kw).generate(good, GREEDY, use_tqdm=False)
    assert [s.output_token_ids for s in seqs] == [o.outputs[0].token_ids for o in alone]


@pytest.mark.parametrize("arch", ["v32", "v4"])
def test_generate_with_a_prompt_past_the_context_raises_and_leaves_nothing_behind(arch):
    """LLM.generate refuses the whole call (as vLLM's does) with the request's numbers,
    holds no request and no block afterwards, and serves the next call."""
    cfg = (v4_config if arch == "v4" else v32_config)(128)
    torch.manual_seed(0)
    llm = LLM(CausalLM(cfg), kv_cache_memory="16MiB", speculative=False)
    good = torch.randint(3, 200, (30,)).tolist()
    with pytest.raises(ValueError, match=r"prompt \(300 tokens\).*max_model_len \(128 tokens"):
        llm.generate([good, torch.randint(3, 200, (300,)).tolist()], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_used == 0
    assert len(llm.generate([good], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == N
