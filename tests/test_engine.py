"""The engine against the model's own full-forward greedy decoding, and its bookkeeping."""

from __future__ import annotations

import pytest
import torch

from nanoseek.engine import LLM, SamplingParams
from nanoseek.engine.block_manager import BlockManager
from nanoseek.engine.cache import BatchView, PagedLatentCache, budget_bytes, parse_memory
from nanoseek.engine.engine import LLMEngine
from nanoseek.engine.scheduler import Scheduler
from nanoseek.engine.sequence import Sequence
from nanoseek.config import preset
from nanoseek.model import CausalLM

# ------------------------------------------------ helpers (the other engine tests import them)

def tiny_model(mtp: int = 1, seed: int = 0, **kw) -> CausalLM:
    """2 layers (one dense, one MoE), vocab 256, fp32, random weights, eos 1."""
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_group=2,
                 topk_group=1, num_nextn_predict_layers=mtp, max_position_embeddings=512,
                 initializer_range=0.1, **kw)
    return CausalLM(cfg).eval()


@torch.no_grad()
def reference_greedy(model: CausalLM, prompt: list[int], max_tokens: int, eos: int | None = None) -> list[int]:
    """Repeated full forwards (no cache) and argmax: the ground truth."""
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos:
            break
    return out


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lens]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


GREEDY = SamplingParams(temperature=0, max_tokens=10)


@pytest.fixture(scope="module")
def model():
    return tiny_model(mtp=1)


@pytest.fixture(scope="module")
def load():
    return prompts(8, seed=1)


@pytest.fixture(scope="module")
def refs(model, load):
    return [reference_greedy(model, p, GREEDY.max_tokens, eos=1) for p in load]


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_equals_full_forward(model, load, refs):
    # small blocks and a small token budget: many blocks per sequence, chunked prefill
    llm = LLM(model, kv_cache_memory=2**22, block_size=4, max_num_batched_tokens=24, max_num_seqs=8,
              speculative=False)
    outs = llm.generate(load, GREEDY)
    assert token_ids(outs) == refs
    assert all(o.finished and o.outputs[0].finish_reason in ("stop", "length") for o in outs)


def test_outputs_do_not_depend_on_batch_or_order(model, load, refs):
    llm = LLM(model, kv_cache_memory=2**22, block_size=8, speculative=False, enable_prefix_caching=False)
    alone = [token_ids(llm.generate([p], GREEDY))[0] for p in load[:3]]
    assert alone == refs[:3]
    reversed_outs = token_ids(llm.generate(load[::-1], GREEDY))
    assert reversed_outs[::-1] == refs
    # staggered arrivals: requests join while others are decoding
    engine = llm.engine
    seqs = [engine.add_request(load[0], GREEDY)]
    for p in load[1:]:
        engine.step()
        seqs.append(engine.add_request(p, GREEDY))
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == refs


def test_prefix_cache_hit_reuses_blocks_and_changes_nothing(model):
    shared = prompts(1, seed=7, lo=40, hi=41)[0]            # 40 tokens = 5 full blocks of 8
    tails = prompts(4, seed=8, lo=2, hi=6)
    load = [shared + t for t in tails]
    refs = [reference_greedy(model, p, 8, eos=1) for p in load]
    params = SamplingParams(temperature=0, max_tokens=8)
    llm = LLM(model, kv_cache_memory=2**22, block_size=8, speculative=False)
    first = llm.generate(load[:1], params)
    assert first[0].num_cached_tokens == 0
    bm = llm.engine.block_manager
    hits_before = bm.hits
    rest = llm.generate(load[1:], params)
    assert token_ids(first + rest) == refs
    assert [o.num_cached_tokens for o in rest] == [40, 40, 40]
    assert bm.hits - hits_before == 15
    # the same prompt again: everything but the block holding the last token is reused
    again = llm.generate(load[:1], params)
    assert again[0].num_cached_tokens == 40 and token_ids(again) == refs[:1]
    bm.check()


