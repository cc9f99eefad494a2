"""DeepSeek-V3.2's sparse attention: same logits and gradients as transformers'
DeepseekV32ForCausalLM, cached decoding equal to the full forward, and the indexer's KL
training (dense warm-up and sparse stage) with gradients only where the paper sends them."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from nanoseek.config import preset
from nanoseek.model import CausalLM, ContiguousCache
from nanoseek.model.attention import MLA
from nanoseek.model.dsa import (LightningIndexer, apply_rotary_emb_half, freeze_all_but_indexers,
                                indexer_kl, indexer_kl_divergence, indexer_loss, top_k_indices, top_k_mask)
from tests.conftest import randomize, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def v32_config(**overrides):
    """tiny_config's V3 (q-LoRA, YaRN, grouped routing, a shared expert) plus an indexer that
    keeps 8 keys: sequences of 40+ tokens attend sparsely. 16 indexer heads make exact ties
    of I (every head's ReLU at 0) too rare to straddle a top-k boundary, where transformers'
    torch.topk and our earliest-token rule may pick differently (see dsa.top_k_mask)."""
    base = dict(arch="v32", index_n_heads=16, index_head_dim=16, index_topk=8, num_nextn_predict_layers=0)
    return tiny_config(**{**base, **overrides})


def hf_v32(cfg):
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")}
    return randomize(transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**d)).eval())


def per_expert(hf_state: dict) -> dict:
    """transformers' fused expert tensors [E, 2I, D] / [E, D, I] as nanoseek's per-expert Linears."""
    out = {}
    for k, v in hf_state.items():
        if k.endswith("experts.gate_up_proj"):
            gate, up = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate[e]
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = up[e]
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                out[k.replace("down_proj", f"{e}.down_proj.weight")] = v[e]
        else:
            out[k] = v
    return out


def ours_from(hf, cfg) -> CausalLM:
    """nanoseek with transformers' weights (its width-0 shared experts, for
    n_shared_experts=0, have no counterpart)."""
    ours = CausalLM(cfg).eval()
    state = {k: v for k, v in per_expert(hf.state_dict()).items() if v.numel() > 0}
    ours.load_state_dict(state, strict=True)
    return ours


def no_sparsity(model: CausalLM) -> None:
    for m in model.modules():
        if isinstance(m, LightningIndexer):
            m.index_topk = 10 ** 9


@pytest.mark.parametrize("cfg,S,tol", [
    (v32_config(), 48, TOL),
    (v32_config(rope_scaling=None, n_group=1, topk_group=1, n_shared_experts=0), 40, TOL),
    # 4 layers of width 256 with logits up to ~12: fp32 rounding alone reaches 2.6e-5 here
    # (V3's `tiny` preset against DeepseekV3ForCausalLM), so the bound is relative.
    (preset("tiny-v32", index_n_heads=16, num_nextn_predict_layers=0), 80, "relative"),
], ids=["tiny-yarn", "tiny-plain", "preset-tiny-v32"])
def test_logits_match_transformers(cfg, S, tol):
    hf = hf_v32(cfg)
    ours = ours_from(hf, cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, S))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
        no_sparsity(ours)
        dense = ours(ids)
    assert ref.abs().max() > 0.5, "logits too small for the comparison to mean anything"
    if tol == "relative":
        tol = TOL * ref.abs().max().item()
    assert (ref - got).abs().max().item() <= tol
    assert (dense - got).abs().max().item() > 0.1, "top-k selection changed nothing"


def test_rope_of_the_indexer_is_half_split_like_transformers():
    """The indexer's rope pairs (x_i, x_{i+d/2}), as DeepSeek's reference (interleaved=False)
    and transformers' apply_rotary_pos_emb (rotate_half); MLA's own rope pairs neighbours."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb
    cfg = v32_config()
    pos = torch.arange(11)[None]
    x = torch.randn(1, 11, 3, cfg.qk_rope_head_dim)
    ours = apply_rotary_emb_half(x, CausalLM(cfg).rotary(pos))
    conf = transformers.DeepseekV32Config(**{k: v for k, v in cfg.to_dict().items()
                                             if k not in ("architectures", "model_type")})
    cos, sin = transformers.models.deepseek_v32.modeling_deepseek_v32.DeepseekV32RotaryEmbedding(conf)(x, pos)
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=2)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    assert (ours - x).abs().max() > 0.1


