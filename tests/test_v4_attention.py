"""V4 attention (sliding, CSA, HCA) against transformers' DeepseekV4Attention; cached decoding; the indexer's training."""

import pytest
import torch
import transformers
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

from nanoseek.config import ModelConfig
from nanoseek.config.model_config import CSA, HCA, SLIDING
from nanoseek.model.cache import ContiguousCache, PaddedRows
from nanoseek.model.v4.attention import V4Attention
from nanoseek.model.v4.compressor import visible_entries

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
KINDS = [SLIDING, CSA, HCA]
S = 100  # crosses 6 sliding windows, 25 CSA windows, 6 HCA windows


def v4_config(**overrides) -> ModelConfig:
    """Window 16, m = 4, m' = 16, top-5 of up to 25 entries, YaRN on the compressed rope;
    8 indexer heads, so ReLU rarely zeroes a score (ties would make top-k arbitrary)."""
    base = dict(
        arch="v4", vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        head_dim=16, qk_rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=8,
        sliding_window=16, compress_rate_csa=4, compress_rate_hca=16, layer_types=KINDS,
        mlp_layer_types=["hash_moe", "moe", "moe"], index_n_heads=8, index_head_dim=12,
        index_topk=5, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        scoring_func="sqrtsoftplus", max_position_embeddings=512,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                      "beta_fast": 32, "beta_slow": 1})
    return ModelConfig(**{**base, **overrides})


def hf_config(cfg: ModelConfig) -> transformers.DeepseekV4Config:
    d = cfg.to_dict()
    conf = transformers.DeepseekV4Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    conf._attn_implementation = "eager"
    return conf


def layer(cfg: ModelConfig, kind: str, seed: int = 0) -> V4Attention:
    """A layer of `kind` with weights far from their init (sinks and position biases too)."""
    attn = V4Attention(cfg, KINDS.index(kind))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return attn


def hf_forward(cfg: ModelConfig, ours: V4Attention, x: torch.Tensor):
    """transformers' DeepseekV4Attention with our weights, its inputs built as DeepseekV4Model does."""
    conf = hf_config(cfg)
    theirs = hf_v4.DeepseekV4Attention(conf, ours.layer_id)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    B, S = x.shape[:2]
    pos = torch.arange(S).expand(B, S)
    rotary = hf_v4.DeepseekV4RotaryEmbedding(conf)
    pe = {kind: rotary(x, position_ids=pos, layer_type=kind) for kind in ("main", "compress")}
    mask = create_sliding_window_causal_mask(config=conf, inputs_embeds=x, attention_mask=None,
                                             cache=None, position_ids=pos)
    out, _ = theirs(x, position_embeddings=pe, position_ids=pos, attention_mask=mask)
    return out, theirs


def positions(B: int, start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n).expand(B, n)


def assert_no_ties_at_the_cut(attn: V4Attention, x: torch.Tensor) -> None:
    """transformers' topk breaks ties arbitrarily, nanoseek's for the earlier entry: a parity
    test means something only if the k-th and (k+1)-th best scores differ in every row."""
    seen = []
    handle = attn.compressor.indexer.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    with torch.no_grad():
        attn(x, positions(x.shape[0], 0, x.shape[1]))
    handle.remove()
    top = seen[0].sort(dim=-1, descending=True).values[..., :attn.compressor.indexer.index_topk + 1]
    k, k1 = top[..., -2], top[..., -1]
    assert not ((k == k1) & (k1 > float("-inf"))).any()


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_transformers(kind):
    cfg = v4_config()
    ours, x = layer(cfg, kind), torch.randn(2, S, cfg.hidden_size)
    if kind == CSA:
        assert_no_ties_at_the_cut(ours, x)
    with torch.no_grad():
        out = ours(x, positions(2, 0, S))
        ref, _ = hf_forward(cfg, ours, x)
    assert ref.abs().max() > 0.5, "outputs too small for the comparison to mean anything"
    assert (out - ref).abs().max().item() <= TOL