@pytest.mark.parametrize("speculative", [False, True])
def test_cache_far_too_small_still_completes_everything(model, load, refs, speculative):
    # room for ~1.3 sequences: constant preemption and recompute
    cfg = model.config
    layers = cfg.num_hidden_layers + (1 if speculative else 0)
    per_token = PagedLatentCache.bytes_per_token(cfg, layers, torch.float32)
    longest = max(len(p) for p in load) + GREEDY.max_tokens
    llm = LLM(model, kv_cache_memory=per_token * (longest + 16), block_size=4, speculative=speculative)
    engine = llm.engine
    assert engine.cache.capacity_tokens < 2 * longest
    outs = llm.generate(load, GREEDY)
    assert token_ids(outs) == refs
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_request_that_can_never_fit_gets_a_clear_error(model):
    llm = LLM(model, kv_cache_memory=2**16, block_size=4, speculative=False)
    cap = llm.engine.cache.capacity_tokens
    with pytest.raises(ValueError, match=rf"KV-cache capacity \({cap} tokens.*by 1 tokens"):
        llm.generate([[5] * cap], SamplingParams(max_tokens=1))
    assert not llm.engine.has_unfinished()
    with pytest.raises(ValueError, match=r"max_model_len \(512 tokens: max_position_embeddings.*by 98 tokens"):
        LLM(model, kv_cache_memory=2**26, speculative=False).generate([[5] * 10], SamplingParams(max_tokens=600))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 999]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text without a tokenizer")


def test_rejected_prompt_leaves_no_earlier_prompt_queued(model, load, refs):
    llm = LLM(model, kv_cache_memory=2**22, block_size=4, speculative=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([load[0], load[1], [5, 999]], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    assert llm.engine.block_manager.num_used == 0
    # the next call runs its own prompts only
    assert token_ids(llm.generate([load[2]], GREEDY, use_tqdm=False)) == refs[2:3]
    assert not llm.engine.requests


def test_cached_prompt_tokens_count_prompt_tokens_only():
    # a preempted request re-admitted with generated tokens: its hit may cover more than the prompt
    bm = BlockManager(num_blocks=16, block_size=4)
    first = Sequence("a", list(range(10, 30)), SamplingParams())
    bm.allocate(first)
    first.num_computed = len(first)
    bm.register_full_blocks(first)
    bm.free_seq(first)
    again = Sequence("b", list(range(10, 15)), SamplingParams(max_tokens=20))
    again.output_token_ids = list(range(15, 30))
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    scheduler.add(again)
    scheduler.schedule()                              # admission: the scheduler records the hit
    assert again.num_computed == 16                   # 4 whole blocks come from the cache
    assert again.num_cached_prompt_tokens == 5        # of which the prompt is 5 tokens
    bm.check()


def test_finishing_step_still_writes_its_mtp_latents(model):
    """MTP runs over every position a drafting step computed, the finishing one too: the
    MTP layer's latents from the request's run start (mtp_from) to its end are the ones a
    request that ran on has there."""
    prompt = prompts(1, seed=12, lo=9, hi=10)[0]  # 9 tokens; + 4 generated = 13, 12 computed: 3 blocks

    def mtp_latents(max_tokens, computed):
        engine = LLMEngine(model, None, kv_cache_memory=2**22, block_size=4, speculative=True)
        seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        table = []
        while seq.num_computed < computed and not seq.finished:
            table = list(seq.block_table) or table
            engine.step()
        mtp = engine.cache.kv[model.config.num_hidden_layers]
        return torch.cat([mtp[b] for b in table[:3]])[seq.mtp_from:computed], seq

    ended, seq = mtp_latents(4, 12)
    assert seq.finished and len(seq) == 13 and seq.mtp_from is not None
    ran_on, _ = mtp_latents(10, 12)
    assert ended.abs().sum(-1).ne(0).all(), "MTP latents missing for the finishing step's positions"
    torch.testing.assert_close(ended, ran_on, atol=1e-4, rtol=1e-4)


def test_abort_frees_every_block(model, load):
    llm = LLM(model, kv_cache_memory=2**20, block_size=4, max_num_batched_tokens=32, max_num_seqs=8,
              speculative=True)
    engine, bm = llm.engine, llm.engine.block_manager
    seqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)) for p in load]
    for _ in range(4):
        engine.step()
    assert bm.num_used > 0
    assert any(s.num_computed > 0 for s in seqs) and any(not s.in_decode for s in seqs)  # mid-prefill too
    for s in seqs:
        engine.abort(s.request_id)
    assert bm.num_used == 0 and bm.num_free == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not engine.has_unfinished() and all(s.finish_reason == "abort" for s in seqs)
    bm.check()


