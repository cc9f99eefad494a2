"""One request's non-finite activations stay its own: it fails, and no later request reads
them, neither through the prefix cache nor through the padded reads of a batch.

A token whose embedding is NaN stands for anything that overflows (an image whose pixels or
features are not finite, a bf16 activation past its range). Attention multiplies masked keys'
values by a probability of exactly 0, and 0 * NaN is NaN: without care, a NaN row that some
other read touches spreads."""

from __future__ import annotations

import pytest
import torch

from nanoseek.engine import LLM, SamplingParams

from tests.test_engine import reference_greedy, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

POISON = 7  # its embedding row is NaN
SYSTEM = [3, 20, 21, 22, 23, 24, 25, 26]  # two blocks of 4, shared by the requests below
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module", params=[{}, dict(attention_type="gqa", num_key_value_heads=1)],
                ids=["mla", "gqa"])
def model(request):
    m = tiny_model(mtp=0, **request.param)
    with torch.no_grad():
        m.model.embed_tokens.weight[POISON] = float("nan")
    return m


def engine(model, prefix_caching: bool = True) -> LLM:
    # 4-token blocks and 16-token chunks: a prompt's first chunk is hashed before its last
    # chunk runs (and, for the poisoned prompt, fails)
    return LLM(model, kv_cache_memory="1MiB", block_size=4, max_num_seqs=4, max_num_batched_tokens=16,
               enable_prefix_caching=prefix_caching)


# the shared prompt, then the NaN in the same 16-token chunk: the shared rows attend to it masked
POISONED = SYSTEM + [30, POISON] + list(range(50, 60))


def test_a_failed_requests_blocks_are_not_reused_through_the_prefix_cache(model):
    llm = engine(model)
    (out,) = llm.generate([POISONED], GREEDY, use_tqdm=False)
    assert out.outputs[0].finish_reason == "error"
    healthy = SYSTEM + [40, 41, 42, 43, 44]
    (out,) = llm.generate([healthy], GREEDY, use_tqdm=False)
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == reference_greedy(model, healthy, 4)
    (again,) = llm.generate([healthy], GREEDY, use_tqdm=False)  # its own blocks are shared
    assert again.outputs[0].token_ids == out.outputs[0].token_ids
    assert llm.engine.block_manager.hits == 3


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_padded_reads_never_touch_another_requests_rows(model, prefix_caching):
    """The poisoned request holds block 0 while two others of different lengths run beside it:
    the shorter one's padded key positions must not read slot 0."""
    llm = engine(model, prefix_caching)
    long, short = [3, 40, 41, 42, 43, 44, 45, 46, 47, 48], [4, 5]
    outs = llm.generate([POISONED + list(range(60, 90)), long, short], GREEDY, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["error", "length", "length"]
    assert [o.outputs[0].token_ids for o in outs[1:]] == [reference_greedy(model, p, 4) for p in (long, short)]
    outs = llm.generate([long, short], GREEDY, use_tqdm=False)  # and after it failed
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(model, p, 4) for p in (long, short)]


def test_v4s_windows_and_compressed_entries_keep_a_failed_requests_rows_too():
    """V4's decode reads its windows and compressed entries through block tables of its own
    (engine/v4_decode.py): a short request batched beside the poisoned one is unharmed. (V3.2
    reads through BatchView, as the MLA tests above.)"""
    from nanoseek.model import CausalLM
    from tests.test_v4_model import v4_config
    torch.manual_seed(0)
    model = CausalLM(v4_config(max_position_embeddings=512)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
        model.model.embed_tokens.weight[POISON] = float("nan")
    llm = LLM(model, kv_cache_memory="4MiB", block_size=16, max_num_seqs=4, max_num_batched_tokens=48)
    poisoned = list(range(20, 52)) + [30, POISON] + list(range(40, 80))
    long, short = list(range(10, 60)), [4, 5]
    outs = llm.generate([poisoned, long, short], GREEDY, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["error", "length", "length"]
    assert [o.outputs[0].token_ids for o in outs[1:]] == [reference_greedy(model, p, 4) for p in (long, short)]