def test_every_attention_path_applies_the_selection():
    cfg = v32_config()
    model = randomize(CausalLM(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 44))
    with torch.no_grad():
        sdpa = model(ids)
        for m in model.modules():
            if isinstance(m, MLA):
                m.impl = "naive"
        naive = model(ids)
        cache = ContiguousCache(2, 44, absorb=True)  # absorbed: attention over c_KV, k_pe
        absorbed = model(ids, cache=cache)
    torch.testing.assert_close(naive, sdpa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(absorbed, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("index_n_heads", [16, 2])  # 2 heads: many exact ties of I at 0
def test_decode_and_chunked_prefill_equal_the_full_forward(index_n_heads):
    cfg = v32_config(index_n_heads=index_n_heads)
    model = randomize(CausalLM(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(ids)
        cache = ContiguousCache(2, 40, absorb=False)
        prefill = model(ids[:, :12], cache=cache)
        cache.absorb = True
        steps = [model(ids[:, t:t + 1], cache=cache) for t in range(12, 40)]
        chunked_cache = ContiguousCache(2, 40, absorb=False)
        chunks = [model(ids[:, a:b], cache=chunked_cache) for a, b in [(0, 5), (5, 21), (21, 40)]]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_holds_the_indexer_keys():
    cfg = v32_config()
    model = CausalLM(cfg).eval()
    cache = ContiguousCache(1, 16)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, 16)), cache=cache)
    shapes = [tuple(t.shape[2:]) for t in cache.layers[0]]
    assert shapes == [(cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,), (cfg.index_head_dim,)]


def test_top_k_ties_go_to_the_earliest_tokens_whatever_the_row_length():
    scores = torch.tensor([[[0.0, 2.0, 0.0, 0.0, 1.0, 0.0]]])
    assert top_k_mask(scores, 3).tolist() == [[[True, True, False, False, True, False]]]
    padded = torch.cat([scores, torch.full((1, 1, 5), float("-inf"))], dim=-1)
    assert torch.equal(top_k_mask(padded, 3)[..., :6], top_k_mask(scores, 3))
    assert top_k_mask(scores, 4).sum() == 4


def test_top_k_indices_are_the_masks_positions_in_order():
    """One selection for both paths: top_k_mask is top_k_indices scattered, ties (many: scores
    from {0, 1, 2}) to the earliest tokens, -inf padding last, and a NaN score counts as -inf."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (2, 5, 30), generator=g).float()
    scores[1, :, 20:] = float("-inf")
    for k in (1, 7, 25, 30):
        idx = top_k_indices(scores, k)
        mask = top_k_mask(scores, k)
        assert idx.shape == (2, 5, k) and (idx.diff(dim=-1) > 0).all()
        assert torch.equal(torch.zeros_like(mask).scatter_(-1, idx, True), mask)
        kth = scores.sort(-1, descending=True).values[..., k - 1:k]
        assert ((scores > kth) <= mask).all() and (mask <= (scores >= kth)).all()
        first_ties = (scores == kth) & ~mask  # every tie left out comes after every tie kept
        last_kept = torch.where((scores == kth) & mask, torch.arange(30), -1).amax(-1, keepdim=True)
        assert (torch.where(first_ties, torch.arange(30), 99) > last_kept).all()
    nan = scores.clone()
    nan[0, 0, 3] = float("nan")
    assert top_k_indices(nan, 7)[0, 0].tolist() == top_k_indices(nan[0, 0].nan_to_num(float("-inf")), 7).tolist()


def _masked_decode(monkeypatch):
    """Decode as before the top-k gather: every cached latent, the top-k as a mask."""
    monkeypatch.setattr(MLA, "reads_top_k", lambda self, cache: False)


@pytest.mark.parametrize("index_n_heads,mode", [(16, "sparse"), (2, "sparse"), (16, "dense")])
def test_cached_decode_gathers_the_top_k_and_equals_the_masked_path(index_n_heads, mode, monkeypatch):
    """Token-by-token decode with a ContiguousCache reads k latents per query (index_topk once
    the context is longer; every one before, and in the dense warm-up) and gives the logits
    of the masked path over all T in fp32, to 1e-6 of the largest logit (2 indexer heads:
    many ties at the top-k cut)."""
    cfg = v32_config(index_n_heads=index_n_heads, indexer_mode=mode)
    model = randomize(CausalLM(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    read = []
    attend = MLA.attend_top_k
    monkeypatch.setattr(MLA, "attend_top_k", lambda self, q_nope, q_pe, c_kv, k_pe, valid: (
        read.append((c_kv.shape[2], int(valid.sum(-1).max()))), attend(self, q_nope, q_pe, c_kv, k_pe, valid))[1])

    def decode():
        cache = ContiguousCache(2, 30, absorb=False)
        with torch.no_grad():
            out = [model(ids[:, :4], cache=cache)]
            cache.absorb = True
            out += [model(ids[:, t:t + 1], cache=cache) for t in range(4, 30)]
        return torch.cat(out, dim=1)
    gathered = decode()
    with monkeypatch.context() as m:
        _masked_decode(m)
        masked = decode()
    want = [(T, T) if mode == "dense" or T <= cfg.index_topk else (cfg.index_topk, cfg.index_topk)
            for T in range(5, 31) for _ in range(cfg.num_hidden_layers)]
    assert read == want
    # Summing over k latents instead of T (zeros included) rounds differently: a few ulps
    # (1.5e-6 at logits of 3.3 here); the dense warm-up, k = T, is bit-identical.
    assert (gathered - masked).abs().max().item() <= 1e-6 * masked.abs().max().item()
    assert masked.abs().max() > 0.5
    if mode == "dense":
        assert torch.equal(gathered, masked)


def test_gradients_match_transformers_outside_the_indexer():
    """One backward of the LM loss: every non-indexer parameter's gradient equals
    transformers'; the indexer gets none (its top-k passes no gradient)."""
    cfg = v32_config()
    hf = hf_v32(cfg)
    ours = ours_from(hf, cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 44))
    labels = torch.randint(0, cfg.vocab_size, (2, 44))
    F.cross_entropy(hf(ids).logits.flatten(0, 1), labels.flatten()).backward()
    F.cross_entropy(ours(ids).flatten(0, 1), labels.flatten()).backward()
    ref = per_expert({k: p.grad for k, p in hf.named_parameters() if ".indexer." not in k})
    checked = 0
    for name, p in ours.named_parameters():
        if ".indexer." in name:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, ref[name], atol=1e-5, rtol=1e-4, msg=name)
            checked += p.grad.abs().sum() > 0
    assert checked > 20


