"""The shared-prefix layout (train/rl/shared_prefix.py) gives the padded layout's log-probs and
gradients: each completion token sees the same context at the same positions."""

from __future__ import annotations

import pytest
import torch

from nanoseek.model import CausalLM
from nanoseek.train.rl.rollout import pack, token_logprobs
from nanoseek.train.rl.shared_prefix import pack_shared_prefix, plan_rows, shared_prefix_logprobs
from tests.train_utils import micro_config


def groups(seed: int = 0):
    """Three prompts of different lengths with 1-4 completions each (lengths 1..9), one
    prompt's completions split by another's, as a micro-batch cut can leave them."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, 384, (n,), generator=g).tolist()  # noqa: E731
    a, b, c = rand(5), rand(9), rand(2)
    prompts, completions = [], []
    for p, lens in ((a, [4, 1, 7]), (b, [9, 3]), (a, [2]), (c, [5, 6, 1, 8])):
        for L in lens:
            prompts.append(p)
            completions.append(rand(L))
    return prompts, completions


def padded_logprobs(model, prompts, completions, T=1.0):
    """The reference: right-padded rows, log-probs gathered per completion token [N, Lmax]."""
    inputs, targets, mask = pack(prompts, completions, pad_id=2)
    logp = token_logprobs(model, inputs, targets, T)
    out = torch.zeros(len(completions), max(len(c) for c in completions))
    for n, c in enumerate(completions):
        out[n, :len(c)] = logp[n][mask[n]]
    return out


@pytest.mark.parametrize("attention", ["mla", "gqa"])
@pytest.mark.parametrize("max_row_tokens", [1024, 12])
def test_logprobs_and_gradients_match_the_padded_rows(attention, max_row_tokens):
    torch.manual_seed(0)
    extra = {"attention_type": "gqa", "num_key_value_heads": 1} if attention == "gqa" else {}
    model = CausalLM(micro_config(**extra)).train()
    prompts, completions = groups()
    weights = torch.randn(len(completions), 9)

    def run(fn):
        model.zero_grad()
        logp = fn()
        (logp * weights[:, :logp.shape[1]]).sum().backward()
        return logp.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want, want_grads = run(lambda: padded_logprobs(model, prompts, completions, 0.7))
    batch = pack_shared_prefix(prompts, completions, pad_id=2, max_row_tokens=max_row_tokens)
    got, got_grads = run(lambda: shared_prefix_logprobs(model, batch, 0.7) * batch.mask)
    assert batch.inputs.shape[0] == (3 if max_row_tokens == 1024 else 6)  # packed, or split
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(got_grads) == len(want_grads)
    for g_got, g_want in zip(got_grads, want_grads):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_layout_counts_each_prompt_once_and_masks_completions_apart():
    prompts, completions = groups()
    batch = pack_shared_prefix(prompts, completions, pad_id=2)
    # a (5 tokens) with 4 completions, b (9) with 2, c (2) with 4: each prompt once per row;
    # a completion of L tokens adds L - 1 inputs: a 5+3+0+6+1, b 9+8+2 (the longest), c 2+4+5+0+7
    assert batch.inputs.shape == (3, 19)
    assert batch.mask.sum() == sum(len(c) for c in completions)
    # row 0 = prompt a then completions 0, 1 (length 1: no input token), 2, 5
    assert batch.positions[0, :10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 5, 6]
    m = batch.attn_mask[0]
    assert m[7, :8].tolist() == [True] * 8          # completion 0's last input: prompt + itself
    assert m[8, 5:8].tolist() == [False] * 3        # completion 2 never sees completion 0
    assert m[8, :5].all() and m[9, 8] and not m[8, 9]
    # completion token 0 is predicted by the prompt's last token, token j by token j-1
    assert batch.rows[0, :4].tolist() == [0] * 4 and batch.cols[0, :4].tolist() == [4, 5, 6, 7]
    assert batch.cols[1, 0] == 4 and not batch.mask[1, 1:].any()
    assert batch.targets[0, :4].tolist() == completions[0]


def test_rows_respect_the_cap_and_group_equal_prompts_only():
    prompts = [[1, 2], [1, 2], [1, 3], [1, 2], [1, 2]]
    completions = [[5] * 4, [6] * 4, [7] * 4, [8] * 4, [9] * 9]
    assert plan_rows(prompts, completions, max_row_tokens=100) == [[0, 1, 3, 4], [2]]
    # 2 prompt + 3 + 3 fits 8; completion 3 starts a new row; 9 tokens exceed any cap alone
    assert plan_rows(prompts, completions, max_row_tokens=8) == [[0, 1], [2], [3], [4]]
    with pytest.raises(ValueError, match="prompt of at least one token"):
        pack_shared_prefix([[]], [[1]], pad_id=0)


def test_padding_stays_out_of_the_moe_load():
    """The packed rows' padding (all alike, so all routed alike) is not counted toward the
    load that moves the aux-loss-free bias: only the prompt and completion tokens are."""
    torch.manual_seed(0)
    model = CausalLM(micro_config()).train()
    prompts, completions = groups()
    batch = pack_shared_prefix(prompts, completions, pad_id=2)
    assert not batch.real.all()  # the layout has padding
    model.update_router_biases(gamma=0.0)  # resets the load counters
    shared_prefix_logprobs(model, batch)
    assert model.expert_load()[0].sum() == int(batch.real.sum()) * model.config.num_experts_per_tok