class OracleDraftEngine(LLMEngine):
    """Replaces MTP's draft with the true next-next token on alternate tries (and a wrong
    one otherwise), so both the accept and the roll-back paths run against the reference.
    It rewrites the drafts the scheduler's postprocess just kept (a test may; the engine's
    own code writes sequences only in the scheduler)."""

    truth: dict[tuple, list[int]]

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.tries = 0
        postprocess = self.scheduler.postprocess

        def with_oracle_drafts(decodes, prefills, outs):
            touched = postprocess(decodes, prefills, outs)
            for seq in decodes + [s for s, _ in prefills]:
                if seq.draft is None or seq.finished:
                    continue
                full = self.truth[tuple(seq.prompt_token_ids)]
                self.tries += 1
                right = full[len(seq)] if len(seq) < len(full) else 0
                seq.draft = right if self.tries % 3 else (right + 1) % 256
            return touched

        self.scheduler.postprocess = with_oracle_drafts


def test_speculative_equals_plain_greedy(model, load, refs):
    spec = LLM(model, kv_cache_memory=2**22, block_size=4, max_num_batched_tokens=24, max_num_seqs=8,
              speculative=True)
    assert token_ids(spec.generate(load, GREEDY)) == refs            # real (untrained) MTP drafts
    assert spec.engine.spec_stats.drafted > 0
    cfg = model.config
    tiny_cache = PagedLatentCache.bytes_per_token(cfg, cfg.num_hidden_layers + 1, torch.float32) * 64
    steps = {}
    for memory, speculative in ((2**22, False), (2**22, True), (tiny_cache, True)):  # roomy, then preempting
        engine = OracleDraftEngine(model, None, kv_cache_memory=memory, block_size=4, max_num_batched_tokens=24,
                                   max_num_seqs=8, speculative=speculative)
        engine.truth = {tuple(p): p + r for p, r in zip(load, refs)}
        seqs = [engine.add_request(p, GREEDY) for p in load]
        steps[memory, speculative] = 0
        while engine.has_unfinished():
            engine.step()
            steps[memory, speculative] += 1
        assert [s.output_token_ids for s in seqs] == refs
        if not speculative:
            continue
        stats = engine.spec_stats
        assert 0 < stats.accepted < stats.drafted  # both paths ran
        assert (engine.scheduler.num_preemptions > 0) == (memory == tiny_cache)
    assert steps[2**22, True] < steps[2**22, False]  # accepted drafts save steps


def test_speculative_keeps_seeded_sampling(model, load):
    params = SamplingParams(temperature=0.8, top_k=50, seed=3, max_tokens=12)
    plain = LLM(model, kv_cache_memory=2**22, speculative=False).generate(load[:4], params)
    engine = OracleDraftEngine(model, None, kv_cache_memory=2**22, speculative=True)
    engine.truth = {tuple(p): p + o.outputs[0].token_ids for p, o in zip(load, plain)}
    seqs = [engine.add_request(p, params) for p in load[:4]]
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == token_ids(plain)
    assert engine.spec_stats.accepted > 0