def test_csa_reads_fewer_entries_than_it_may_see():
    """The top-k is binding in these tests: with index_topk >= entries the CSA output changes."""
    cfg = v4_config()
    ours, x = layer(cfg, CSA), torch.randn(1, S, cfg.hidden_size)
    dense = V4Attention(v4_config(index_topk=1000), 1)
    dense.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (ours(x, positions(1, 0, S)) - dense(x, positions(1, 0, S))).abs().max() > 1e-2


def test_dense_indexer_mode_attends_every_visible_entry():
    """indexer_mode "dense" (the warm-up) reads every closed entry: transformers with a top-k
    larger than the number of entries."""
    cfg = v4_config(indexer_mode="dense")
    ours, x = layer(cfg, CSA), torch.randn(2, S, cfg.hidden_size)
    with torch.no_grad():
        out = ours(x, positions(2, 0, S))
        ref, _ = hf_forward(v4_config(index_topk=1000), ours, x)
    assert (out - ref).abs().max().item() <= TOL


def test_compressed_entries_wait_for_their_window_to_close():
    vis = visible_entries(torch.arange(10), 3, 4)
    assert vis[2].tolist() == [False, False, False]  # tokens 0..2: window 0 still open
    assert vis[3].tolist() == [True, False, False]  # token 3 closes window 0
    assert vis[7].tolist() == [True, True, False] and vis[9].tolist() == [True, True, False]


@pytest.mark.parametrize("kind", KINDS)
def test_one_backward_matches_transformers(kind):
    cfg = v4_config()
    ours, x = layer(cfg, kind), torch.randn(2, 60, cfg.hidden_size)
    w = torch.randn(2, 60, cfg.hidden_size)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ours(xo, positions(2, 0, 60)) * w).sum().backward()
    ref, theirs = hf_forward(cfg, ours, xt)
    (ref * w).sum().backward()
    assert (xo.grad - xt.grad).abs().max().item() <= TOL
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters()}
    compared = 0
    for name, p in ours.named_parameters():
        ref_grad = theirs_grads[name]
        assert (p.grad is None) == (ref_grad is None), name
        if ref_grad is not None:
            # fp32 sums of ~100 terms: 1e-5 of the gradient's scale (up to ~20 here)
            scale = max(1.0, ref_grad.abs().max().item())
            assert (p.grad - ref_grad).abs().max().item() <= TOL * scale, name
            compared += 1
    # q_a, q_b, kv, o_a, o_b projections, q_a/kv norms, sinks; + the compressor's kv, gate,
    # position bias, norm (the indexer has no LM gradient in either)
    assert compared == 8 + (4 if kind != SLIDING else 0)


def test_training_forward_trains_every_parameter():
    """LM loss + indexer loss reach every parameter of a CSA layer (the indexer's only through
    its loss), and the indexer loss is set only in a training forward."""
    cfg = v4_config(indexer_loss_coef=0.5)
    ours, x = layer(cfg, CSA).train(), torch.randn(2, 60, cfg.hidden_size)
    indexer = ours.compressor.indexer
    out = ours(x, positions(2, 0, 60))
    assert indexer.indexer_loss is not None and indexer.indexer_loss.item() > 0
    (out.square().mean() + indexer.indexer_loss).backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    ours.eval()
    with torch.no_grad():
        ours(x, positions(2, 0, 60))
    assert indexer.indexer_loss is None


