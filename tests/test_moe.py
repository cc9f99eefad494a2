"""DeepSeekMoE: dispatch, routing rules, balance loss, the bias update, gradients."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model import CausalLM
from nanoseek.model.moe import MoE, balance_loss
from tests.conftest import randomize, tiny_config, v2_config


def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The obvious loop: for each token, each chosen expert, weight times output."""
    flat = x.reshape(-1, x.shape[-1])
    weights, indices, _, _ = moe.gate(flat)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for w, e in zip(weights[t], indices[t]):
            out[t] += w * moe.experts[int(e)](flat[t:t + 1])[0]
        out[t] += moe.shared_experts(flat[t:t + 1])[0]
    return out.view_as(x)


@pytest.mark.parametrize("cfg", [tiny_config(), v2_config(), v2_config(topk_method="greedy")])
def test_dispatch_equals_per_token_reference(cfg):
    moe = randomize(CausalLM(cfg)).model.layers[1].mlp
    x = torch.randn(3, 10, cfg.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), per_token_reference(moe, x), atol=1e-5, rtol=1e-5)


def test_empty_experts_are_skipped_and_never_see_foreign_tokens():
    cfg = tiny_config()
    moe = randomize(CausalLM(cfg)).model.layers[1].mlp
    seen = {}
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, inp, out, e=e: seen.__setitem__(e, inp[0].shape[0]))
    x = torch.randn(1, 5, cfg.hidden_size)
    _, indices, _, _ = moe.gate(x.view(-1, cfg.hidden_size))
    moe(x)
    counts = torch.bincount(indices.flatten(), minlength=8)
    assert seen == {e: int(c) for e, c in enumerate(counts) if c > 0}


def test_v3_routing_respects_groups_and_uses_unbiased_weights():
    cfg = tiny_config()
    gate = randomize(CausalLM(cfg)).model.layers[1].mlp.gate
    x = torch.randn(64, cfg.hidden_size)
    weights, indices, scores, _ = gate(x)
    groups = indices // (cfg.n_routed_experts // cfg.n_group)
    assert all(len(set(g.tolist())) <= cfg.topk_group for g in groups)
    raw = scores.gather(1, indices)  # sigmoid scores, not scores + bias
    expected = raw / raw.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    torch.testing.assert_close(weights, expected)
    # the bias changes the choice but not the weighting rule
    gate.e_score_correction_bias.zero_()
    gate.e_score_correction_bias[3] = 10.0
    _, idx2, _, _ = gate(x)
    assert (idx2 == 3).any(dim=1).all()


@pytest.mark.parametrize("norm,k,expect", [
    (True, 2, "normalised"),   # DeepSeek-V2: normalised to sum 1, not scaled
    (False, 2, "scaled"),      # the released V2 / V2-Lite configs: softmax scores x scale
    (True, 1, "scaled"),       # normalising one weight is skipped (top_k > 1 rule)
])
def test_v2_gating_weights_follow_deepseek_v2(norm, k, expect):
    """DeepSeek-V2's MoEGate: `if top_k > 1 and norm_topk_prob: normalise, else: x scale`:
    one or the other, never both (V3's noaux_tc does both)."""
    cfg = v2_config(topk_method="greedy", norm_topk_prob=norm, num_experts_per_tok=k,
                    routed_scaling_factor=16.0)
    gate = randomize(CausalLM(cfg)).model.layers[1].mlp.gate
    x = torch.randn(20, cfg.hidden_size)
    weights, indices, _, _ = gate(x)
    p = torch.softmax(x @ gate.weight.T, dim=-1)  # by hand
    top, top_idx = p.topk(k, dim=-1)
    ref = top / top.sum(-1, keepdim=True) if expect == "normalised" else top * 16.0
    assert torch.equal(indices.sort(-1)[0], top_idx.sort(-1)[0])
    torch.testing.assert_close(weights.sort(-1)[0], ref.sort(-1)[0])


def test_balance_loss_matches_hand_computation():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.2, 0.8, 0.6, 0.4]])  # one sequence, T=2
    indices = torch.tensor([[0, 2], [1, 2]])
    loss = balance_loss(scores, indices, batch=1, n_experts=4)
    # f_i = N_r/(K_r T) * count = 4/(2*2) * [1,1,2,0];  P_i = mean_t s_it / sum_j s_jt
    p = (scores / scores.sum(-1, keepdim=True)).mean(0)
    expected = (torch.tensor([1.0, 1.0, 2.0, 0.0]) * p).sum()
    assert loss.item() == pytest.approx(expected.item())
    # a perfectly balanced router with uniform scores gives exactly 1
    uniform = balance_loss(torch.full((4, 4), 0.5), torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), 1, 4)
    assert uniform.item() == pytest.approx(1.0)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_padding_tokens_leave_the_load_and_losses_alone(seq_aux):
    """With token_mask, padded rows count exactly what the unpadded rows count: the load
    that moves the bias, the balance loss and the z-loss. Without it, the padding (all
    alike, so all on the same experts) would load those experts."""
    cfg = tiny_config(aux_loss_alpha=0.01, router_z_loss_coef=0.001, seq_aux=seq_aux)
    moe = randomize(CausalLM(cfg)).model.layers[1].mlp.train()
    x = torch.randn(2, 5, cfg.hidden_size)
    padded = torch.cat([x, torch.zeros(2, 3, cfg.hidden_size) + x[:1, :1]], dim=1)  # 3 alike pads
    mask = torch.arange(8)[None, :] < 5

    def run(inp, token_mask=None):
        moe.tokens_per_expert.zero_()
        y = moe(inp, token_mask)
        return y, moe.tokens_per_expert.clone(), moe.aux_loss

    y, load, aux = run(x)
    y_pad, load_pad, aux_pad = run(padded, mask.expand(2, 8))
    torch.testing.assert_close(y_pad[:, :5], y, rtol=1e-5, atol=1e-6)
    assert torch.equal(load_pad, load) and load.sum() == 2 * 5 * cfg.num_experts_per_tok
    torch.testing.assert_close(aux_pad, aux)
    with pytest.raises(ValueError, match="token_mask: shape"):
        moe(padded, mask)  # [1, 8] for [2, 8] tokens
    _, load_unmasked, aux_unmasked = run(padded)
    assert load_unmasked.sum() == load.sum() + 2 * 3 * cfg.num_experts_per_tok
    assert not torch.allclose(aux_unmasked, aux)


