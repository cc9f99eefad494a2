"""MTP speculation steps aside where it cannot pay: above a batch size, after low
acceptance, and for requests whose MTP cache has holes; output never changes."""

import pytest

from nanoseek.engine import LLM, SamplingParams
from nanoseek.engine.spec_policy import SpecPolicy
from tests.test_engine import prompts, tiny_model, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_policy_drafts_only_up_to_its_batch_size():
    p = SpecPolicy(max_batch=16)
    assert p.should_draft(1) and p.should_draft(16)
    assert not p.should_draft(17) and not p.should_draft(64)


def test_low_acceptance_switches_drafting_off_after_the_warmup():
    p = SpecPolicy(max_batch=16, min_acceptance=0.6, warmup=64)
    for _ in range(7):
        p.observe(8, 1)  # 56 drafts, 12 % accepted: still within the warm-up
    assert p.should_draft(1)
    p.observe(8, 1)
    assert not p.should_draft(1) and "acceptance" in p.disabled


def test_good_acceptance_keeps_drafting():
    p = SpecPolicy(warmup=16)
    for _ in range(50):
        p.observe(4, 4)
        p.observe(4, 3)
    assert p.should_draft(1) and p.disabled is None


@pytest.fixture(scope="module")
def model():
    return tiny_model(mtp=1)


def test_large_batch_drafts_nothing_and_keeps_the_output(model):
    load = prompts(6, seed=3)
    plain = LLM(model, kv_cache_memory=2**22, block_size=4, speculative=False)
    ref = token_ids(plain.generate(load, GREEDY, use_tqdm=False))
    llm = LLM(model, kv_cache_memory=2**22, block_size=4, speculative=True, spec_max_batch=4)
    assert token_ids(llm.generate(load, GREEDY, use_tqdm=False)) == ref
    # all six arrived together: the steps held more than 4 requests until some had
    # finished, so no request's MTP cache is whole and none drafted
    assert llm.engine.spec_stats.drafted == 0
    assert llm.engine.runner.forwards == plain.engine.runner.forwards
    one = LLM(model, kv_cache_memory=2**22, block_size=4, speculative=True, spec_max_batch=4)
    assert token_ids(one.generate(load[:1], GREEDY, use_tqdm=False)) == ref[:1]
    assert one.engine.spec_stats.drafted > 0  # alone, it drafts


def test_a_request_with_mtp_holes_stops_drafting(model):
    """Steps above the threshold run no MTP; the requests they computed never draft again,
    while a request admitted later, into a small batch, does."""
    load = prompts(4, seed=5)
    llm = LLM(model, kv_cache_memory=2**22, block_size=4, speculative=True, spec_max_batch=2)
    engine = llm.engine
    first = [engine.add_request(p, GREEDY) for p in load[:3]]
    engine.step()
    assert not any(s.mtp_whole for s in first)
    while engine.has_unfinished():
        engine.step()
    assert engine.spec_stats.drafted == 0
    late = engine.add_request(load[3], GREEDY)
    while engine.has_unfinished():
        engine.step()
    assert late.mtp_whole and engine.spec_stats.drafted > 0