def test_batch_view_masks_causality_and_padding():
    cfg = tiny_model(mtp=0).config
    cache = PagedLatentCache(cfg, num_blocks=6, block_size=4, num_layers=1, dtype=torch.float32)
    view = BatchView(cache, [[2, 5], [1]], starts=[5, 0], q_lens=[2, 3], absorb=False)
    assert view.positions.tolist() == [[5, 6, 7], [0, 1, 2]]
    assert view.write_slots.tolist() == [5 * 4 + 1, 5 * 4 + 2, 4, 5, 6]
    m = view.mask
    assert m.shape == (2, 3, 7)
    assert m[0, 0].tolist() == [True] * 6 + [False] and m[0, 1].all() and m[0, 2].all()  # row 2 padding
    assert m[1, 0].tolist() == [True] + [False] * 6 and m[1, 2].tolist() == [True] * 3 + [False] * 4
    c_kv, k_pe = torch.randn(2, 3, 32), torch.randn(2, 3, 8)
    (c_all, pe_all), _ = view.update(0, c_kv, k_pe)
    assert torch.equal(c_all[0, 5:7], c_kv[0, :2]) and torch.equal(pe_all[1, :3], k_pe[1])
    assert cache.kv[0].view(-1, 40)[23].abs().sum() == 0  # the padding row wrote nothing


def test_block_manager_lru_keeps_hashes_until_needed():
    from nanoseek.engine.sequence import Sequence
    bm = BlockManager(num_blocks=4, block_size=2)
    a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams())
    bm.allocate(a)
    a_table = list(a.block_table)
    a.num_computed = 5
    bm.register_full_blocks(a)
    bm.free_seq(a)
    assert bm.num_free == 4 and len(bm.cached) == 2  # freed, but both full blocks still hit
    b = Sequence("b", [1, 2, 3, 4, 9], SamplingParams())
    assert bm.can_allocate(b)
    assert bm.allocate(b) == 4 and b.block_table == a_table  # a's unhashed tail was handed out first
    assert bm.blocks[b.block_table[0]].ref_count == 1 and bm.num_free == 1
    c = Sequence("c", [7, 7], SamplingParams())  # takes the last free block
    bm.allocate(c)
    assert c.block_table == [3] and len(bm.cached) == 2
    bm.free_seq(b)
    bm.free_seq(c)
    d = Sequence("d", [8] * 8, SamplingParams())  # needs all 4 blocks: the cached ones get evicted
    assert bm.can_allocate(d)
    bm.allocate(d)
    assert len(bm.cached) == 0 and bm.num_free == 0
    bm.check()


def test_memory_budget_parsing():
    assert parse_memory("512MiB") == 512 * 2**20 and parse_memory("2e9") == 2e9 and parse_memory(0.25) == 0.25
    assert 0 < budget_bytes(0.01, torch.device("cpu")) < budget_bytes(0.02, torch.device("cpu"))
    with pytest.raises(ValueError, match="kv_cache_memory"):
        parse_memory("lots")
    with pytest.raises(ValueError, match="holds no block"):
        LLM(tiny_model(mtp=0), kv_cache_memory=100)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(tiny_model(mtp=0), max_num_seqs=0)


def test_reset_prefix_cache_after_a_weight_change(model):
    shared = prompts(1, seed=12, lo=33, hi=34)[0]
    llm = LLM(model, kv_cache_memory=2**22, block_size=8, speculative=False)
    params = SamplingParams(temperature=0, max_tokens=4)
    llm.generate([shared], params)
    assert llm.generate([shared], params)[0].num_cached_tokens == 32
    llm.engine.reset_prefix_cache()
    out = llm.generate([shared], params)[0]
    assert out.num_cached_tokens == 0 and out.outputs[0].token_ids == reference_greedy(model, shared, 4, eos=1)
    stats = llm.engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["prefix_cache_hits"] == 4 and stats["running"] == 0