def test_indexer_loss_trains_only_the_indexer():
    cfg = v4_config()
    ours, x = layer(cfg, CSA).train(), torch.randn(1, 40, cfg.hidden_size)
    ours(x, positions(1, 0, 40))
    ours.compressor.indexer.indexer_loss.backward()
    for name, p in ours.named_parameters():
        assert (p.grad is not None) == name.startswith("compressor.indexer."), name


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_indexer_loss_is_the_kl_to_the_attention(mode):
    """KL(p ‖ softmax(I)) over the candidates: zero when the scores are log p (+ a constant per
    query), positive otherwise, and scaled by indexer_loss_coef."""
    cfg = v4_config(indexer_mode=mode, indexer_loss_coef=2.0)
    indexer = V4Attention(cfg, 1).compressor.indexer
    g = torch.Generator().manual_seed(0)
    visible = visible_entries(torch.arange(30), 7, 4)[None]
    candidates = visible & (torch.rand(1, 30, 7, generator=g) < 0.7)
    attention = torch.rand(1, 30, 3, 7, generator=g) + 0.1  # [B, S, heads, N]
    p = attention.sum(2) * candidates
    matching = (p / p.sum(-1, keepdim=True).clamp_min(1e-30)).log() + 3.0
    indexer.learn(matching, attention, candidates)
    assert abs(indexer.indexer_loss.item()) < 1e-5
    scores = torch.randn(1, 30, 7, generator=g)
    indexer.learn(scores, attention, candidates)
    off = indexer.indexer_loss.item()
    indexer.loss_coef = 1.0
    indexer.learn(scores, attention, candidates)
    assert off > 0 and off == pytest.approx(2 * indexer.indexer_loss.item())
    assert indexer.kl.item() == pytest.approx(indexer.indexer_loss.item())
    # padding queries (token_mask False) are left out of the mean
    real = torch.arange(30)[None] < 18
    indexer.learn(scores, attention, candidates, token_mask=real)
    padded = indexer.indexer_loss.item()
    indexer.learn(scores[:, :18], attention[:, :18], candidates[:, :18])
    assert padded == pytest.approx(indexer.indexer_loss.item())


def run_in_chunks(attn: V4Attention, x: torch.Tensor, sizes: list[int]):
    B = x.shape[0]
    cache = ContiguousCache(B, x.shape[1])
    outs, start = [], 0
    with torch.no_grad():
        for n in sizes:
            assert cache.length == start
            outs.append(attn(x[:, start:start + n], positions(B, start, n), cache))
            start += n
    assert cache.length == x.shape[1]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_token_by_token_equals_full_forward(kind):
    cfg = v4_config()
    attn, x = layer(cfg, kind), torch.randn(2, 70, cfg.hidden_size)
    with torch.no_grad():
        full = attn(x, positions(2, 0, 70))
    inc, cache = run_in_chunks(attn, x, [23] + [1] * 47)
    assert (inc - full).abs().max().item() <= TOL
    # the window keeps n_win - 1 tokens; the compressor an open window (< m tokens) and its entries
    state = cache.states[KINDS.index(kind)]
    assert state.window.shape[1] == cfg.sliding_window - 1
    if kind != SLIDING:
        rate = cfg.compress_rate(kind)
        comp = state.compressors["compressor"]
        assert comp.entries.shape[1] == 70 // rate and comp.pending_kv.shape[1] == 70 % rate
    assert cache.nbytes() == state_bytes(cfg, kind, batch=2, tokens=70)