def _grads(loss, params):
    return [g for g in torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True) if g is not None]


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_the_indexer_learns_only_from_its_kl_and_the_model_only_from_the_lm_loss(mode):
    cfg = v32_config(indexer_mode=mode)
    model = randomize(CausalLM(cfg)).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    lm = F.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
    l_i = indexer_loss(model)
    index_params = [p for n, p in model.named_parameters() if ".indexer." in n]
    main_params = [p for n, p in model.named_parameters() if ".indexer." not in n]
    assert _grads(lm, index_params) == []
    assert all(g.abs().max() == 0 for g in _grads(l_i, main_params))
    assert len(_grads(l_i, index_params)) == len(index_params) == 5 * cfg.num_hidden_layers
    assert all(g.abs().max() > 0 for g in _grads(l_i, index_params))


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_the_kl_runs_over_s_t_in_the_sparse_stage_and_every_earlier_token_in_the_warm_up(mode, monkeypatch):
    cfg = v32_config(indexer_mode=mode)
    model = randomize(CausalLM(cfg)).train()
    seen = []
    monkeypatch.setattr(LightningIndexer, "learn", lambda self, scores, probs, allowed, token_mask=None:
                        seen.append((probs, allowed.expand_as(scores))))
    S = 40
    model(torch.randint(0, cfg.vocab_size, (2, S)))
    assert len(seen) == cfg.num_hidden_layers
    visible = torch.arange(1, S + 1)  # tokens 0..t
    for probs, allowed in seen:
        want = visible.clamp(max=cfg.index_topk) if mode == "sparse" else visible
        assert torch.equal(allowed.sum(-1), want.expand(2, S))
        assert probs.sum(2).masked_select(~allowed).abs().max() == 0  # the main attention too
        if mode == "dense":
            assert torch.equal(allowed, torch.ones(S, S, dtype=torch.bool).tril().expand(2, S, S))


def test_indexer_loss_is_set_only_by_a_training_forward_and_scaled_by_its_coefficient():
    ids = torch.randint(0, 97, (2, 40))
    model = randomize(CausalLM(v32_config(indexer_loss_coef=1.0)))
    scaled = randomize(CausalLM(v32_config(indexer_loss_coef=0.25)))
    with torch.no_grad():
        model.eval()(ids)
        assert indexer_loss(model) is None and indexer_kl(model) is None
        model.train()(ids)
        scaled.train()(ids)
    kl = indexer_kl(model)
    assert kl > 0
    torch.testing.assert_close(indexer_loss(model), torch.tensor(kl * cfg_layers(model)))
    torch.testing.assert_close(indexer_loss(scaled), 0.25 * indexer_loss(model))


