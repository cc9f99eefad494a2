"""DeepSeek-V4 in nanoseek: the same logits and gradients as transformers' DeepseekV4ForCausalLM,
decoding equal to the full forward, the MTP block's cached path equal to its own full forward, and
the pieces around the attention (mHC, hash routing, sqrtsoftplus, the SwiGLU clamp, the losses)."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from nanoseek.config.presets import preset
from nanoseek.model.cache import ContiguousCache
from nanoseek.model.mlp import MLP
from nanoseek.model.moe import Gate, hash_table
from nanoseek.model.transformer import CausalLM
from nanoseek.model.v4.hyper_connections import HyperConnection, doubly_stochastic_error, sinkhorn
from tests.conftest import randomize

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
S = 112  # 7 sliding windows of 16, 28 CSA entries (m = 4), 7 HCA entries (m' = 16)


def v4_config(**overrides):
    """tiny-v4's layer kinds (sliding, CSA, HCA, CSA; one hash layer then learned ones; one
    sliding-window MTP block), shrunk: the indexer keeps 8 of up to 28 entries."""
    base = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, head_dim=16, qk_rope_head_dim=8,
                q_lora_rank=24, o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=16,
                index_topk=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)
    return preset("tiny-v4", **{**base, **overrides})


def random_tid2eid(model: torch.nn.Module, n_experts: int, k: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], n_experts, generator=g).topk(k, dim=-1)[1])


def hf_to_ours(sd: dict) -> dict:
    """transformers' state dict -> nanoseek's names: fused experts gate_up_proj [E, 2I, D] =
    cat(gate, up) and down_proj [E, D, I] become one module per expert."""
    out = {}
    for name, t in sd.items():
        if name.endswith("experts.gate_up_proj"):
            for e, gate_up in enumerate(t.unbind(0)):
                gate, up = gate_up.chunk(2, dim=0)
                out[f"{name[:-len('gate_up_proj')]}{e}.gate_proj.weight"] = gate
                out[f"{name[:-len('gate_up_proj')]}{e}.up_proj.weight"] = up
        elif name.endswith("experts.down_proj"):
            for e, down in enumerate(t.unbind(0)):
                out[f"{name[:-len('down_proj')]}{e}.down_proj.weight"] = down
        elif not name.endswith("inv_freq"):
            out[name] = t
    return out


@pytest.fixture(scope="module")
def pair():
    """(transformers model, nanoseek model with the same weights), fp32, eval mode."""
    torch.manual_seed(0)
    cfg = v4_config()
    d = cfg.to_dict()
    conf = transformers.DeepseekV4Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    hf = randomize(transformers.DeepseekV4ForCausalLM(conf)).eval()
    random_tid2eid(hf, cfg.n_routed_experts, cfg.num_experts_per_tok)
    ours = CausalLM(cfg).eval()
    missing, unexpected = ours.load_state_dict(hf_to_ours(hf.state_dict()), strict=False)
    assert not unexpected
    assert all(k.startswith("mtp.") for k in missing), missing  # transformers builds no MTP block
    randomize(ours.mtp, seed=3)
    return hf, ours


def batch(n: int = 2, length: int = S, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ parity with transformers
def test_config_has_every_layer_kind():
    cfg = v4_config()
    assert set(cfg.layer_types) == {"sliding_attention", "compressed_sparse_attention",
                                    "heavily_compressed_attention"}
    assert set(cfg.mlp_layer_types) == {"hash_moe", "moe"} and cfg.num_nextn_predict_layers == 1
    assert S >= 5 * cfg.sliding_window and S // cfg.compress_rate_csa > cfg.index_topk


def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = batch()
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids)
    assert a.abs().max() > 0.5, "logits too small for the comparison to mean anything"
    assert (a - b).abs().max().item() <= TOL


def test_gradients_match_transformers(pair):
    """One backward of the same cross-entropy: every weight's gradient equals transformers'
    (relative to the tensor's largest gradient); the hash router's gate learns too."""
    hf, ours = pair
    ids = batch(seed=1)
    for m in (hf, ours):
        m.zero_grad()
        logits = getattr(m(ids), "logits", None)
        logits = m(ids) if logits is None else logits
        F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    theirs = hf_to_ours({n: p.grad for n, p in hf.named_parameters() if p.grad is not None})
    mine = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    # transformers' embedding has padding_idx = pad_token_id (no gradient to that row);
    # DeepSeek's ParallelEmbedding and nanoseek's have none: compare the other rows
    pad = hf.config.pad_token_id
    keep = torch.arange(hf.config.vocab_size) != pad
    assert (mine["model.embed_tokens.weight"][pad] != 0).any() and (theirs["model.embed_tokens.weight"][pad] == 0).all()
    for d in (theirs, mine):
        d["model.embed_tokens.weight"] = d["model.embed_tokens.weight"][keep]
    assert set(theirs) <= set(mine)
    compared = 0
    for name, g in theirs.items():
        scale = g.abs().max().item()
        if scale < 1e-8:
            continue
        assert (mine[name] - g).abs().max().item() <= TOL * scale, name
        compared += 1
    assert compared > 100
    assert theirs["model.layers.0.mlp.gate.weight"].abs().max() > 0  # hash layer: weights learn
    ours.zero_grad()
    hf.zero_grad()


# ------------------------------------------------------------------------ cached decoding
def test_prefill_then_tokens_and_chunked_prefill_equal_full_forward(pair):
    _, model = pair
    ids = batch(n=2, length=60, seed=2)
    with torch.no_grad():
        full = model(ids)
        for chunks in ([37] + [1] * 23, [5, 16, 3, 20, 16]):
            cache, start = ContiguousCache(2, 60), 0
            for n in chunks:
                logits = model(ids[:, start:start + n], cache=cache)
                assert (logits - full[:, start:start + n]).abs().max().item() <= TOL, (chunks, start)
                start += n
            assert cache.length == 60


def test_generate_is_the_full_forward_greedy(pair):
    _, model = pair
    prompt = batch(n=2, length=21, seed=3)
    out = model.generate(prompt, max_new_tokens=24)
    with torch.no_grad():
        greedy = model(out[:, :-1]).argmax(-1)
    assert torch.equal(out[:, 21:], greedy[:, 20:])


def test_mtp_cached_path_equals_its_full_forward(pair):
    """The MTP block (a sliding-window V4 block) fed the main model's streams, token by token
    and in chunks through a cache, gives the logits of its own full forward."""
    _, model = pair
    ids = batch(n=2, length=50, seed=4)
    T = ids.shape[1] - 1
    pos = torch.arange(T).expand(2, T)
    with torch.no_grad():
        _, streams = model.trunk(ids)
        assert streams.shape == (2, 50, model.config.hc_mult, model.config.hidden_size)
        full = model.mtp_logits(0, model.mtp_hidden(0, streams[:, :T], ids[:, 1:], pos))
        cache, start = ContiguousCache(2, T), 0
        for n in [20, 1, 1, 1, 9, 17]:
            x = model.mtp_hidden(0, streams[:, start:start + n], ids[:, start + 1:start + n + 1],
                                 pos[:, start:start + n], cache)
            assert (model.mtp_logits(0, x) - full[:, start:start + n]).abs().max().item() <= TOL
            start += n
    assert full.abs().max() > 0.5


# ---------------------------------------------------------------------------- training
def test_loss_parts_and_what_learns():
    """loss = lm + λ·mtp + balance (learned layers only) + the CSA indexers' losses; the
    hash layer counts its load from the table, has no bias and no balance loss; the MTP
    block's own weights get gradients."""
    torch.manual_seed(0)
    cfg = v4_config()
    model = randomize(CausalLM(cfg)).train()
    ids = batch(n=2, length=40, seed=5)
    out = model.loss(ids, ids.roll(-1, 1))
    hash_moe, learned = model.model.layers[0].mlp, model.model.layers[1].mlp
    assert hash_moe.is_hash and hash_moe.aux_loss is None and hash_moe.gate.e_score_correction_bias is None
    assert not learned.is_hash and learned.aux_loss is not None
    assert out.mtp_loss is not None and out.aux_loss is not None and out.indexer_loss is not None
    expected = out.lm_loss + cfg.mtp_loss_weight * out.mtp_loss + out.aux_loss + out.indexer_loss
    assert torch.allclose(out.loss, expected)
    csa = [layer.self_attn.compressor.indexer for layer in model.model.layers
           if layer.self_attn.layer_type == "compressed_sparse_attention"]
    assert len(csa) == 2 and torch.allclose(out.indexer_loss, sum(i.indexer_loss for i in csa))
    load = torch.bincount(hash_moe.gate.tid2eid[ids].flatten(), minlength=cfg.n_routed_experts)
    assert torch.equal(hash_moe.tokens_per_expert, load.float())
    out.loss.backward()
    errs = [m.comb_error for m in model.modules() if isinstance(m, HyperConnection)]
    assert len(errs) == 2 * (cfg.num_hidden_layers + 1) and model.comb_error() == max(errs).item()
    mtp = model.mtp[0]
    for p in (mtp.e_proj.weight, mtp.h_proj.weight, mtp.hc_head.hc_fn, mtp.attn_hc.fn,
              model.model.hc_head.hc_fn, hash_moe.gate.weight):
        assert p.grad is not None and p.grad.abs().max() > 0
    before = learned.gate.e_score_correction_bias.clone()
    model.update_router_biases(0.01)
    assert not torch.equal(before, learned.gate.e_score_correction_bias)
    assert hash_moe.tokens_per_expert.sum() == 0
    fresh = CausalLM(cfg).train()  # initialised as for pretraining: comb starts near uniform
    assert fresh.comb_error() is None
    fresh.loss(ids, ids)
    assert fresh.comb_error() < 1e-5


def test_indexer_losses_are_summed_into_the_loss():
    """Every indexer's `indexer_loss` counts, once per micro-batch share; stale ones from an
    earlier forward do not."""
    torch.manual_seed(0)
    model = randomize(CausalLM(v4_config(num_nextn_predict_layers=0))).eval()
    ids = batch(n=1, length=24, seed=6)
    attn = next(layer.self_attn for layer in model.model.layers
                if layer.self_attn.layer_type == "compressed_sparse_attention")
    attn.compressor.indexer.indexer_loss = torch.tensor(99.0)  # stale: cleared before the forward
    assert model.loss(ids, ids).indexer_loss is None
    hook = attn.register_forward_hook(
        lambda m, i, o: setattr(m.compressor.indexer, "indexer_loss", torch.tensor(0.75)))
    out = model.loss(ids, ids, num_batches=3)
    hook.remove()
    assert out.indexer_loss.item() == pytest.approx(0.25)
    assert torch.allclose(out.loss, out.lm_loss + out.indexer_loss)


# ------------------------------------------------------------------------------ pieces
def test_sinkhorn_projects_comb_onto_doubly_stochastic():
    comb = torch.rand(5, 4, 4, generator=torch.Generator().manual_seed(0)).softmax(-1) + 1e-6
    one, many = sinkhorn(comb, 1, 1e-6), sinkhorn(comb, 20, 1e-6)
    assert doubly_stochastic_error(comb) > 0.1
    assert doubly_stochastic_error(one) > 10 * doubly_stochastic_error(many)
    assert doubly_stochastic_error(many) < 1e-4
    assert torch.allclose(many.sum(-2), torch.ones(5, 4), atol=1e-5)


def test_hyper_connection_identity_start_keeps_the_streams():
    """With fn = 0, base = 0, scale = 1: pre = σ(0) + ε, post = 1, comb = the uniform matrix, so
    X' = out + mean_j X_j for every stream: the mixing formula of §2.2, checked by hand."""
    cfg = v4_config()
    hc = HyperConnection(cfg)
    with torch.no_grad():
        hc.fn.zero_()
        hc.base.zero_()
        hc.scale.fill_(1)
    X = torch.randn(2, 3, cfg.hc_mult, cfg.hidden_size)
    x, post, comb = hc(X)
    assert torch.allclose(x, (0.5 + cfg.hc_eps) * X.sum(2), atol=1e-6)
    assert torch.allclose(post, torch.ones_like(post))
    out = torch.randn(2, 3, cfg.hidden_size)
    want = out.unsqueeze(2) + X.mean(2, keepdim=True)
    assert torch.allclose(hc.expand(out, X, post, comb), want, atol=1e-5)


def test_sqrtsoftplus_gate_weights_and_bias():
    """V4's learned router: scores sqrt(softplus(z)); the bias moves the choice, not the weights;
    weights are the chosen scores normalised, times routed_scaling_factor."""
    cfg = v4_config()
    gate = Gate(cfg, layer_id=1)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    w, idx, scores, logits = gate(x)
    assert torch.allclose(scores, F.softplus(logits).sqrt())
    chosen = scores.gather(1, idx)
    assert torch.allclose(w, chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor)
    gate.e_score_correction_bias[3] = 100.0
    w2, idx2, _, _ = gate(x)
    assert (idx2 == 3).any(-1).all()
    chosen2 = scores.gather(1, idx2)
    assert torch.allclose(w2, chosen2 / chosen2.sum(-1, keepdim=True) * cfg.routed_scaling_factor)


def test_sqrtsoftplus_gradient_is_finite_for_very_negative_logits():
    """Below z ≈ -103 softplus underflows to 0 in fp32, where sqrt's backward is infinite: the
    router's gradient must stay finite, through the chosen weights (the expert with logit -120
    unchosen) and through every score (the balance loss)."""
    cfg = v4_config()
    gate = Gate(cfg, layer_id=1)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(16, cfg.hidden_size)
    x[:, 0] = 1.0
    with torch.no_grad():  # expert 0's logit is -120 for every token
        gate.weight[0] = 0.0
        gate.weight[0, 0] = -120.0
    w, idx, scores, logits = gate(x)
    assert torch.equal(logits[:, 0], torch.full((16,), -120.0)) and not (idx == 0).any()
    assert F.softplus(logits[:, 0]).eq(0).all()  # the underflow this is about
    for loss in (w.sum(), scores.sum()):
        gate.weight.grad = None
        loss.backward(retain_graph=True)
        assert torch.isfinite(gate.weight.grad).all()
    assert torch.allclose(scores[:, 1:], F.softplus(logits[:, 1:]).sqrt())


def test_hash_gate_routes_by_token_id_only():
    cfg = v4_config()
    gate = Gate(cfg, layer_id=0)
    assert gate.hash and gate.tid2eid.dtype == torch.long and "tid2eid" in gate.state_dict()
    gate.tid2eid.copy_(hash_table(cfg, 0))
    torch.nn.init.normal_(gate.weight, std=0.5)
    ids = torch.randint(0, 97, (30,))
    _, idx_a, _, _ = gate(torch.randn(30, cfg.hidden_size), ids)
    w, idx_b, scores, _ = gate(torch.randn(30, cfg.hidden_size), ids)
    assert torch.equal(idx_a, idx_b) and torch.equal(idx_a, gate.tid2eid[ids])
    chosen = scores.gather(1, idx_b)
    assert torch.allclose(w, chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor)
    with pytest.raises(ValueError, match="hash-routed MoE layer 0"):
        gate(torch.randn(3, cfg.hidden_size))


def test_hash_table_is_fixed_and_distinct():
    cfg = v4_config()
    torch.manual_seed(1)
    a = CausalLM(cfg).model.layers[0].mlp.gate.tid2eid
    torch.manual_seed(2)
    b = CausalLM(cfg).model.layers[0].mlp.gate.tid2eid
    assert torch.equal(a, b) and a.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert (a[:, 0] != a[:, 1]).all() and 0 <= a.min() and a.max() < cfg.n_routed_experts
    assert len(a.unique()) == cfg.n_routed_experts  # every expert is some token's


def test_init_of_the_v4_parameters():
    model = CausalLM(v4_config())
    hc = model.model.layers[1].attn_hc
    assert hc.base.abs().max() == 0 and torch.equal(hc.scale, torch.ones(3)) and hc.fn.std() > 0
    assert model.model.hc_head.hc_base.abs().max() == 0 and model.model.hc_head.hc_scale.item() == 1
    attn = model.model.layers[1].self_attn
    assert attn.sinks.abs().max() == 0
    biases = [p for n, p in model.named_parameters() if n.endswith("position_bias")]
    assert biases and all(p.abs().max() == 0 for p in biases)


def test_swiglu_clamp():
    """gate clamped from above at L, up to [-L, L]; L = 0 is the unclamped V3 expert."""
    torch.manual_seed(0)
    clamped, plain = MLP(8, 16, swiglu_limit=1.0), MLP(8, 16)
    plain.load_state_dict(clamped.state_dict())
    x = 10 * torch.randn(5, 8)
    gate, up = clamped.gate_proj(x), clamped.up_proj(x)
    want = clamped.down_proj(F.silu(gate.clamp(max=1.0)) * up.clamp(-1.0, 1.0))
    assert torch.allclose(clamped(x), want)
    assert torch.allclose(plain(x), clamped.down_proj(F.silu(gate) * up))
    assert not torch.allclose(clamped(x), plain(x))