def test_long_prompt_is_chunked_and_never_stalls_decoding(model):
    llm = LLM(model, kv_cache_memory=2**22, block_size=4, max_num_batched_tokens=16, max_num_seqs=4,
              speculative=False)
    engine = llm.engine
    short = engine.add_request(prompts(1, seed=13, lo=5, hi=6)[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    engine.step()  # short prompt prefilled: decoding from now on
    long_prompt = prompts(1, seed=14, lo=100, hi=101)[0]
    long = engine.add_request(long_prompt, SamplingParams(temperature=0, max_tokens=3))
    chunks = []
    while not long.output_token_ids:
        before, computed = len(short.output_token_ids), long.num_computed
        engine.step()
        assert len(short.output_token_ids) == before + 1  # the decode ran in every step
        chunks.append(long.num_computed - computed)
    assert len(chunks) >= 7 and max(chunks) <= 15  # 100 tokens in chunks of the 15 spare tokens
    while engine.has_unfinished():
        engine.step()
    assert long.output_token_ids == reference_greedy(model, long_prompt, 3, eos=1)


# ------------------------------------------------- one owner for a sequence's state
def test_only_the_scheduler_writes_sequence_state():
    """Source check: in the engine, only scheduler.py assigns a sequence's
    num_computed, draft, finish_reason or status, or appends its tokens, and only it calls
    register_full_blocks (the block manager writes blocks, the runner nothing; a block manager
    overriding it may call its base's)."""
    import ast
    from pathlib import Path

    import nanoseek
    owned = {"num_computed", "draft", "finish_reason", "status", "stop_reason", "error"}
    writers: dict[str, set[str]] = {}
    for path in (Path(nanoseek.__file__).parent / "engine").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Assign):
                targets = [t for tgt in node.targets for t in (tgt.elts if isinstance(tgt, ast.Tuple) else [tgt])]
            elif isinstance(node, ast.AugAssign):
                targets = [node.target]
            names = {t.attr for t in targets if isinstance(t, ast.Attribute) and t.attr in owned}
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                f = node.func
                overrides = isinstance(f.value, ast.Call) and getattr(f.value.func, "id", None) == "super"
                if (f.attr == "register_full_blocks" and not overrides) or (
                        f.attr == "append" and isinstance(f.value, ast.Attribute) and f.value.attr == "output_token_ids"):
                    names.add(f.attr)
            for name in names:
                writers.setdefault(name, set()).add(path.name)
    assert writers and all(files == {"scheduler.py"} for files in writers.values()), writers


def test_non_finite_logits_fail_one_request_and_the_batch_goes_on(model, load, refs):
    """A NaN embedding row poisons every request whose prompt holds that token: its logits
    are NaN. It must end with finish_reason "error", the others as plain greedy."""
    import copy
    broken = copy.deepcopy(model)
    bad = 2  # prompts() draws ids from 3 up: only the poisoned prompt holds it
    with torch.no_grad():
        broken.model.embed_tokens.weight[bad] = float("nan")
    for speculative in (False, True):
        for params in (GREEDY, SamplingParams(temperature=0.9, top_p=0.9, seed=1, max_tokens=10, logprobs=2)):
            llm = LLM(broken, kv_cache_memory=2**22, block_size=4, speculative=speculative)
            healthy = [p for p in load[:3]]
            outs = llm.generate([healthy[0], healthy[1][:5] + [bad] + healthy[1][5:], healthy[2]],
                                [GREEDY, params, GREEDY], use_tqdm=False)
            failed = outs[1].outputs[0]
            assert failed.finish_reason == "error" and "non-finite logits" in failed.error
            assert failed.token_ids == [] and outs[1].finished
            assert token_ids([outs[0], outs[2]]) == [refs[0], refs[2]]
            assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_used == 0


def test_max_tokens_none_runs_up_to_the_context(model):
    llm = LLM(model, kv_cache_memory=2**22, block_size=8, speculative=True, max_model_len=40)
    prompt = prompts(1, seed=15, lo=30, hi=31)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10  # 40 - 30
    assert out.token_ids == reference_greedy(model, prompt, 10)
    with pytest.raises(ValueError, match=r"prompt \(40 tokens\) \+ at least 1 new token \(max_tokens=None\)"):
        llm.generate([[5] * 40], SamplingParams(max_tokens=None))
