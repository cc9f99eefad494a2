"""FLOPs: hand-computed values, torch's FLOP counter on the real model, the published V2/V3 figures."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from nanoseek.calc.flops import attention_flops_per_token, flops_report
from nanoseek.calc.params import matmul_params
from nanoseek.cli import app
from nanoseek.config import ConfigError, preset
from nanoseek.model import CausalLM


def test_tiny_by_hand():
    cfg = preset("tiny")  # D 256, 4 heads, qk 48, v 32, 4 layers, q_lora 128, kv_lora 64
    D, H = 256, 4
    attn = D * 128 + 128 * H * 48 + D * 80 + 64 * H * 64 + H * 32 * D
    dense = 3 * D * 768
    moe = 16 * D + 1 * 3 * D * 128 + 2 * 3 * D * 128  # router + shared + 2 routed
    head = 4096 * D
    n = 4 * attn + dense + 3 * moe + head
    assert matmul_params(cfg) == n
    r = flops_report(cfg, seq_len=512, tokens=1e9)
    assert r.forward_matmul == 2 * n
    assert r.forward_attention_train == 4 * 2 * H * (48 + 32) * 256  # causal: ctx = 512/2
    assert r.backward_train == 2 * r.forward_train
    assert r.train_total == pytest.approx(3 * r.forward_train * 1e9)
    assert r.six_n_total == pytest.approx(6 * n * 1e9)
    assert r.decode_forward_absorbed == 2 * n + 4 * 2 * H * (2 * 64 + 16) * 512


@pytest.mark.parametrize("overrides", [{}, dict(attention_type="gqa", num_key_value_heads=2),
                                       dict(q_lora_rank=None)])
def test_matmuls_match_torch_flop_counter(overrides):
    """torch counts every matmul of a real forward of S tokens, the MoE experts on exactly
    the tokens routed to them: S x 2 x activated matmul params (attention runs in SDPA,
    counted apart below)."""
    cfg = preset("tiny", **overrides)
    model = CausalLM(cfg).eval()
    S = 64
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randint(0, cfg.vocab_size, (1, S)))
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["aten.mm"] + counts.get("aten.addmm", 0) == S * 2 * matmul_params(cfg)


def test_attention_matches_torch_flop_counter():
    """MLA's reference attention written out (q.k over qk_head_dim, p.v over v_head_dim):
    the batched matmuls torch counts are the attention term at ctx = S, for one layer."""
    cfg = preset("tiny")
    attn = CausalLM(cfg).model.layers[0].self_attn
    S, H = 64, cfg.num_attention_heads
    args = (torch.randn(1, S, H, cfg.qk_nope_head_dim), torch.randn(1, S, H, cfg.qk_rope_head_dim),
            torch.randn(1, S, cfg.kv_lora_rank), torch.randn(1, S, cfg.qk_rope_head_dim), None)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        attn.attend_naive(*args)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["aten.bmm"] == S * attention_flops_per_token(cfg, S) / cfg.num_hidden_layers


def test_published_training_flops():
    """The DeepSeek-V3 ISCA'25 paper (Insights into DeepSeek-V3, Table 2) lists training
    compute per token at sequence length 4096: V2 155 GFLOPs, V3 250 GFLOPs."""
    assert flops_report(preset("deepseek-v3"), 4096).train_per_token / 1e9 == pytest.approx(250, rel=0.01)
    assert flops_report(preset("deepseek-v2"), 4096).train_per_token / 1e9 == pytest.approx(155, rel=0.01)


def test_mtp_and_errors():
    cfg = preset("deepseek-v3")
    base, mtp = flops_report(cfg), flops_report(cfg, include_mtp=True)
    # MTP adds one block (MoE) + eh_proj + a second use of the head
    extra = 2 * (mtp.matmul_params - base.matmul_params)
    assert 2 * (0.68e9 + 0.93e9) < extra < 2 * 1.7e9
    with pytest.raises(ConfigError):
        flops_report(cfg, seq_len=0)
    with pytest.raises(ConfigError, match="absorbed"):
        attention_flops_per_token(preset("tiny", attention_type="mha"), 10, absorbed=True)


def test_cli():
    r = CliRunner().invoke(app, ["calc", "flops", "--preset", "deepseek-v3", "--tokens", "1e12", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["train_total"] == pytest.approx(3 * d["forward_train"] * 1e12)
    r = CliRunner().invoke(app, ["calc", "flops", "--preset", "deepseek-v3"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "250.45 GFLOPs" in r.stdout
