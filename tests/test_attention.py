"""MLA's three paths agree, and decoding over the latent cache reproduces a full forward."""

import pytest
import torch

from nanoseek.model import CausalLM, ContiguousCache
from tests.conftest import randomize, tiny_config


def _qkv(attn, cfg, B=2, S=9):
    x = torch.randn(B, S, cfg.hidden_size)
    pos = torch.arange(S).expand(B, S)
    return attn.project(x, CausalLM(cfg).rotary(pos))


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_sdpa_naive_and_absorbed_paths_agree(q_lora_rank):
    cfg = tiny_config(q_lora_rank=q_lora_rank)
    model = randomize(CausalLM(cfg))
    attn = model.model.layers[0].self_attn
    q_nope, q_pe, c_kv, k_pe = _qkv(attn, cfg)
    sdpa = attn.attend_sdpa(q_nope, q_pe, c_kv, k_pe, None)
    naive = attn.attend_naive(q_nope, q_pe, c_kv, k_pe, None)
    absorbed = attn.attend_absorbed(q_nope, q_pe, c_kv, k_pe, None)
    assert sdpa.abs().max() > 0.1
    torch.testing.assert_close(naive, sdpa, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(absorbed, sdpa, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention_type,kv_heads", [("mla", None), ("mha", None), ("gqa", 2), ("mqa", None)])
def test_decode_token_by_token_matches_full_forward(attention_type, kv_heads):
    cfg = tiny_config(attention_type=attention_type, num_key_value_heads=kv_heads)
    model = randomize(CausalLM(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = ContiguousCache(2, 24)  # absorb=True: MLA decodes in latent space
        steps = [model(ids[:, t:t + 1], cache=cache) for t in range(24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_then_decode_matches_full_forward():
    cfg = tiny_config()
    model = randomize(CausalLM(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(ids)
        cache = ContiguousCache(3, 20, absorb=False)
        a = model(ids[:, :7], cache=cache)        # prefill, decompressed
        b = model(ids[:, 7:12], cache=cache)      # a second chunk attends to the first
        cache.absorb = True
        c = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(12, 20)], dim=1)
    torch.testing.assert_close(torch.cat([a, b, c], dim=1), full, atol=1e-4, rtol=1e-4)


def test_latent_cache_holds_only_c_kv_and_k_pe():
    cfg = tiny_config(num_nextn_predict_layers=0)
    model = CausalLM(cfg).eval()
    cache = ContiguousCache(1, 16)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, 16)), cache=cache)
    per_token = cache.nbytes() / 16
    assert per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    shapes = {tuple(t.shape[2:]) for bufs in cache.layers.values() for t in bufs}
    assert shapes == {(cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)}


def test_generate_greedy_equals_argmax_of_full_forwards():
    cfg = tiny_config()
    model = randomize(CausalLM(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    out = model.generate(ids, max_new_tokens=8)
    ref = ids
    with torch.no_grad():
        for _ in range(8):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_yarn_scale_changes_logits_and_softmax_scale():
    from nanoseek.model.rope import softmax_scale
    plain = tiny_config(rope_scaling=None)
    yarn = tiny_config(rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 64,
                                     "mscale": 0.707, "mscale_all_dim": 0.707})
    m = 0.1 * 0.707 * torch.log(torch.tensor(40.0)).item() + 1
    assert softmax_scale(yarn) == pytest.approx(softmax_scale(plain) * m * m)