def test_padded_rows_are_real_through_their_last_label():
    from nanoseek.model.cache import PaddedRows
    labelled = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(PaddedRows.through_last(labelled), want)


def plain_balance_loss(scores, indices, batch, n_experts):
    """balance_loss as written before token masks, line for line."""
    k = indices.shape[-1]
    probs = (scores / scores.sum(dim=-1, keepdim=True)).view(batch, -1, n_experts)
    T = probs.shape[1]
    counts = torch.zeros(batch, n_experts)
    counts.scatter_add_(1, indices.view(batch, -1), torch.ones_like(indices.view(batch, -1), dtype=counts.dtype))
    f = counts * (n_experts / (k * T))
    return (f * probs.mean(dim=1)).sum(dim=-1).mean()


@pytest.mark.parametrize("n_experts, k, tokens", [(16, 4, 24), (64, 6, 2048)])
def test_balance_loss_without_a_mask_is_the_plain_form_bit_for_bit(n_experts, k, tokens):
    """The unmasked path keeps the original arithmetic, so training without padding is
    unchanged to the last bit (a bf16 run's loss curve is chaotic in such bits)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(tokens, n_experts, generator=g)
    indices = torch.randint(0, n_experts, (tokens, k), generator=g)
    for batch in (1, 4):
        assert torch.equal(balance_loss(scores, indices, batch, n_experts),
                           plain_balance_loss(scores, indices, batch, n_experts))


def test_bias_update_moves_a_skewed_router_toward_uniform():
    cfg = tiny_config(num_nextn_predict_layers=0, n_group=1, topk_group=1, aux_loss_alpha=0.0)
    model = CausalLM(cfg)
    gate = model.model.layers[1].mlp.gate
    x = torch.randint(0, cfg.vocab_size, (4, 16))
    with torch.no_grad():  # a direction common to every token, which expert 0 favours
        c = torch.randn(cfg.hidden_size)
        model.model.embed_tokens.weight += 0.1 * c / c.norm()
        gate.weight.normal_(0, 0.3)
        gate.weight[0] += 2.0 * c / c.norm()

    def violation():
        with torch.no_grad():
            model(x)
        load = model.expert_load()[0]
        model.update_router_biases(gamma=0.0)  # only reset the counters
        return (load.max() / load.mean() - 1).item()

    before = violation()
    for _ in range(100):
        with torch.no_grad():
            model(x)
        model.update_router_biases(gamma=0.02)
    after = violation()
    assert before > 1.5 and after < 0.5 * before
    assert gate.e_score_correction_bias[0] < 0  # the overloaded expert was pushed down


def test_gradients_reach_every_learnable_parameter_and_not_the_bias():
    cfg = tiny_config(num_nextn_predict_layers=1, aux_loss_alpha=0.01)
    model = randomize(CausalLM(cfg)).train()
    ids = torch.randint(0, cfg.vocab_size, (4, 32))
    out = model.loss(ids[:, :-1], ids[:, 1:])
    assert out.mtp_loss is not None and out.aux_loss is not None
    out.loss.backward()
    for name, p in model.named_parameters():
        if ".experts." in name:
            continue  # an expert that received no token legitimately has no gradient
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert any(p.grad is not None for n, p in model.named_parameters() if ".experts." in n)
    assert any(n.startswith("mtp.0.") and p.grad.abs().sum() > 0 for n, p in model.named_parameters())
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert not b.requires_grad and b.grad is None


def test_mtp_loss_targets_tokens_two_ahead():
    """An MTP module whose logits were perfect for t_{i+2} gets ~0 loss: check target alignment
    by comparing with a hand-built cross-entropy."""
    cfg = tiny_config(aux_loss_alpha=0.0)
    model = randomize(CausalLM(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    inp, labels = ids[:, :-1], ids[:, 1:]
    out = model.loss(inp, labels)
    with torch.no_grad():
        h = model.hidden(inp)
        pos = torch.arange(15).expand(2, 15)
        _, logits = model.mtp_forward(0, h[:, :14], inp[:, 1:], pos[:, :14])
        ref = F.cross_entropy(logits.flatten(0, 1), ids[:, 2:].flatten())
    assert out.mtp_loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + cfg.mtp_loss_weight * ref.item(), rel=1e-5)