def state_bytes(cfg, kind: str, batch: int, tokens: int) -> int:
    """What a V4 layer's state holds after `tokens` tokens, counted from its parts: the last
    n_win - 1 keys; per compressor its entries, the open window's kv and gate logits (coff·d
    each) and, overlapping (CSA), the last closed window's C^a half, kv and logits."""
    def compressor(rate: int, d: int, overlap: bool) -> int:
        coff = 2 if overlap else 1
        return (tokens // rate) * d + 2 * (tokens % rate) * coff * d + (2 * rate * d if overlap else 0)
    n = (cfg.sliding_window - 1) * cfg.head_dim
    if kind != SLIDING:
        n += compressor(cfg.compress_rate(kind), cfg.head_dim, kind == CSA)
    if kind == CSA:
        n += compressor(cfg.compress_rate(kind), cfg.index_head_dim, True)
    return batch * n * 4  # fp32


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_equals_full_forward(kind):
    """Chunks that are not multiples of m or m', some shorter than one window."""
    cfg = v4_config()
    attn, x = layer(cfg, kind), torch.randn(2, S, cfg.hidden_size)
    with torch.no_grad():
        full = attn(x, positions(2, 0, S))
    inc, _ = run_in_chunks(attn, x, [7, 5, 13, 1, 3, 22, 2, 17, 30])
    assert (inc - full).abs().max().item() <= TOL


def test_cache_refuses_tokens_past_its_length():
    cfg = v4_config()
    attn = layer(cfg, HCA)
    cache = ContiguousCache(1, 8)
    with pytest.raises(ValueError, match="cache holds 8 tokens"):
        attn(torch.randn(1, 9, cfg.hidden_size), positions(1, 0, 9), cache)


def test_padded_rows_cache_runs_the_full_forward():
    cfg = v4_config()
    attn, x = layer(cfg, CSA), torch.randn(2, 30, cfg.hidden_size)
    with torch.no_grad():
        full = attn(x, positions(2, 0, 30))
        padded = attn(x, positions(2, 0, 30), PaddedRows(torch.ones(2, 30, dtype=torch.bool)))
    assert torch.equal(full, padded)


def test_unknown_cache_type_is_refused():
    cfg = v4_config()
    with pytest.raises(TypeError, match="v4_state"):
        layer(cfg, SLIDING)(torch.randn(1, 3, cfg.hidden_size), positions(1, 0, 3), object())


def test_parameter_names_are_transformers():
    cfg = v4_config()
    conf = hf_config(cfg)
    for i, kind in enumerate(KINDS):
        ours = set(V4Attention(cfg, i).state_dict())
        theirs = set(hf_v4.DeepseekV4Attention(conf, i).state_dict())
        assert ours == theirs, kind


# ------------------------------------------------------------------------------- bf16
def kept_fp32(module: torch.nn.Module) -> set[str]:
    """Names of the parameters bf16 training keeps in fp32, as train/numerics/bf16_weights.py
    reads them: those a module names in `fp32_parameters`, every own parameter of a module
    with `runs_in_fp32`."""
    ids = {id(m.get_parameter(n)) for m in module.modules() for n in getattr(m, "fp32_parameters", ())}
    ids |= {id(p) for m in module.modules() if getattr(m, "runs_in_fp32", False)
            for p in m.parameters(recurse=False)}
    return {n for n, p in module.named_parameters() if id(p) in ids}


def bf16_but_kept(module: torch.nn.Module) -> torch.nn.Module:
    """The module as bf16 training runs it: bf16 weights, except those kept in fp32."""
    kept = kept_fp32(module)
    for name, p in module.named_parameters():
        if name not in kept:
            p.data = p.data.bfloat16()
    return module


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_training_keeps_the_sinks_and_the_compressors_in_fp32(kind):
    """DeepSeek keeps attn_sink and each compressor's wkv, wgate, ape and norm in fp32 (the
    indexer's too; its wq_b and weights_proj are bf16)."""
    compressor = {"kv_proj.weight", "gate_proj.weight", "position_bias", "kv_norm.weight"}
    want = {"sinks"}
    if kind != SLIDING:
        want |= {f"compressor.{n}" for n in compressor}
    if kind == CSA:
        want |= {f"compressor.indexer.{n}" for n in compressor}
    assert kept_fp32(V4Attention(v4_config(), KINDS.index(kind))) == want


def test_bf16_layer_compresses_in_fp32_and_hands_the_indexer_an_fp32_target(monkeypatch):
    """Under bf16 activations the compressors project x in fp32 with their fp32 weights, and
    the indexer's KL target (the attention's probabilities on the entries) stays fp32."""
    cfg = v4_config()
    ref = layer(cfg, CSA)
    attn = bf16_but_kept(layer(cfg, CSA)).train()
    x = torch.randn(2, 40, cfg.hidden_size).bfloat16()
    for name in ("compressor", "compressor.indexer"):
        got, want = attn.get_submodule(name).project(x), ref.get_submodule(name).project(x.float())
        assert all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, want)), name
    indexer = attn.compressor.indexer
    targets = []
    learn = indexer.learn
    monkeypatch.setattr(indexer, "learn", lambda s, probs, *a: (targets.append(probs), learn(s, probs, *a)))
    out = attn(x, positions(2, 0, 40))
    assert out.dtype == torch.bfloat16 and targets and targets[0].dtype == torch.float32
    (out.float().square().mean() + indexer.indexer_loss).backward()
    for name in kept_fp32(attn):
        p = attn.get_parameter(name)
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
