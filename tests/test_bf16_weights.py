"""bf16 weight copies with fp32 masters (train/numerics/bf16_weights.py), and the MoE's padded expert
slices in bf16 (model/moe.py `pad_slots`)."""

import pytest
import torch
from torch import nn

import nanoseek.model.moe as moe_module
from nanoseek.model import CausalLM
from nanoseek.model.moe import MoE, padded_rows
from nanoseek.train.numerics.bf16_weights import BF16Weights
from tests.test_train_loop import _trainer
from tests.train_utils import micro_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(cfg, seed=0, B=2, S=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def test_copies_are_bf16_inside_and_the_masters_fp32_outside():
    torch.manual_seed(0)
    model = CausalLM(micro_config())
    masters = dict(model.named_parameters())
    copies = BF16Weights(model)
    with copies:
        inside = dict(model.named_parameters())
        logits = model(_batch(model.config)[0])
    for name, p in inside.items():
        router = name.endswith("gate.weight") and ".mlp." in name
        assert p.dtype == (torch.float32 if router else torch.bfloat16), name
        assert (p is masters[name]) == router, name
    assert logits.dtype == torch.bfloat16
    assert all(p is masters[n] and p.dtype == torch.float32 for n, p in model.named_parameters())
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())


def test_gradients_land_on_the_masters_in_fp32_and_accumulate():
    torch.manual_seed(0)
    model = CausalLM(micro_config())
    copies = BF16Weights(model)
    grads = []
    for seed in (0, 1):
        with copies:
            model.loss(*_batch(model.config, seed)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert any(n.endswith("mlp.gate.weight") for n in grads[0])  # the router's too
    assert all(g.dtype == torch.float32 for g in grads[1].values())
    assert all(c.grad is None for c in copies.copies)  # folded, not left on the copies
    # the second backward added to the first (gradient accumulation), in fp32
    model.zero_grad(set_to_none=True)
    with copies:
        model.loss(*_batch(model.config, 1)).loss.backward()
    for n, p in model.named_parameters():  # an expert no token reached has no gradient
        zero = torch.zeros_like(p)
        torch.testing.assert_close(grads[1].get(n, zero),
                                   grads[0].get(n, zero) + (zero if p.grad is None else p.grad))


def test_copies_follow_the_masters_after_an_update():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    copies = BF16Weights(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with copies:
        assert torch.equal(model[0].weight, (copies.masters[0] + 0).to(torch.bfloat16))


def test_tied_and_frozen_parameters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight  # one parameter, two modules
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

        def forward(self, ids):
            return self.head(self.frozen(self.embed(ids)))

    model = Tied()
    copies = BF16Weights(model)
    assert len(copies.copies) == 3  # embed/head shared, frozen weight and bias
    with copies:
        assert model.head.weight is model.embed.weight
        out = model(torch.tensor([[1, 2, 3]]))
    out.float().square().sum().backward()
    assert model.embed.weight.grad.dtype == torch.float32
    assert model.frozen.weight.grad is None and model.frozen.bias.grad is None


def test_trainer_runs_bf16_on_copies_and_keeps_fp32(tmp_path):
    tr = _trainer(tmp_path, max_steps=2, precision="bf16")
    assert tr.bf16_copies is not None
    tr.fit()
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    assert _trainer(tmp_path / "fp32", max_steps=1, precision="fp32").bf16_copies is None


def test_padded_rows():
    counts = torch.tensor([0, 1, 2, 3, 5, 17, 32, 33, 64, 65, 250])
    assert padded_rows(counts).tolist() == [0, 1, 2, 4, 8, 32, 32, 64, 64, 96, 256]


@pytest.mark.parametrize("tokens", [1, 5, 37, 200])
def test_padded_dispatch_gives_the_unpadded_numbers(monkeypatch, tokens):
    """bf16 on a CPU pads each expert's slice; outputs and gradients must be the same bits."""
    torch.manual_seed(0)
    moe = MoE(micro_config()).to(torch.bfloat16)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.1)
    x = torch.randn(tokens, moe.gate.weight.shape[1], dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)

    def run():
        moe.zero_grad(set_to_none=True)
        x.grad = None
        y = moe(x)
        y.backward(g)
        return [y, x.grad, moe.gate.weight.grad] + [p.grad for p in moe.experts.parameters()
                                                    if p.grad is not None]
    padded = run()
    monkeypatch.setattr(moe_module, "pad_slots", lambda t, w, c, pad_token: (t, w, c))
    plain = run()
    assert len(padded) == len(plain)
    for a, b in zip(padded, plain):
        assert torch.equal(a, b)


def test_v4_keeps_sinks_compressors_and_mhc_in_fp32():
    """DeepSeek-V4's fp32 parameters stay the masters inside the context: the mHC weights
    (runs_in_fp32), the attention sinks and each compressor's kv_proj, gate_proj,
    position_bias and kv_norm (fp32_parameters); a bf16 training step runs and their
    gradients arrive in fp32."""
    from nanoseek.config.presets import preset
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-v4")).train()
    masters = dict(model.named_parameters())
    kept = (".sinks", ".compressor.kv_proj.weight", ".compressor.gate_proj.weight",
            ".compressor.position_bias", ".compressor.kv_norm.weight", "indexer.kv_proj.weight",
            "indexer.gate_proj.weight", "indexer.position_bias", "indexer.kv_norm.weight")
    fp32 = {n for n in masters if n.endswith(kept) or "_hc." in n or "hc_head." in n
            or (n.endswith("gate.weight") and ".mlp." in n)}
    assert any(n.endswith(".sinks") for n in fp32) and any("indexer.kv_proj" in n for n in fp32)
    copies = BF16Weights(model)
    ids, labels = _batch(model.config, S=40)
    with copies:
        inside = dict(model.named_parameters())
        model.loss(ids, labels).loss.backward()
    for name, p in inside.items():
        assert (p is masters[name]) == (name in fp32), name
        assert p.dtype == (torch.float32 if name in fp32 else torch.bfloat16), name
    for name in fp32:
        g = masters[name].grad
        assert g is None or (g.dtype == torch.float32 and torch.isfinite(g).all()), name
