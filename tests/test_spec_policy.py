"""MTP speculation steps aside where it cannot pay: above a load, during stretches of low
acceptance, and for positions whose MTP cache has holes; output never changes."""

import pytest
import torch

from nanoseek.engine import LLM, SamplingParams
from nanoseek.engine.cache import BatchView, PagedLatentCache
from nanoseek.engine.engine import LLMEngine
from nanoseek.engine.spec_policy import SpecPolicy
from tests.test_engine import prompts, tiny_model, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_policy_drafts_only_up_to_its_load():
    p = SpecPolicy(max_batch=16)
    assert p.should_draft(1) and p.should_draft(16)
    assert not p.should_draft(17) and not p.should_draft(64)


def test_low_acceptance_pauses_drafting_then_probes_again():
    p = SpecPolicy(min_acceptance=0.5, warmup=32, pause=10)
    for _ in range(3):
        p.observe(8, 1)  # 24 drafts, 12 % accepted: still within the warm-up
    assert p.should_draft(1)
    p.observe(8, 1)
    assert p.paused and "acceptance" in p.reason
    assert [p.should_draft(1) for _ in range(11)] == [False] * 10 + [True]  # then a fresh probe
    assert p.seen == 0
    for _ in range(4):
        p.observe(8, 1)
    assert [p.should_draft(1) for _ in range(21)] == [False] * 20 + [True]  # a failed probe: twice as long
    for _ in range(4):
        p.observe(8, 7)  # a probe that pays: the next pause is short again
    assert not p.paused and p.next_pause == 0


def test_drafts_verified_during_a_pause_do_not_extend_it():
    p = SpecPolicy(min_acceptance=0.5, warmup=8, pause=5)
    p.observe(8, 0)
    assert p.paused_for == 5
    p.observe(8, 0)  # drafts made before the pause, verified in its first step
    assert p.paused_for == 5 and p.next_pause == 10


def test_good_acceptance_keeps_drafting():
    p = SpecPolicy(warmup=16)
    for _ in range(50):
        p.observe(4, 4)
        p.observe(4, 3)
    assert p.should_draft(1) and not p.paused and p.reason is None


def test_keys_from_hides_the_positions_before_a_run():
    cfg = tiny_model(mtp=0).config
    cache = PagedLatentCache(cfg, num_blocks=6, block_size=4, num_layers=1, dtype=torch.float32)
    view = BatchView(cache, [[2, 5], [1]], starts=[5, 0], q_lens=[2, 3], absorb=True)
    m = view.keys_from([4, 0]).mask
    assert m[0, 0].tolist() == [False] * 4 + [True] * 2 + [False]
    assert torch.equal(m[1], view.mask[1]) and torch.equal(view.mask[0, 0], torch.tensor([True] * 6 + [False]))


@pytest.fixture(scope="module")
def model():
    return tiny_model(mtp=1)


def test_a_burst_drafts_only_once_the_load_has_dropped(model):
    """Six requests arrive together with spec_max_batch=4: no step runs MTP while more
    than four are held, not even the first ones, which admit only a prompt or two (a
    16-token budget), and the ones left then resume drafting; the text is plain decoding's."""
    load = prompts(6, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (4, 5, 6, 30, 30, 30)]
    ref = token_ids(LLM(model, kv_cache_memory=2**22, block_size=4, speculative=False)
                    .generate(load, params, use_tqdm=False))
    engine = LLMEngine(model, None, kv_cache_memory=2**22, block_size=4, speculative=True, spec_max_batch=4,
                       max_num_batched_tokens=16, max_num_seqs=8)
    seqs = [engine.add_request(p, sp) for p, sp in zip(load, params)]
    mtp = engine.cache.kv[model.config.num_hidden_layers]
    while engine.scheduler.load > 4:
        engine.step()
        assert engine.spec_stats.drafted == 0 and all(s.mtp_from is None for s in seqs)
    assert mtp.abs().sum() == 0  # MTP never ran
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == ref
    assert engine.spec_stats.drafted > 0


def test_a_request_resumes_drafting_after_a_hole_with_a_fresh_mtp_run(model):
    """Steps above the load run no MTP (a hole in the MTP cache); once the load drops the
    request drafts again, its MTP run starting where it resumed."""
    load = prompts(3, seed=5)
    llm = LLM(model, kv_cache_memory=2**22, block_size=4, speculative=True, spec_max_batch=1)
    engine = llm.engine
    long = engine.add_request(load[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    short = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)) for p in load[1:]]
    while not all(s.finished for s in short):
        engine.step()
    assert long.mtp_from is None and engine.spec_stats.drafted == 0
    resumed_at = long.num_computed
    engine.step()
    assert long.mtp_from == resumed_at and long.draft is not None
    while engine.has_unfinished():
        engine.step()
    assert long.mtp_from == resumed_at and engine.spec_stats.drafted > 0
    plain = LLM(model, kv_cache_memory=2**22, speculative=False).generate(load[:1], SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    assert long.output_token_ids == token_ids(plain)[0]


def test_mtp_latents_before_a_run_do_not_change_the_drafts(model):
    """The MTP layer attends only from mtp_from: garbage in its cache before that (stale
    latents of other requests, a prefix-cache hit's) leaves every draft as it was."""
    prompt = prompts(1, seed=7, lo=30, hi=31)[0]
    drafts = {}
    for poison in (False, True):
        engine = LLMEngine(model, None, kv_cache_memory=2**22, block_size=4, speculative=True)
        engine.runner.spec.policy.prefill_window = 4
        seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
        if poison:
            engine.cache.kv[model.config.num_hidden_layers].normal_(0, 100)
        drafts[poison] = []
        while engine.has_unfinished():
            engine.step()
            drafts[poison].append(seq.draft)
        assert seq.mtp_from == len(prompt) - 4
    assert drafts[True] == drafts[False] and any(d is not None for d in drafts[False])


def test_a_prompt_runs_mtp_over_its_last_positions_only(model):
    prompt = prompts(1, seed=9, lo=21, hi=22)[0]
    engine = LLMEngine(model, None, kv_cache_memory=2**22, block_size=4, speculative=True,
                       max_num_batched_tokens=8, max_num_seqs=4)  # three chunks: 8, 8, 5
    engine.runner.spec.policy.prefill_window = 3
    seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    table = []
    while seq.num_computed < len(prompt):
        table = list(seq.block_table)
        engine.step()
    mtp = engine.cache.kv[model.config.num_hidden_layers]
    written = torch.cat([mtp[b] for b in table])[:len(prompt)].abs().sum(-1).ne(0)
    # the chunks 0..7 and 8..15 sample nothing and run no MTP; the last one (16..20), its last 3 rows
    assert written.tolist() == [False] * 18 + [True] * 3
    assert seq.mtp_from == 18 and seq.draft is not None