def test_padding_queries_stay_out_of_the_indexer_loss():
    """Right-padded rows (PaddedRows' token_mask): L_I averages over the real tokens only, so
    a row with padding gives the loss of the row alone."""
    from nanoseek.model.cache import PaddedRows
    model = randomize(CausalLM(v32_config())).train()
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        model(ids[:, :30])
        alone = indexer_loss(model)
        model(ids, cache=PaddedRows(torch.arange(40)[None] < 30))
        padded = indexer_loss(model)
        model(ids)
        unmasked = indexer_loss(model)
    torch.testing.assert_close(padded, alone)
    assert (unmasked - alone).abs() > 1e-3


def cfg_layers(model: CausalLM) -> int:
    return model.config.num_hidden_layers


def test_kl_is_the_papers_over_the_allowed_keys():
    """KL(p || Softmax(I)) with p = heads' attention summed and L1-normalised, both restricted
    to the allowed set (S_t in the sparse stage), against torch's own KL."""
    torch.manual_seed(1)
    probs = torch.rand(2, 5, 3, 7).softmax(-1)
    scores = torch.randn(2, 5, 7)
    allowed = torch.rand(2, 5, 7) > 0.4
    allowed[..., 0] = True
    got = indexer_kl_divergence(scores, probs, allowed)
    for b in range(2):
        for t in range(5):
            keep = allowed[b, t]
            p = probs[b, t].sum(0)[keep]
            p = p / p.sum()
            q = scores[b, t][keep].softmax(-1)
            ref = torch.distributions.kl_divergence(torch.distributions.Categorical(p), torch.distributions.Categorical(q))
            torch.testing.assert_close(got[b, t], ref)


def test_kl_of_a_query_without_allowed_keys_is_zero_with_a_finite_gradient():
    """V4's first queries see no closed entry yet (the KL code is shared): such a row scores 0
    and sends no NaN into the backward."""
    scores = torch.randn(1, 3, 4, requires_grad=True)
    allowed = torch.tensor([[[False] * 4, [True, False, False, False], [True, True, False, True]]])
    kl = indexer_kl_divergence(scores, torch.rand(1, 3, 2, 4), allowed)
    assert kl[0, 0] == 0 and kl[0, 1].abs() < 1e-6 and kl[0, 2] > 0
    kl.sum().backward()
    assert torch.isfinite(scores.grad).all() and scores.grad[0, 0].abs().max() == 0


def test_the_warm_up_switch_is_the_indexers_mode():
    """One switch, the indexer's `mode` (V4's CSA indexer reads the same attribute, through the
    same `attends_all`): flipping it on a sparse model gives the dense-built model's logits."""
    sparse = randomize(CausalLM(v32_config())).eval()
    dense = CausalLM(v32_config(indexer_mode="dense")).eval()
    dense.load_state_dict(sparse.state_dict())
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = dense(ids)
        assert (sparse(ids) - want).abs().max() > 1e-3  # the top-8 binds at 40 tokens
        for m in sparse.modules():
            if isinstance(m, LightningIndexer):
                m.mode = "dense"
        assert torch.equal(sparse(ids), want)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_a_few_steps_on_the_indexer_loss_lower_it(mode):
    """The dense warm-up as the paper runs it: the main model frozen, only the indexers
    trained on L_I (and the sparse stage's L_I over S_t, with the same optimiser)."""
    cfg = v32_config(indexer_mode=mode)
    model = randomize(CausalLM(cfg)).train()
    params = freeze_all_but_indexers(model)
    assert len(params) == 5 * cfg.num_hidden_layers
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".indexer." not in n)
    opt = torch.optim.Adam(params, lr=3e-2)
    ids = torch.randint(0, cfg.vocab_size, (4, 40))
    kls = []
    for _ in range(15):
        model(ids)
        loss = indexer_loss(model)
        kls.append(indexer_kl(model))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kls[-1] < 0.8 * kls[0], kls


def test_indexer_loss_coef_zero_computes_no_target():
    """indexer_loss_coef 0: a training forward leaves no indexer loss (nor the main attention's
    distribution it would need), and the model's loss has no indexer term."""
    from nanoseek.model.dsa import indexers

    for name in ("tiny-v32", "tiny-v4"):
        model = CausalLM(preset(name, vocab_size=64, hidden_size=64, indexer_loss_coef=0.0)).train()
        ids = torch.randint(3, 64, (1, 65))
        out = model.loss(ids[:, :-1], ids[:, 1:])
        assert out.indexer_loss is None and all(m.indexer_loss is None for m in indexers(model))
